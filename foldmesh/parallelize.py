"""Apply the fold to a plain ``Transformer``: TP + SP, CP, MoE folding, activation checkpointing.

``parallelize(model, fm)`` applies, in this order:

1. **Tensor parallelism with sequence parallelism** over ``fm["tp"]`` (DTensor parallel
   styles). Between blocks each rank holds its ``[b, S/(cp·tp), H]`` slice of the residual
   stream; attention and dense MLPs all-gather it over tp, run column-parallel then
   row-parallel projections (heads and FFN split over tp) and reduce-scatter back. Norms run
   on the sequence shards with weights replicated over tp. Multi-head Latent Attention runs
   its down-projections on the sequence shards instead and all-gathers the latents, which
   are smaller than the hidden states (``apply_tp_mla``). TP comes first because it swaps
   ``nn.Linear`` weights for DTensors, which the later steps must see.
2. **Context parallelism** over ``fm["cp"]``: each rank keeps two load-balanced sequence
   chunks (see ``foldmesh._sequence``); attention all-gathers K/V over cp, Multi-head
   Latent Attention the latent and the RoPE key instead (``apply_cp``). It comes after TP
   because the latent it gathers over cp is the one TP has already gathered over tp.
3. **MoE folding** (``foldmesh.moe.apply_moe_parallel``): each MoE layer takes the rank's
   tokens onto the MoE view, experts over ep and FFN over etp.
4. **Activation checkpointing** per block (optional): it wraps what the earlier steps built,
   so recomputation replays their collectives too.

Data parallelism (FSDP2 or replication) comes last and is applied by the user or by
``foldmesh.apply_fsdp`` / ``foldmesh.reduce_gradients``: it must see the final parameters.

The parallel model takes the global ``[B, S]`` token ids on every rank (or a DTensor from
``foldmesh.distribute_tokens``) and returns logits ``[B, S, V]`` as a DTensor on
``fm.attn_stage`` with placements ``(Shard(0), Shard(1), Shard(2))``: batch over dp, sequence
over cp in load-balanced order, vocabulary over tp. docs/placements.md lists every boundary.

With pp > 1 the model is one pipeline stage (``foldmesh.pipeline.split_model``) and
``parallelize`` applies the same steps on the ranks of its stage. A stage passes plain
tensors, this rank's own blocks, because that is what crosses a stage boundary: the first
stage takes this data-parallel replica's ``[b, S]`` token ids (it keeps its cp chunks), a
later stage takes the residual stream ``[b, S/(cp·tp), H]``; a stage returns the residual
stream, the last one its local logits ``[b, S/cp, V/tp]``. Positions are computed inside
every stage from the fold.
"""

from __future__ import annotations

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from ._context_parallel import ContextParallelAttention, LatentExchange
from ._fold import FoldError
from ._mesh import FoldedMesh
from ._sequence import _cp_chunks, check_sequence, local_positions, local_tokens
from .models import Transformer
from .moe import apply_moe_parallel

LOGITS = (Shard(0), Shard(1), Shard(2))
"""Placements of the logits ``[B, S, V]`` on ``fm.attn_stage``."""

AC_MODES = ("none", "full")


def parallelize(model: Transformer, fm: FoldedMesh, *, dispatcher: str = "alltoall",
                sequence_parallel: bool = True, activation_checkpoint: str = "none"
                ) -> Transformer:
    """Parallelize ``model`` in place over ``fm`` and return it (see the module docstring).

    Call it on the model built on the meta device (or identical on every rank), before
    ``to_empty``/``init_weights`` or loading weights, and before data parallelism.

    Args:
        model: a plain ``foldmesh.models.Transformer``.
        fm: the folded mesh; with pp > 1 ``model`` is a stage from
            ``foldmesh.pipeline.split_model``.
        dispatcher: the MoE token dispatcher, "alltoall" or "allgather".
        sequence_parallel: must stay True when tp > 1: MoE layers need each tp rank to hold
            different tokens.
        activation_checkpoint: "none" or "full" (recompute every block in backward).

    Raises:
        FoldError: a size the fold cannot split, a whole model with pp > 1 (or a stage with
            pp = 1), or tp > 1 without sequence parallelism.
    """
    check_model(model, fm, sequence_parallel)
    if activation_checkpoint not in AC_MODES:
        raise FoldError(f"activation_checkpoint must be one of {AC_MODES}, "
                        f"got {activation_checkpoint!r}")
    if fm.fold.tp > 1:
        apply_tp(model, fm)
    if fm.fold.cp > 1:
        apply_cp(model, fm)
    for block in model.layers.values():
        if block.is_moe:
            apply_moe_parallel(block.ffn, fm, dispatcher=dispatcher)
            # Gradients are divided by dp·cp (foldmesh.data_parallel) but a replica's
            # balancing loss is summed over its cp·tp ranks once: scale its gradient by cp.
            # A trainer accumulating micro-batches divides this by their number.
            block.ffn.router.loss_scale = float(fm.fold.cp)
    if activation_checkpoint == "full":
        for key, block in list(model.layers.items()):
            model.layers[key] = checkpoint_wrapper(block, preserve_rng_state=False)
    if fm.fold.pp > 1:
        model.register_forward_pre_hook(_stage_inputs(fm), with_kwargs=True)
        model.register_forward_hook(_stage_outputs)
    else:
        model.register_forward_pre_hook(_shard_inputs(fm), with_kwargs=True)
        model.register_forward_hook(_logits_out(fm))
    return model


def check_model(model: Transformer, fm: FoldedMesh, sequence_parallel: bool = True) -> None:
    """Every size the fold splits, checked before anything changes; errors name the fix."""
    cfg, f = model.config, fm.fold
    if f.pp > 1 and model.is_whole:
        raise FoldError(f"pp = {f.pp}: parallelize takes one pipeline stage; split the model "
                        "first with foldmesh.pipeline.split_model")
    if f.pp == 1 and not model.is_whole:
        raise FoldError("this model is a pipeline stage but the fold has pp = 1; parallelize "
                        "the whole model")
    if f.tp > 1 and not sequence_parallel:
        raise FoldError(
            f"tp = {f.tp} without sequence parallelism: every tp rank would route the same "
            "tokens through the MoE layers; keep sequence_parallel=True or set tp = 1"
        )
    for name, size in cfg.tp_split_sizes().items():
        if size % f.tp:
            raise FoldError(f"ModelConfig.{name} = {size} is not divisible by tp = {f.tp}; "
                            f"choose tp dividing {size}")
    if any(b.is_moe for b in model.layers.values()):
        f.check_experts(cfg.num_experts)
        f.check_expert_ffn(cfg.expert_ffn_size)


def apply_tp(model: Transformer, fm: FoldedMesh) -> None:
    """Tensor + sequence parallelism over ``fm["tp"]`` (see the module docstring, step 1)."""
    tp = fm["tp"]
    seq = Shard(1)
    # vocab-parallel embedding: partial sums reduce-scattered onto the sequence shards
    if model.embed is not None:
        parallelize_module(model, tp, {"embed": RowwiseParallel(input_layouts=Replicate(),
                                                                output_layouts=seq)})
    if model.lm_head is not None:
        parallelize_module(model, tp, {
            "norm": SequenceParallel(),
            "lm_head": ColwiseParallel(input_layouts=seq, output_layouts=Shard(-1),
                                       use_local_output=False),
        })
    model.tie_weights()  # both styles shard the [V, H] matrix on V: one DTensor serves both
    for block in model.layers.values():
        plan = {
            "attn_norm": SequenceParallel(),
            # an MoE layer takes the rank's own tokens as a plain tensor (and returns one)
            "ffn_norm": SequenceParallel(use_local_output=block.is_moe),
        }
        if model.config.is_mla:
            plan.update(_mla_plan(block.attn))
        else:
            plan.update(_attention_plan(block.attn))
        if not block.is_moe:
            plan.update({
                "ffn": PrepareModuleInput(input_layouts=(seq,),
                                          desired_input_layouts=(Replicate(),)),
                "ffn.gate_proj": ColwiseParallel(),
                "ffn.up_proj": ColwiseParallel(),
                "ffn.down_proj": RowwiseParallel(output_layouts=seq),
            })
        parallelize_module(block, tp, plan)
        if model.config.is_mla:
            block.attn.kv_a_proj.register_forward_hook(_gather_kv_latent(block.attn.latent))


def apply_cp(model: Transformer, fm: FoldedMesh) -> None:
    """Context parallelism over ``fm["cp"]`` (see the module docstring, step 2).

    Grouped-query attention all-gathers K and V over cp in ``core``. Multi-head Latent
    Attention all-gathers the normalised latent and the rotated RoPE key (Rkv + Dr values per
    token) in ``kv_exchange``, expands them with its own ``kv_b_proj`` heads on every
    position, and ``core`` attends without a further gather. With tp > 1 the latent that
    reaches the exchange is this cp rank's ``[b, S/cp, Rkv]``, already all-gathered over tp
    by ``_gather_kv_latent``: the tp gather runs first, on the tp shards, and the cp gather
    on the result (docs/placements.md, "Multi-head Latent Attention").
    """
    for block in model.layers.values():
        core = ContextParallelAttention(fm)
        if model.config.is_mla:
            block.attn.kv_exchange = LatentExchange(fm)
            block.attn.core = core.attend
        else:
            block.attn.core = core


def _attention_plan(attn) -> dict:
    """Grouped-query attention: all-gather the sequence, heads over tp, reduce-scatter."""
    seq = Shard(1)
    plan = {
        "attn": PrepareModuleInput(input_layouts=(seq, None),
                                   desired_input_layouts=(Replicate(), None)),
        "attn.q_proj": ColwiseParallel(),
        "attn.k_proj": ColwiseParallel(),
        "attn.v_proj": ColwiseParallel(),
        "attn.o_proj": RowwiseParallel(output_layouts=seq),
    }
    if attn.q_norm is not None:
        # per-head norms on this rank's heads [b, L, heads/tp, D]: weights replicated
        plan["attn.q_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
        plan["attn.k_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
    return plan


def _mla_plan(attn) -> dict:
    """Multi-head Latent Attention over tp (docs/placements.md, "Multi-head Latent
    Attention"). Heads are split over tp: the up-projections (``q_b_proj`` or ``q_proj``,
    ``kv_b_proj``) are column-parallel and ``o_proj`` row-parallel, as in ``_attention_plan``.
    The down-projections (``q_a_proj``, ``kv_a_proj``) and ``q_a_norm`` run sequence-parallel
    on this rank's tokens ``[b, S/tp, H]`` with weights replicated over tp, so what is
    all-gathered is the latents (Rq + Rkv + Dr values per token instead of H):

    - the query latent ``[b, S, Rq]`` by ``q_b_proj`` (``Shard(1)`` -> ``Replicate``;
      backward reduce-scatter); without ``q_lora_rank``, ``q_proj`` all-gathers x itself;
    - the key/value latent ``[b, S, Rkv + Dr]`` by ``_gather_kv_latent`` on ``kv_a_proj``'s
      output; ``kv_a_norm`` then runs on the whole sequence, its weight a plain tensor whose
      gradient is the same on every tp rank.
    """
    seq = Shard(1)
    plan = {"attn.kv_a_proj": SequenceParallel(use_local_output=False),
            "attn.kv_b_proj": ColwiseParallel(),
            "attn.o_proj": RowwiseParallel(output_layouts=seq)}
    if attn.q_proj is not None:
        plan["attn.q_proj"] = ColwiseParallel(input_layouts=seq)
    else:
        plan.update({"attn.q_a_proj": SequenceParallel(use_local_output=False),
                     "attn.q_a_norm": SequenceParallel(use_local_output=False),
                     # the latent arrives Shard(1): said so, it is all-gathered once
                     # (backward: one reduce-scatter) before the matmul, as docs say
                     "attn.q_b_proj": ColwiseParallel(input_layouts=seq)})
    return plan


def _gather_kv_latent(latent: int):
    """Forward hook on ``kv_a_proj``: its output ``[b, S, Rkv + Dr]`` (``Shard(1)`` over tp)
    -> this rank's local copy of the whole sequence, all-gathered in two parts whose
    gradients differ.

    The latent c ``[..., :Rkv]`` feeds the column-parallel ``kv_b_proj``, whose input
    gradient comes back complete (``ColwiseParallel`` all-reduces it): ``Replicate``, and
    its backward keeps this rank's rows. The RoPE key ``[..., Rkv:]`` feeds this rank's heads
    directly, so its gradient is this rank's share of the sum over all heads: ``Partial``,
    and its backward reduce-scatters.
    """

    def hook(module, args, out):
        c, k_rot = out[..., :latent], out[..., latent:]
        c = c.redistribute(placements=[Replicate()]).to_local()
        k_rot = k_rot.redistribute(placements=[Replicate()]).to_local(
            grad_placements=[Partial()])
        return torch.cat([c, k_rot], dim=-1)

    return hook


def _shard_inputs(fm: FoldedMesh):
    def hook(module, args, kwargs):
        ids = args[0] if args else kwargs.pop("x")
        if "positions" in kwargs or len(args) > 1:
            raise FoldError("a parallelized model computes positions itself; pass only the "
                            "token ids")
        local = local_tokens(ids, fm)
        kwargs["positions"] = local_positions(ids.shape[1], fm, local.device)
        module._fold_shape = (ids.shape[0], ids.shape[1])
        return (local,), kwargs

    return hook


def _logits_out(fm: FoldedMesh):
    def hook(module, args, out):
        b, s = module.__dict__.pop("_fold_shape")
        local = out.to_local(grad_placements=out.placements) if isinstance(out, DTensor) else out
        shape = torch.Size((b, s, module.config.vocab_size))
        return DTensor.from_local(local, fm.attn_stage, LOGITS, run_check=False, shape=shape,
                                  stride=torch.empty(shape, device="meta").stride())

    return hook


def _stage_inputs(fm: FoldedMesh):
    f = fm.fold

    def hook(module, args, kwargs):
        x = args[0] if args else kwargs.pop("x")
        if "positions" in kwargs or len(args) > 1:
            raise FoldError("a pipeline stage computes positions itself; pass only its input")
        if module.embed is not None:  # this replica's [b, S] token ids: keep the cp chunks
            check_sequence(x.shape[0] * f.dp, x.shape[1], fm)
            seq, x = x.shape[1], _cp_chunks(x, fm)
        else:  # the residual stream [b, S/(cp·tp), H]
            seq = x.shape[1] * f.cp * f.tp
        kwargs["positions"] = local_positions(seq, fm, x.device)
        return (x,), kwargs

    return hook


def _stage_outputs(module, args, out):
    # the last stage's logits leave as this rank's local block [b, S/cp, V/tp]
    return out.to_local(grad_placements=out.placements) if isinstance(out, DTensor) else out
