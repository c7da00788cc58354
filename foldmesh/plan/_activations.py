"""Activation memory per rank: what foldmesh's own layers keep for backward, and for how many
micro-batches a pipeline schedule keeps it.

Dimension legend (per rank, one micro-batch): b sequences (``Layout.micro_batch``), S
sequence, L = S/cp the rank's tokens in attention (after the all-gather over tp), s = L/tp
its sequence-parallel shard between blocks, T = b·s MoE tokens, H hidden, D head size,
hq = Hq/tp and hkv = Hkv/tp local heads, V/tp the vocabulary slice, E experts, k top-k,
El = E/ep local experts, F' = F/etp the expert FFN shard, C the capacity per expert
(``foldmesh.kernels.capacity_for``), N rows of the rank's permuted buffer (E·C padded, T·k
dropless), R = etp·N rows its local experts compute, a the bytes of one activation.

Every term is a tensor the code keeps alive from a micro-batch's forward to its backward:
what autograd saves (``saved_tensors_hooks`` sees exactly these; the CPU tests measure them),
plus what the training loop holds (the logits until the loss's backward, a pipeline stage's
output in torch's ``fwd_cache``). Weights are not counted (the experts' gate and up GEMMs save the
parameters themselves, not a concatenated copy), except autocast's bf16 copies of the
weights (``autocast_weights``, once per rank). A view counts as its whole
storage, once. Outside the per-micro-batch bytes: torch's pipeline receive buffers, one per
micro-batch of the step (``pipeline_buffers``).

Two regimes: "pure" (FSDP2's ``param_dtype`` = compute dtype, or fp32) keeps every
activation in the compute dtype, with RMSNorm and RoPE computing in fp32 inside; replication
with bf16 runs under ``torch.autocast`` (the trainer's ``_autocast``, on CUDA and CPU), where
the residual stream, the norms and the router stay fp32, each linear layer saves its own
bf16 copy of its input, and the MoE layer casts its routed tokens to bf16 once: the dispatch
and the experts run in bf16, and the experts' GEMMs save the bf16 copies of their weights
(one per micro-batch, counted in the "moe" term). ``backend`` picks the kernels: "cuda" (Triton
permute/unpermute/grouped GEMM/SwiGLU, flash attention: what an H100 run saves) or "cpu"
(the torch reference kernels and CPU SDPA the CPU tests run). docs/planner_activations.md has
the per-term table and what was measured.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..kernels import capacity_for
from ..pipeline._schedules import SCHEDULES, check_pipeline, schedule_style
from ..pipeline._split import split_layers, stage_indices
from ._workload import Layout, Workload, rank_coordinates

PARTS = ("attention", "moe", "dispatch", "dense_mlp", "embedding",
         "head_loss", "checkpoint_inputs", "pipeline")
BACKENDS = ("cuda", "cpu")
F32, I64 = 4, 8
ROUTER_BYTES = {"fp32": 4, "fp64": 8}


@dataclass(frozen=True)
class ActivationMemory:
    """Activation bytes of one rank (see the module docstring for what is counted).

    Attributes:
        per_microbatch: kept by ONE micro-batch's forward through ALL of this rank's stages,
            from the end of its forward until its backward.
        by_part: the same split by term (keys from ``PARTS``; zero terms omitted).
        recompute_peak: with ``activation_checkpoint="full"``, what the recomputed forward
            of this rank's largest block keeps during that block's backward; 0 otherwise.
        inflight: micro-batches (in units of all this rank's stages) whose activations are
            alive at once at the schedule's peak (``inflight_microbatches``); 1 without pp.
        pipeline_buffers: torch's per-micro-batch receive buffers (activations in, gradients
            back), allocated for every micro-batch of the step and kept for the whole step.
        autocast_weights: under autocast (replication in bf16 on CUDA), the bf16 copies of
            the rank's dense weights that the linear layers save; autocast caches one per
            weight for its context (the whole step with pp, one micro-batch without).
        total: the peak, ``per_microbatch * inflight + recompute_peak + pipeline_buffers
            + autocast_weights``.
    """

    per_microbatch: int
    by_part: dict[str, int] = field(hash=False)
    recompute_peak: int
    inflight: float
    pipeline_buffers: int
    autocast_weights: int
    total: int


# ---------------------------------------------------------------------------- pipeline


def inflight_chunks(schedule: str, pp: int, stages_per_rank: int, microbatches: int,
                    pp_rank: int) -> int:
    """Stage-chunks (one micro-batch through one stage) whose forward has run and whose
    backward (weight-gradient step for zero-bubble schedules, which keep the graph until
    then) has not, at the worst moment on pp rank ``pp_rank``. From torch 2.13's
    ``torch/distributed/pipelining/schedules.py``; tests/plan checks every formula against
    the ``pipeline_order`` tables torch builds.

    - GPipe: all n forwards run before the first backward (``ScheduleGPipe``).
    - 1F1B: ``warmup_chunks = min(n, num_stages - stage_index)`` forwards, then one
      backward before each further forward (``Schedule1F1B._step_microbatches``).
    - LoopedBFS: every forward of every local stage before any backward: n·v.
    - Interleaved1F1B: ``_get_warmup_ops(multiply_factor=2)`` warm-up forwards,
      ``(v - 1)·m + 2·(pp - 1 - r)`` capped at n·v, with m = n / max(1, n // pp) the
      micro-batches per round; the steady state runs its forward before its backward: +1.
    - InterleavedZeroBubble: warm-up ``(v - 1)·m + (pp - 1 - r)`` (multiply_factor=1);
      ``_get_1f1b_rank_ops`` defers weight steps by ``num_1f1b_microbatches = r`` steady
      steps, so the count grows by one more per step for r steps: w + 1 + min(f - 1, r),
      with f = n·v - w steady forwards (w when f = 0).
    - ZBVZeroBubble: warm-up 2(pp - r) - 1 forwards of the first stage, then r of each,
      then F/I/W of the second stage (``_calculate_single_rank_operations``): peak
      min(2·pp, 2·n, n + 1 + r).
    - DualPipeV: 2·(pp - r - 1) + 2·(r + 1) = 2·pp warm-up forwards, then each overlapped
      F;B runs its forward first: 2·pp + 1.
    """
    n, v, r = microbatches, stages_per_rank, pp_rank
    if pp == 1:
        return 1
    if schedule == "GPipe":
        return n
    if schedule == "1F1B":
        return min(n, pp - r)
    if schedule == "LoopedBFS":
        return n * v
    if schedule in ("Interleaved1F1B", "InterleavedZeroBubble"):
        per_round = n // max(1, n // pp)
        factor = 2 if schedule == "Interleaved1F1B" else 1
        warmup = min((v - 1) * per_round + factor * (pp - 1 - r), n * v)
        steady = n * v - warmup
        if steady == 0:
            return warmup
        return warmup + 1 + (0 if factor == 2 else min(steady - 1, r))
    if schedule == "ZBVZeroBubble":
        return min(2 * pp, 2 * n, n + 1 + r)
    if schedule == "DualPipeV":
        return min(2 * pp + 1, 2 * n)
    raise ValueError(f"unknown pipeline schedule {schedule!r}; choose one of {list(SCHEDULES)}")


def inflight_microbatches(schedule: str, pp: int, stages_per_rank: int, microbatches: int,
                          pp_rank: int) -> float:
    """``inflight_chunks`` in units of one micro-batch through all of the rank's
    ``stages_per_rank`` stages (exact when its stages keep equal bytes)."""
    v = stages_per_rank if pp > 1 else 1
    return inflight_chunks(schedule, pp, v, microbatches, pp_rank) / v


# ---------------------------------------------------------------------------- sizes


@dataclass(frozen=True)
class _Regime:
    """Bytes of each kind of saved tensor (see the module docstring)."""

    act: int  # compute dtype: linear inputs/outputs, attention, MLP intermediates
    resid: int  # residual stream, RMSNorm inputs and outputs, stage boundaries
    moe: int  # routed tokens and the expert GEMMs
    autocast: bool  # each linear saves its own cast of its input
    backend: str


def _regime(workload: Workload, layout: Layout, backend: str) -> _Regime:
    a = workload.act_bytes
    if layout.data_parallel == "replicate" and a < F32:
        # torch.autocast: fp32 weights and residual stream, bf16 matmuls; the MoE layer
        # casts its routed tokens to bf16 itself (foldmesh.moe.layer.token_dtype)
        return _Regime(act=a, resid=F32, moe=a, autocast=True, backend=backend)
    return _Regime(act=a, resid=a, moe=a, autocast=False, backend=backend)


def _norm(rows: int, width: int, in_bytes: int, out_bytes: int) -> int:
    """RMSNorm: its fp32 input (the input itself when fp32, else a copy), the fp32 rstd
    [rows, 1], and the normed values before the weight, in the output dtype."""
    return rows * width * max(in_bytes, F32) + rows * F32 + rows * width * out_bytes


class _Shapes:
    def __init__(self, workload: Workload, layout: Layout):
        cfg, f = workload.model, layout.fold
        self.cfg, self.fold = cfg, f
        self.b, self.S = layout.micro_batch, workload.seq_len
        self.L = self.S // f.cp
        self.s = self.L // f.tp
        self.T = self.b * self.s
        self.D = cfg.resolved_head_dim
        self.hq, self.hkv = cfg.num_heads // f.tp, cfg.num_kv_heads // f.tp
        e, k = cfg.num_experts, cfg.topk
        self.El, self.Fe = e // f.ep, cfg.expert_ffn_size // f.etp
        if cfg.capacity_factor is None:
            self.N = self.T * k
        else:
            cap = capacity_for(self.T, e, k, cfg.capacity_factor)
            # padded: exactly C rows per expert; dropping with balanced routing: min(T·k/E, C)
            self.N = e * cap if workload.pad_to_capacity else min(self.T * k, e * cap)
        self.R = f.etp * self.N  # after the all-gather over etp (see moe/_dispatch.py)


def _mla_attention(z: _Shapes, p: _Regime) -> int:
    """Multi-head Latent Attention (cp = 1; ``foldmesh.models.mla``, ``_mla_plan``):
    the down-projections save this rank's x [b, s, H], the up-projections the gathered
    latents [b, L, R]; both latent norms save as RMSNorm does (kv_a_norm reads c as a view
    of kv_a_proj's gathered output: in fp32 that whole [b, L, Rkv + Dr] storage); SDPA
    saves q, k [b, hq, L, Dn + Dr], v (a view of kv_b_proj's output [b, L, hq·(Dn + Dv)]),
    its output [b, hq, L, Dv] (o_proj's input is a view) and the log-sum-exp."""
    cfg, tp = z.cfg, z.fold.tp
    b, s, L, H, hq = z.b, z.s, z.L, cfg.hidden_size, z.hq
    rkv, dn, dr, dv = cfg.kv_lora_rank, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, \
        cfg.v_head_dim
    a = p.act
    out = _norm(b * s, H, p.resid, p.resid)  # attn_norm
    if cfg.q_lora_rank is None:
        # q_proj saves the gathered x, kv_a_proj this rank's x (one tensor at tp = 1);
        # under autocast each saves its own cast
        out += b * L * H * a + (b * s * H * a if tp > 1 or p.autocast else 0)
    else:
        rq = cfg.q_lora_rank
        out += (2 if p.autocast else 1) * b * s * H * a  # q_a_proj and kv_a_proj
        out += _norm(b * s, rq, a, a) + b * L * rq * a  # q_a_norm, q_b_proj's input
    out += 4 * L * dr * F32  # RoPE's cos and sin [L, Dr], for q and for the shared key
    c_input = b * L * (rkv + dr) * F32 if a == F32 else b * L * rkv * F32
    out += c_input + b * L * F32 + b * L * rkv * a  # kv_a_norm
    out += b * L * rkv * a  # kv_b_proj's input
    q = b * hq * L * (dn + dr) * a
    return out + 2 * q + b * L * hq * (dn + dv) * a + b * hq * L * dv * a + b * hq * L * F32


def _attention(z: _Shapes, p: _Regime, cp_rank: int) -> int:
    cfg, f = z.cfg, z.fold
    if cfg.is_mla:
        return _mla_attention(z, p)
    b, L, D, hq, hkv = z.b, z.L, z.D, z.hq, z.hkv
    out = _norm(b * z.s, cfg.hidden_size, p.resid, p.resid)  # attn_norm
    # q/k/v projections save their input [b, L, H]: one tensor (the all-gathered norm
    # output, or the norm output at tp = 1) shared by the three; under autocast each casts
    out += (3 if p.autocast else 1) * b * L * cfg.hidden_size * p.act
    if cfg.qk_norm:
        out += _norm(b * L * hq, D, p.act, p.act) + _norm(b * L * hkv, D, p.act, p.act)
    out += 4 * L * D * F32  # RoPE: x*cos and rot*sin save cos and sin [L, D], for q and k
    q = b * hq * L * D * p.act
    lse = b * hq * L * F32
    if f.cp == 1:
        # SDPA (flash on CUDA, CPU flash on CPU) saves q, k, v, out and logsumexp; the
        # o_proj input is a view of out
        return out + 2 * q + 2 * b * hkv * L * D * p.act + lse
    # context parallel: K and V all-gathered to [b, hkv, S, D] and kept; per chunk SDPA
    # saves its out and lse; torch.cat + transpose copies the o_proj input [b, L, hq·D]
    out += q + 2 * b * hkv * z.S * D * p.act + q + lse + b * L * hq * D * p.act
    if p.backend == "cpu":
        # no lower-right causal kernel on CPU: the chunk that sees n > c keys runs with a
        # materialised float mask [c, n], which CPU SDPA saves
        c = L // 2
        for j in (cp_rank, 2 * f.cp - 1 - cp_rank):
            if j > 0:
                out += c * (j + 1) * c * p.act
    return out


def _dense_mlp(z: _Shapes, p: _Regime) -> int:
    cfg = z.cfg
    rows = z.b * z.L
    out = _norm(z.T, cfg.hidden_size, p.resid, p.resid)  # ffn_norm
    out += (2 if p.autocast else 1) * rows * cfg.hidden_size * p.act  # gate/up input
    # silu saves gate, the product saves silu(gate) and up, down_proj saves the product
    return out + 4 * rows * (cfg.ffn_size // z.fold.tp) * p.act


def _moe(z: _Shapes, p: _Regime) -> dict[str, int]:
    cfg, f = z.cfg, z.fold
    H, T, k, E, N, R, Fe = cfg.hidden_size, z.T, cfg.topk, cfg.num_experts, z.N, z.R, z.Fe
    rb = ROUTER_BYTES[cfg.router_dtype]
    m = p.moe
    moe = _norm(T, H, p.resid, p.resid)  # ffn_norm; its output y [T, H] is the MoE's input
    # router, with autocast off (moe/router.py): logits = y.to(router dtype) @ w.t(); the
    # matmul saves its input (y itself when the dtypes agree) and a cast copy of the weight
    # when the parameter dtype (fp32 under autocast) differs
    param = F32 if p.autocast else p.act
    moe += T * H * rb
    y_saved = p.resid == rb
    moe += E * H * rb if param != rb else 0
    sm = lb = rb
    # gather saves its full input (the logits, or the softmax over E when Qwen-style) and
    # the indices; Mixtral-style softmax over the k chosen saves its result
    moe += T * E * lb + T * k * I64
    if not cfg.softmax_over_all:
        moe += T * k * sm
    if cfg.normalize_topk:
        moe += (0 if not cfg.softmax_over_all else T * k * rb) + T * rb
    if cfg.aux_loss_coeff > 0:
        moe += T * E * rb  # balance scores: a second softmax over E
    if cfg.z_loss_coeff > 0:
        moe += (T * E * rb if cfg.softmax_over_all else 0) + T * rb  # logsumexp
    # routed experts: the grouped GEMMs save their inputs (sorted tokens [R, H] and the
    # product [R, F']) and the SwiGLU its input h [R, 2F']; the torch reference SwiGLU also
    # saves silu(gate) [R, F'] (and computes 16-bit inputs in fp32)
    if p.backend == "cuda":
        moe += R * H * m + R * 2 * Fe * m + R * Fe * m + z.El * I64  # + the GEMMs' offsets
    else:
        moe += R * H * m + R * 2 * Fe * max(m, F32) + R * Fe * max(m, F32) + R * Fe * m
    if param != m:  # the GEMMs save the weights' per-micro-batch casts (w_gate, w_up, w_down)
        moe += 3 * z.El * H * Fe * m
    # the shared expert reads the routed tokens: y itself, or its cast to m under autocast
    routed_is_y, routed_saved = m == p.resid, False
    if cfg.shared_ffn_size:
        fs = cfg.shared_ffn_size
        if f.tp > 1:  # all-gathered over tp, saved once by gate_proj and up_proj
            moe += f.tp * T * H * m
        elif not routed_is_y:
            moe += T * H * m
            routed_saved = True
        elif not y_saved:
            moe += T * H * p.resid
            y_saved = True
        moe += 4 * T * fs * p.act
        if cfg.shared_gate:  # sigmoid(gate(y)) * mlp(y): y, the sigmoid and the MLP output
            if not routed_is_y and not routed_saved:
                moe += T * H * m
            elif routed_is_y and not y_saved:
                moe += T * H * p.resid
            moe += T * p.act + T * H * p.act
    # dispatch: routing indices and the rows the combine reads back
    if p.backend == "cuda":
        # Triton permute saves row_map [T, k]; unpermute saves the combine weights, row_map,
        # row_copy [N] (a view of N + 1 slots when a capacity is set) and the expert outputs
        # y [N, H]; sort_chunks its split sizes [etp·E]. The weights (the router's fp32
        # output, never cast) are already counted unless normalised or taken from a softmax
        # over E.
        spare = 1 if cfg.capacity_factor is not None else 0
        dispatch = T * k * I64 + (N + spare) * I64 + N * H * m + f.etp * E * I64
        if cfg.softmax_over_all or cfg.normalize_topk:
            dispatch += T * k * F32
    else:
        # index_select saves its index: permute [N], two chunk sorts [R]; the combine's bmm
        # saves the gathered rows [T·k, H] and weights [T·k] (fp32 for 16-bit), plus the
        # kept mask [T·k] when a capacity is set
        acc = max(m, F32)
        dispatch = N * I64 + 2 * R * I64 + T * k * I64 + T * k * H * acc + T * k * acc
        if cfg.capacity_factor is not None:
            dispatch += T * k
    return {"moe": moe, "dispatch": dispatch}


def _block(z: _Shapes, p: _Regime, layer: int, cp_rank: int) -> dict[str, int]:
    out = {"attention": _attention(z, p, cp_rank)}
    if z.cfg.is_moe(layer):
        out.update(_moe(z, p))
    else:
        out["dense_mlp"] = _dense_mlp(z, p)
    return out


def _cast_weights(z: _Shapes, layer: int) -> int:
    """Elements of the weights of one block that its linear layers use: what autocast casts
    to bf16 and caches (the router runs with autocast off; the experts cast their own weights
    per micro-batch, counted in the "moe" term)."""
    cfg, tp = z.cfg, z.fold.tp
    h, d = cfg.hidden_size, z.D
    # (biases are cast too, but addmm's backward does not save them)
    if cfg.is_mla:
        hq, qk = cfg.num_heads // tp, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        rkv, dr = cfg.kv_lora_rank, cfg.qk_rope_head_dim
        out = (h * hq * qk if cfg.q_lora_rank is None
               else cfg.q_lora_rank * (h + hq * qk))  # q_proj, or q_a_proj and q_b_proj
        out += h * (rkv + dr) + rkv * hq * (cfg.qk_nope_head_dim + cfg.v_head_dim)
        out += hq * cfg.v_head_dim * h  # o_proj
    else:
        out = h * (2 * cfg.num_heads + 2 * cfg.num_kv_heads) * d // tp
    if not cfg.is_moe(layer):
        return out + 3 * h * cfg.ffn_size // tp
    if cfg.shared_ffn_size:
        out += 3 * h * cfg.shared_ffn_size // tp + (h if cfg.shared_gate else 0)
    return out


def _embedding(z: _Shapes) -> int:
    return z.b * z.L * I64  # the token ids the (vocab-parallel) embedding saves


def _head(z: _Shapes, p: _Regime) -> int:
    cfg, n = z.cfg, z.b * z.L
    vt = cfg.vocab_size // z.fold.tp
    out = _norm(z.T, cfg.hidden_size, p.resid, p.resid)  # final norm
    out += n * cfg.hidden_size * p.act  # lm_head input (all-gathered over tp)
    out += n * vt * p.act  # the logits, held until the loss's backward
    # vocab-parallel cross-entropy (foldmesh/loss.py) saves exp(z - max) [n, V/tp] fp32 and
    # per token its sum (fp32), the target index (int64) and two bool masks
    # (the sum and the target's logit are all-reduced as one stacked [2, n] tensor at tp > 1)
    return out + n * vt * F32 + n * (F32 * (2 if z.fold.tp > 1 else 1) + I64 + 2)


# ---------------------------------------------------------------------------- the estimate


def activation_memory(workload: Workload, layout: Layout, rank: int = 0, *,
                      backend: str = "cuda") -> ActivationMemory:
    """Activation memory of global ``rank`` for ``workload`` under ``layout``.

    Args:
        workload: the model, sequence length and compute dtype.
        layout: the fold, micro-batch, schedule, stages per rank, activation checkpointing
            and data-parallel mode.
        rank: the global rank (its pp coordinate picks the stages, its cp coordinate the
            attention chunks).
        backend: "cuda" (Triton kernels and flash attention) or "cpu" (torch reference
            kernels and CPU SDPA, what the CPU tests measure).

    Raises:
        FoldError: a schedule the stages or micro-batches do not fit, a batch that does not
            split, or a rank outside the fold.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    f, cfg = layout.fold, workload.model
    coord = rank_coordinates(f, rank)
    n = layout.microbatches(workload)
    p = _regime(workload, layout, backend)
    z = _Shapes(workload, layout)
    if f.pp > 1:
        v = check_pipeline(layout.schedule, f.pp, layout.stages_per_rank, n)
        num_stages = f.pp * v
        mine = stage_indices(coord["pp"], f.pp, v, schedule_style(layout.schedule))
    else:
        v, num_stages, mine = 1, 1, [0]
    layers = split_layers(cfg.num_layers, num_stages, layout.pp_layers or None)
    full_ac = layout.activation_checkpoint == "full"
    boundary = z.T * cfg.hidden_size * p.resid  # one residual-stream block [b, s, H]

    parts = dict.fromkeys(PARTS, 0)
    recompute, buffers, casts = 0, 0, 0
    for st in mine:
        first, last = st == 0, st == num_stages - 1
        for layer in layers[st]:
            casts += _cast_weights(z, layer)
            block = _block(z, p, layer, coord["cp"])
            saved = sum(block.values())
            if full_ac:
                # checkpoint_wrapper keeps the block's input; in fp32 attn_norm saves that
                # same tensor, so the replay adds everything else
                parts["checkpoint_inputs"] += boundary
                recompute = max(recompute, saved - (boundary if p.resid == F32 else 0))
            else:
                for key, val in block.items():
                    parts[key] += val
        if full_ac:  # the positions, shared by the blocks: a view of sequence_order's [S]
            parts["checkpoint_inputs"] += z.S * I64
        if first:
            parts["embedding"] += _embedding(z)
        if last:
            parts["head_loss"] += _head(z, p)
            casts += cfg.vocab_size // f.tp * cfg.hidden_size
        if f.pp > 1:
            if not first:
                # the received input lives in torch's receive buffer (counted below); in
                # fp32 (or as a checkpoint input) the first block's norm keeps that tensor
                if full_ac:
                    parts["checkpoint_inputs"] -= boundary
                elif p.resid == F32 and layers[st]:
                    parts["attention"] -= boundary
                buffers += n * boundary
            if not last:
                parts["pipeline"] += boundary  # the stage output, in torch's fwd_cache
                buffers += n * boundary  # the gradient receive buffers
    per_mb = sum(parts.values())
    inflight = inflight_microbatches(layout.schedule, f.pp, v, n, coord["pp"])
    casts = casts * p.act if p.autocast else 0
    total = round(per_mb * inflight) + recompute + buffers + casts
    return ActivationMemory(per_microbatch=per_mb,
                            by_part={k: val for k, val in parts.items() if val},
                            recompute_peak=recompute, inflight=inflight,
                            pipeline_buffers=buffers, autocast_weights=casts, total=total)
