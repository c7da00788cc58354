"""The training loop: micro-batches, clipping, the optimizer, validation, checkpoints, metrics.

Launch (the config's docstrings list every field; see configs/):

    torchrun --nproc-per-node 8 -m foldmesh.train --config configs/demo.toml

One optimizer step: each data-parallel replica reads its own rows of the global batch, runs
``global_batch / dp / micro_batch`` micro-batches (gradient synchronisation only on the last
one under FSDP), scales each micro-batch's loss and balancing losses by their number, reduces
gradients (FSDP in backward, or ``reduce_gradients``), clips the global norm, steps AdamW
and the schedule, and updates the routers' expert biases.

With ``fold.pp > 1`` each rank holds its pipeline stages (``self.parts``, one optimizer
each) and the micro-batches run through the pipeline schedule (``foldmesh.pipeline``);
everything else is the same, with the loss taken from the last stage and the gradient norm,
expert loads and balancing losses summed over every stage.
"""

from __future__ import annotations

import contextlib
import os
import resource
import time
import warnings

import torch
import torch.distributed as dist

from .. import clip_grad_norm_, cross_entropy, reduce_gradients
from .._sequence import _cp_chunks, replica_tokens
from ..loss import local_cross_entropy
from ..moe import MoE, Router, apply_force_balance
from ..moe.router import recomputing
from ..pipeline import apply_pipeline
from . import checkpoint as ckpt
from ._corpus import token_dir
from ._dashboards import open_dashboards
from ._plan_check import PlanCheck
from ._profiling import StepProfiler
from ._run_config import write_run_config
from .build import (
    build_fold,
    build_model,
    build_optimizer,
    compute_dtype,
    init_distributed,
    set_foreach,
)
from .config import TrainConfig
from .data import build_data, num_targets, read_rows
from .flops import flops_per_token, peak_flops
from .metrics import MetricsLogger


class NonFiniteError(RuntimeError):
    """A non-finite loss or gradient norm with ``training.on_nonfinite = "stop"``."""


FORCE_BALANCE = ("moe.force_balance = true: the routers ignore their scores and spread the "
                 "tokens evenly over the experts; for benchmarking only, the model does not "
                 "learn to route")


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.device = init_distributed(cfg.training.device)
        self.rank = dist.get_rank()
        if cfg.training.deterministic:
            torch.use_deterministic_algorithms(True)
        self.fm = build_fold(cfg, self.device)
        f = self.fm.fold
        self.dp, self.cp = f.dp, f.cp
        self.parts = build_model(cfg, self.fm, self.device)
        if cfg.moe.force_balance:
            for part in self.parts:
                apply_force_balance(part)
        self.model_cfg = self.parts[0].config
        built = [build_optimizer(cfg, part) for part in self.parts]
        self.optimizers = [o for o, _ in built]
        self.schedulers = [s for _, s in built]
        t = cfg.training
        self.rows = t.global_batch // self.dp  # this replica's sequences per step
        self.micro = t.micro_batch or self.rows
        self.n_micro = self.rows // self.micro
        self.train_data, self.val_data = build_data(cfg.data, t.global_batch, t.seed,
                                                    token_dir(cfg))
        # the loss of a step: the sum over its tokens times dp·cp / (the global batch's
        # counted labels), so that the dp·cp-averaged gradient is the exact token mean also
        # when packed sequences are padded (set per step, read by the pipeline's loss too)
        self._loss_norm = 1.0
        self.routers = [m for p in self.parts for m in p.modules() if isinstance(m, Router)]
        for r in self.routers:  # see foldmesh.parallelize: cp, per micro-batch
            r.loss_scale = self.cp / self.n_micro
        self.dtype = compute_dtype(cfg, self.device)
        self._track_experts()
        self.pipe = None
        if f.pp > 1:
            # the residual stream between stages: bf16 under FSDP mixed precision; fp32 with
            # replication (autocast keeps the residual stream in fp32)
            fsdp = cfg.fold.data_parallel == "fsdp"
            self.pipe = apply_pipeline(
                self.parts, self.fm, schedule=cfg.fold.pp_schedule, microbatches=self.n_micro,
                microbatch_size=self.micro, seq_len=cfg.data.seq_len,
                dtype=self.dtype if fsdp else torch.float32, device=self.device,
                loss_fn=self._stage_loss)
        self.step = 0
        self.log = MetricsLogger(cfg.checkpoint.dir, t.steps, progress=cfg.metrics.progress,
                                 enabled=self.rank == 0,
                                 sinks=open_dashboards(cfg, self.rank == 0))
        if self.rank == 0:  # what python -m foldmesh.generate rebuilds the model from
            write_run_config(cfg)
        if cfg.moe.force_balance and self.rank == 0:
            warnings.warn(FORCE_BALANCE, stacklevel=2)
            self.log.log_event(0, FORCE_BALANCE)
        self.profiler = StepProfiler(cfg, self.rank, self.device)
        self.flops = flops_per_token(self.model_cfg, cfg.data.seq_len)
        self.peak = peak_flops(self.device)
        # the planner's step time against the measured one, once (foldmesh/train/_plan_check)
        self.plan_check = PlanCheck(cfg, dist.get_world_size(), self.device, self.log,
                                    enabled=self.rank == 0)

    def _track_experts(self) -> None:
        """Per optimizer step: each MoE layer's expert counts and dropped tokens, summed over
        the micro-batches, in rows indexed by the layer's place among the whole model's MoE
        layers (so that every stage fills its own rows and a sum over all ranks has them
        all). A forward hook, because the pipeline schedule runs the forwards."""
        moe_layers = [i for i in range(self.model_cfg.num_layers) if self.model_cfg.is_moe(i)]
        e = self.model_cfg.num_experts
        self.counts = torch.zeros(len(moe_layers), e, dtype=torch.int64, device=self.device)
        self.dropped = torch.zeros(len(moe_layers), dtype=torch.int64, device=self.device)
        self.aux: dict[str, torch.Tensor] = {}

        def hook(row):
            def record(moe, args, out):
                if not (moe.training and torch.is_grad_enabled()) or recomputing():
                    return
                self.counts[row] += moe.router.last_counts
                self.dropped[row] += moe.last_dropped
                for name, v in moe.router.last_losses.items():
                    self.aux[name] = self.aux.get(name, 0.0) + v.float()
            return record

        for part in self.parts:
            for key, block in part.layers.items():
                for moe in (m for m in block.modules() if isinstance(m, MoE)):
                    moe.register_forward_hook(hook(moe_layers.index(int(key))))

    # ------------------------------------------------------------------ checkpoints
    def resume(self) -> None:
        if not self.cfg.checkpoint.resume:
            return
        path = ckpt.latest(self.cfg.checkpoint.dir)
        if path is None:
            return
        extra = ckpt.load(path, self.parts, self.optimizers)
        for opt, part in zip(self.optimizers, self.parts, strict=True):
            set_foreach(opt, part)
        self.step = extra["step"]
        for sched in self.schedulers:
            sched.load_state_dict(extra["scheduler"])
        self.train_data.load_state_dict(extra["data"])
        self.log.log_event(self.step, f"resumed from {path} (step {self.step}, written by "
                                      f"{extra['world_size']} ranks with {extra['fold']})")

    def save(self) -> None:
        extra = {"scheduler": self.schedulers[0].state_dict(),
                 "data": self.train_data.state_dict(),
                 "world_size": dist.get_world_size(), "fold": repr(self.fm.fold)}
        path = ckpt.save(self.cfg.checkpoint.dir, self.step, self.parts, self.optimizers, extra,
                         self.cfg.checkpoint.keep)
        self.log.log_event(self.step, f"checkpoint {path}")

    # ------------------------------------------------------------------ one step
    def _autocast(self):
        # on CPU too, so that the CPU tests and dry runs run what a GPU runs
        if self.dtype != torch.float32 and self.cfg.fold.data_parallel == "replicate":
            return torch.autocast(self.device.type, dtype=self.dtype)
        return contextlib.nullcontext()

    def _replica_rows(self, data, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This data-parallel replica's ``[rows, S]`` token ids and labels of a step; sets
        the step's loss normaliser."""
        d = self.fm.coordinate("dp")
        ids, labels = read_rows(data, step, range(d * self.rows, (d + 1) * self.rows))
        self._loss_norm = self.dp * self.cp / max(1, num_targets(data, step))
        return ids.to(self.device), labels.to(self.device)

    def _stage_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The pipeline's last stage: a micro-batch's summed token loss, normalised."""
        target = _cp_chunks(labels, self.fm)
        return local_cross_entropy(logits, target, self.fm, "sum") * self._loss_norm

    def _micro_batches(self, data, step: int):
        ids, labels = self._replica_rows(data, step)
        for i in range(self.n_micro):
            rows = slice(i * self.micro, (i + 1) * self.micro)
            yield replica_tokens(ids[rows], self.fm), replica_tokens(labels[rows], self.fm)

    def _forward_backward(self) -> torch.Tensor:
        """This rank's share of the step's loss (fp32 scalar): its tokens' summed loss times
        dp·cp / the step's counted labels, so that the mean over dp·cp is the global token
        mean (without padding: the mean of the micro-batches' per-rank means). The
        gradients accumulate in the parts."""
        if self.pipe is not None:
            ids, labels = self._replica_rows(self.train_data, self.step)
            with self._autocast():
                return self.pipe.step(ids, labels)
        model = self.parts[0]
        fsdp = self.cfg.fold.data_parallel == "fsdp"
        loss_sum = torch.zeros((), device=self.device)
        for i, (ids, labels) in enumerate(self._micro_batches(self.train_data, self.step)):
            if fsdp:
                model.set_requires_gradient_sync(i == self.n_micro - 1)
            with self._autocast():
                logits = model(ids)
            loss = cross_entropy(logits, labels, self.fm, reduction="sum") * self._loss_norm
            loss.backward()
            loss_sum += loss.detach()
        return loss_sum

    def train_step(self) -> dict:
        self.counts.zero_()
        self.dropped.zero_()
        self.aux = {}
        local_loss = self._forward_backward()
        if self.cfg.fold.data_parallel != "fsdp":
            reduce_gradients(self.parts, self.fm)
        clip = self.cfg.optimizer.grad_clip
        norm = clip_grad_norm_(self.parts, self.fm, clip if clip > 0 else float("inf"))
        # the global token mean: the average of the ranks' shares over the dp·cp shards
        stats = torch.stack([local_loss, norm.to(local_loss.dtype)])
        dist.all_reduce(stats[:1], group=self.fm["dp_cp"].get_group())
        loss_value = stats[0] / (self.dp * self.cp)
        # NOTE: host synchronisation, once per step: the non-finite check decides the step.
        # The loss and the norm are the same on every rank (pp included), so is the decision.
        loss_f, norm_f = float(loss_value), float(stats[1])
        finite = bool(torch.isfinite(torch.tensor([loss_f, norm_f])).all())
        skipped = False
        if not finite:
            msg = (f"step {self.step + 1}: non-finite "
                   f"{'loss' if not torch.isfinite(torch.tensor(loss_f)) else 'gradient norm'} "
                   f"(loss {loss_f}, grad norm {norm_f})")
            if self.cfg.training.on_nonfinite == "stop":
                raise NonFiniteError(msg + "; the weights were not updated. Lower "
                                     "optimizer.lr or set training.on_nonfinite = 'skip'")
            self.log.log_event(self.step + 1, "skipped " + msg)
            skipped = True
        if not skipped:
            for opt in self.optimizers:
                opt.step()
            for r in self.routers:
                if r.expert_bias is not None:
                    r.update_expert_bias()
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        for r in self.routers:
            r.reset_global_counts()
        for sched in self.schedulers:
            sched.step()
        self.step += 1
        return dict(loss=loss_f, grad_norm=norm_f, aux=self.aux, counts=self.counts.clone(),
                    dropped=self.dropped.clone(), skipped=skipped)

    @torch.no_grad()
    def validate(self) -> float:
        for part in self.parts:
            part.eval()
        total = torch.zeros((), device=self.device)
        for i in range(self.cfg.training.val_batches):
            if self.pipe is not None:
                ids, labels = self._replica_rows(self.val_data, i)
                with self._autocast():
                    total += self.pipe.eval(ids, labels)
                continue
            for ids, labels in self._micro_batches(self.val_data, i):
                with self._autocast():
                    logits = self.parts[0](ids)
                total += cross_entropy(logits, labels, self.fm, "sum") * self._loss_norm
        for part in self.parts:
            part.train()
        dist.all_reduce(total, group=self.fm["dp_cp"].get_group())
        n = self.cfg.training.val_batches * self.dp * self.cp
        return float(total) / n

    # ------------------------------------------------------------------ metrics
    def _record(self, out: dict, seconds: float, steps: int) -> dict:
        tokens = self.cfg.training.global_batch * self.cfg.data.seq_len * steps
        tps = tokens / seconds
        mfu = None
        if self.peak is not None:
            mfu = tps * self.flops / dist.get_world_size() / self.peak
        # expert load over the whole stage (one collective per log interval)
        counts, dropped = out["counts"], out["dropped"]
        both = torch.cat([counts, dropped[:, None]], dim=1)
        # over the stage's ranks, and over pp: each stage fills only its own layers' rows
        world = self.fm.world.get_group()
        dist.all_reduce(both, group=world)
        both = both.cpu()
        experts = {}
        for layer, row in enumerate(both):
            c = row[:-1].double()
            total = c.sum().item()
            experts[str(layer)] = {
                "counts": row[:-1].tolist(),
                "max_over_mean": (c.max() / c.mean()).item() if total else 0.0,
                "dropped": row[-1].item() / total if total else 0.0,
            }
        aux = {k: v.clone() for k, v in out["aux"].items()}
        for v in aux.values():  # per-rank terms add up over the stages; mean over replicas
            dist.all_reduce(v, group=world)
        aux = {k: float(v) / self.n_micro / self.dp for k, v in aux.items()}
        if self.device.type == "cuda":
            peak_mem = torch.cuda.max_memory_allocated(self.device) / 2**30
        else:  # the process's peak resident memory (kilobytes on Linux)
            peak_mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        return dict(step=self.step, loss=out["loss"], aux_loss=aux.get("aux_loss"),
                    z_loss=aux.get("z_loss"), lr=self.schedulers[0].get_last_lr()[0],
                    grad_norm=out["grad_norm"], tokens_per_s=tps, mfu=mfu,
                    peak_mem_gib=peak_mem, step_time_s=seconds / steps,
                    skipped=out["skipped"], experts=experts)

    # ------------------------------------------------------------------ the run
    def fit(self) -> None:
        cfg, t = self.cfg, self.cfg.training
        self.resume()
        self.log.start_step = self.step
        every = cfg.metrics.log_every
        tick, since = time.perf_counter(), 0
        tokens_per_step = t.global_batch * cfg.data.seq_len
        last = min(t.steps, self.step + t.stop_after) if t.stop_after else t.steps
        while self.step < last:
            if (t.fail_at_step and self.step + 1 == t.fail_at_step and self.rank == 1
                    and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) == 0):
                print(f"fault injection: rank 1 exits before step {self.step + 1}", flush=True)
                os._exit(1)
            start = time.perf_counter()
            with self.profiler.step(self.step + 1, last):
                out = self.train_step()
            self.plan_check.step_done(self.step, time.perf_counter() - start)
            since += 1
            if self.step % every == 0 or self.step == last:
                seconds = time.perf_counter() - tick
                self.log.log_train(self._record(out, seconds, since))
                self.plan_check.logged(self.step)
                tick, since = time.perf_counter(), 0
            self.log.progress_update(self.step, out["loss"],
                                     tokens_per_step / (time.perf_counter() - start))
            if t.val_every and (self.step % t.val_every == 0 or self.step == t.steps):
                self.log.log_val(self.step, self.validate())
            if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0 \
                    and self.step < last:
                self.save()
        self.save()
        if self.step < t.steps:
            self.log.log_event(self.step, f"stopped after {t.stop_after} steps (stop_after); "
                                          "launch again to resume")
            self.log.close()
            return
        self.log.close()
        if cfg.checkpoint.export_hf:
            from ..hf import save_pretrained
            save_pretrained(self.parts, f"{cfg.checkpoint.dir}/hf", mesh=self.fm)
        if cfg.metrics.plots and self.rank == 0:
            from ..plot import plot_run
            plot_run(cfg.checkpoint.dir)
