"""Distributed token dispatchers over the folded MoE view.

Dimension legend: n tokens of this rank, H hidden, k top-k, E experts, El = E/ep local
experts, C capacity, P = ep*etp ranks of one ep x etp group, j an ep rank, t an etp rank.

Both dispatchers take this rank's own tokens (the MoE view's ``(S0, S0, S0)`` shard, see
docs/placements.md), run the local experts on their weight shards (experts over ep, FFN over
etp) and return this rank's combined outputs; their results are equal.

``AllToAllDispatcher`` (MoE Parallel Folding, Figure 2):
    permute -> All-to-All-V over ep -> AllGather-V over etp -> regroup (source, expert) chunks
    by expert -> experts -> regroup back -> ReduceScatter-V over etp -> All-to-All-V over ep
    -> unpermute.
The variable-size gather and reduce-scatter over etp are all-to-all-v exchanges (a rank
sends its block to every etp peer; the reduce-scatter sums what comes back), because neither
gloo nor NCCL has a variable-size all-gather or reduce-scatter.

``AllGatherDispatcher``: all-gather tokens, weights and expert ids over ep x etp, compute the
local experts on every gathered token routed to them, reduce-scatter the sums back. No host
synchronisation at all; worth it when ep x etp is small.
"""

from __future__ import annotations

import torch
import torch.distributed._functional_collectives as fc

from .._mesh import FoldedMesh
from ..kernels import permute, sort_chunks, unpermute
from ..kernels._routing import build_routing

# Newer torch renames the *_tensor functional collectives *_single (same signatures).
all_gather = getattr(fc, "all_gather_single", None) or fc.all_gather_tensor
_all_gather_autograd = (
    getattr(fc, "all_gather_single_autograd", None) or fc.all_gather_tensor_autograd
)
_reduce_scatter_autograd = (
    getattr(fc, "reduce_scatter_single_autograd", None) or fc.reduce_scatter_tensor_autograd
)
_all_to_all_autograd = fc.all_to_all_single_autograd


def _contiguous_grad(t: torch.Tensor) -> torch.Tensor:
    """``t``, with the gradient that reaches its autograd node made contiguous.

    Before torch 2.13 the backward of the autograd all-gather and reduce-scatter runs the
    opposite collective on the incoming gradient as it is, and fails ("Expected
    input.is_contiguous()") when that gradient is strided, as ``y.sum()``'s expanded ones
    are. A tensor hook (not a custom Function, whose view outputs could not be modified in
    place) copies only a gradient that is not contiguous already.
    """
    if t.requires_grad:
        t.register_hook(torch.Tensor.contiguous)
    return t


def all_gather_autograd(t: torch.Tensor, dim: int, group) -> torch.Tensor:
    return _contiguous_grad(_ready(_all_gather_autograd(t, dim, group)))


def reduce_scatter_autograd(t: torch.Tensor, op: str, dim: int, group) -> torch.Tensor:
    return _contiguous_grad(_ready(_reduce_scatter_autograd(t, op, dim, group)))


def _ready(t: torch.Tensor) -> torch.Tensor:
    """The plain tensor of a functional collective's result. Functional collectives return
    an ``AsyncCollectiveTensor`` that waits when a torch op first reads it; the Triton
    kernels read its data pointer directly, which the wrapper does not have. ``wait()`` is a
    stream wait (no host synchronisation) and keeps the autograd graph."""
    return t.wait() if isinstance(t, fc.AsyncCollectiveTensor) else t


def all_to_all_autograd(*args, **kwargs) -> torch.Tensor:
    return _ready(_all_to_all_autograd(*args, **kwargs))


class _Dispatcher:
    def __init__(self, fm: FoldedMesh, num_experts: int):
        self.fm = fm
        self.ep, self.etp = fm.fold.ep, fm.fold.etp
        self.num_local = num_experts // self.ep
        self.ep_rank, self.etp_rank = fm.coordinate("ep"), fm.coordinate("etp")
        self.first_expert = self.ep_rank * self.num_local
        self.ep_group = fm["ep"].get_group()
        self.etp_group = fm["etp"].get_group()
        self.ep_etp_group = fm["ep_etp"].get_group()

    def _experts(self, moe, tokens, counts):
        # through the module call, so that hooks on the experts (FSDP's all-gather) run
        return moe.experts(tokens, counts)


class AllToAllDispatcher(_Dispatcher):
    """Figure 2's dispatch; one host synchronisation per layer unless experts are padded."""

    def __call__(self, moe, tokens, probs, indices):
        El, ep, etp = self.num_local, self.ep, self.etp
        cap = moe.capacity_args(tokens)
        counts, dev = self._counts(indices, moe.num_experts, cap)
        j0, t0 = self.ep_rank, self.etp_rank
        send = counts[j0][t0]  # per destination ep rank: El counts
        send_splits = [sum(c) for c in send]
        if cap and not cap["pad_to_capacity"]:
            cap["kept_rows"] = sum(send_splits)  # known from the exchange: no second sync
        perm = permute(tokens, indices, probs, moe.num_experts, **cap)
        recv_splits = [sum(counts[j][t0][j0]) for j in range(ep)]
        # rows for my experts from every source (t, j), ordered t-major as AllGather-V leaves them
        table = dev[:, :, j0, :].transpose(0, 1).reshape(-1)  # [etp * ep * El], [r*El + e]
        local_counts = dev[:, :, j0, :].sum(dim=(0, 1))
        gathered = [sum(sum(counts[j][t][j0]) for j in range(ep)) for t in range(etp)]

        h = perm.tokens
        if ep > 1:
            h = all_to_all_autograd(h, recv_splits, send_splits, self.ep_group)
        if etp > 1:
            m = h.shape[0]
            h = all_to_all_autograd(h.repeat(etp, 1), gathered, [m] * etp, self.etp_group)
        h = sort_chunks(h, table, etp * ep, El)
        y = self._experts(moe, h, local_counts)
        y = sort_chunks(y, table, etp * ep, El, inverse=True)
        if etp > 1:
            m = gathered[t0]
            y = all_to_all_autograd(y, [m] * etp, gathered, self.etp_group)
            y = y.view(etp, m, y.shape[-1]).sum(0)
        if ep > 1:
            y = all_to_all_autograd(y, send_splits, recv_splits, self.ep_group)
        return unpermute(y, perm, probs)

    def _counts(self, indices, num_experts, cap) -> tuple[list, torch.Tensor]:
        """Rows per expert that every ep x etp rank will send: [ep (source j), etp (source t),
        ep (destination), El], on the host and on the device."""
        ep, etp, El = self.ep, self.etp, self.num_local
        if cap and cap["pad_to_capacity"]:
            # every expert holds exactly C rows on every rank: known without communication
            host = torch.full((ep, etp, ep, El), cap["capacity"], dtype=torch.int64)
            return host.tolist(), host.to(indices.device)
        dev = torch.zeros(num_experts, dtype=torch.int64, device=indices.device)
        dev.scatter_add_(0, indices.reshape(-1), torch.ones_like(indices.reshape(-1)))
        if cap:
            dev = dev.clamp(max=cap["capacity"])  # each expert keeps min(count, C) copies
        if ep * etp > 1:
            dev = all_gather(dev, 0, self.ep_etp_group)
        dev = dev.view(ep, etp, ep, El)
        # NOTE: host synchronisation, the layer's only one: the all-to-all split sizes (and,
        # when dropping, the kept-row count) size buffers on the host. pad_to_capacity
        # avoids it.
        return dev.tolist(), dev


class AllGatherDispatcher(_Dispatcher):
    """All-gather over ep x etp, local experts, reduce-scatter back; no host synchronisation."""

    def __call__(self, moe, tokens, probs, indices):
        El, P = self.num_local, self.ep * self.etp
        cap = moe.capacity_args(tokens)
        if cap:
            # each rank drops among its own tokens, exactly as the all-to-all path does; only
            # the kept mask is used, and the padded layout gives the same one without the
            # host synchronisation the unpadded one needs to size its buffer
            routing = build_routing(indices, probs, moe.num_experts, cap["capacity"],
                                    cap["drop_policy"], True)
            kept = routing.row_map >= 0
            probs = probs * kept
            indices = torch.where(kept, indices, moe.num_experts)
        if P > 1:
            g = self.ep_etp_group
            tokens = all_gather_autograd(tokens, 0, g)
            probs_all = all_gather_autograd(probs, 0, g)
            indices = _ready(all_gather(indices, 0, g))
        else:
            probs_all = probs
        # copies for other ranks' experts (and dropped ones) go to a sink group past the local
        # experts: the grouped GEMM leaves its rows zero, so they add nothing when combined
        local = indices - self.first_expert
        local = torch.where((local >= 0) & (local < El), local, El)
        perm = permute(tokens, local, probs_all, El + 1)
        y = self._experts(moe, perm.tokens, perm.counts[:El])
        out = unpermute(y, perm, probs_all)
        if P > 1:
            out = reduce_scatter_autograd(out, "sum", 0, self.ep_etp_group)
        return out
