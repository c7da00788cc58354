"""Everything a run needs before its first step: process group, fold, model, optimizer.

The order is the one ``foldmesh.parallelize`` documents: build on the meta device,
parallelize, materialise, initialise (or load Hugging Face weights), then data parallelism.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy
from torch.distributed.tensor import DTensor

from .. import Fold, apply_fsdp, init_weights, parallelize
from ..hf import config_from_hf, load_hf_weights
from ..hf._load import read_config
from ..models import Transformer
from ..pipeline import split_model
from ._config_check import model_config
from .config import TrainConfig


def init_distributed(device: str) -> torch.device:
    """Join (or, run without torchrun, create) the process group; return this rank's device."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        backend = "nccl" if device == "cuda" else "gloo"
        if "RANK" not in os.environ:  # a plain `python -m foldmesh.train`: one rank
            os.environ.update(RANK="0", WORLD_SIZE="1")
            if "MASTER_PORT" not in os.environ:
                # One rank has no peers to meet: an in-process store needs no port, so any
                # number of one-process runs can share a machine. A set MASTER_PORT is the
                # user's choice of rendezvous and is honoured below.
                dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
                return _device(device)
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "TORCHELASTIC_RESTART_COUNT" in os.environ:
            dist.init_process_group(backend, store=_attempt_store(), rank=int(
                os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
        else:
            dist.init_process_group(backend)
    return _device(device)


def _device(device: str) -> torch.device:
    return torch.device(device, torch.cuda.current_device()) if device == "cuda" \
        else torch.device("cpu")


def _attempt_store() -> dist.Store:
    """torchrun's store, namespaced by restart attempt. Under ``--max-restarts`` the store
    outlives the workers, and a restarted gloo group would otherwise read the dead ranks'
    addresses left in it ("Gloo connectFullMesh failed ... Connection refused")."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=not agent and rank == 0, multi_tenant=not agent)
    attempt = os.environ["TORCHELASTIC_RESTART_COUNT"]
    return dist.PrefixStore(f"foldmesh/attempt-{attempt}/", store)


def build_fold(cfg: TrainConfig, device: torch.device):
    f = cfg.fold
    fold = Fold(tp=f.tp, cp=f.cp, dp=f.dp, pp=f.pp, ep=f.ep, etp=f.etp, edp=f.edp)
    return fold.build(device.type)


def compute_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    name = cfg.training.dtype
    if name == "auto":
        name = "bf16" if device.type == "cuda" else "fp32"
    return torch.bfloat16 if name == "bf16" else torch.float32


def build_model(cfg: TrainConfig, fm, device: torch.device) -> list[Transformer]:
    """This rank's parallelized model with fp32 weights: the whole model, or with pp > 1 its
    pipeline stages (``foldmesh.pipeline.split_model``). Initialised from ``training.seed``
    with the values one process would draw (``foldmesh.init_weights``: the same on every fold
    and pipeline split) or loaded from ``model.hf_path``."""
    f = cfg.fold
    kw = dict(dispatcher=f.dispatcher, activation_checkpoint=f.activation_checkpoint)
    hf = None
    if cfg.model.hf_path:
        hf = read_config(Path(cfg.model.hf_path))
        mc, arch = config_from_hf(hf)
        if cfg.model.overrides:
            mc = dataclasses.replace(mc, **cfg.model.overrides)
    else:
        mc = model_config(cfg)
    with torch.device("meta"):
        model = Transformer(mc)
    parts = [model]
    if f.pp > 1:
        parts = split_model(model, fm, schedule=f.pp_schedule,
                            stages_per_rank=f.pp_stages_per_rank or None,
                            layers_per_stage=f.pp_layers or None)
    for part in parts:
        parallelize(part, fm, **kw)
        part.to_empty(device=device)
        if hf is not None:
            part.hf_architecture, part.hf_config = arch, hf
            load_hf_weights(part, cfg.model.hf_path, arch)
        else:  # the same values on any fold (and pp split) of the run
            init_weights(part, cfg.training.seed)
        part.train()
    if f.data_parallel == "fsdp":
        dtype = compute_dtype(cfg, device)
        mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        for part in parts:
            # with pp the schedule runs several micro-batches' forwards before their
            # backwards: keep the stage's weights gathered rather than gather them again
            apply_fsdp(part, fm, mp_policy=mp, reshard_after_forward=f.pp == 1)
    return parts


def set_foreach(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> None:
    """Use the foreach kernels unless DTensors and plain tensors sit side by side, which they
    cannot mix: replication leaves whole dense weights next to expert shards, while FSDP makes
    every weight a DTensor. Called again after loading a checkpoint, which restores the
    writer's setting."""
    kinds = {isinstance(p, DTensor) for p in model.parameters()}
    for group in optimizer.param_groups:
        group["foreach"] = len(kinds) == 1


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module):
    """AdamW without weight decay on norms, biases and other vectors; warm-up then cosine.
    One per pipeline stage (its state dict is keyed by the stage's global names)."""
    o = cfg.optimizer
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": o.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
    set_foreach(opt, model)
    total = cfg.training.steps

    def factor(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        t = (step - o.warmup_steps) / max(1, total - o.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * cosine

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)
