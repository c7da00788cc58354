"""The fold: two factorizations of the same ranks, checked before any process group exists.

Attention layers see the ranks of one pipeline stage as ``dp x cp x tp`` and MoE layers see
the same ranks as ``edp x ep x etp``. Rank order follows MoE Parallel Folding (and
Megatron-Core's default ``tp-cp-ep-dp-pp``): tp varies fastest, then cp, then dp, and pp is
outermost; in the MoE view etp varies fastest, then ep, then edp. EP therefore folds first
onto TP ranks, then CP, then DP ranks, which keeps its all-to-all inside a node.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

ATTN_AXES = ("pp", "dp", "cp", "tp")
MOE_AXES = ("pp", "edp", "ep", "etp")
INFERRED = -1


class FoldError(ValueError):
    """A fold that cannot be laid out on the ranks; the message names the setting and a fix."""


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class Fold:
    """Parallel degrees of both views.

    Attributes:
        tp: tensor-parallel degree of attention and dense layers (sequence parallel in MoE models).
        cp: context-parallel degree of attention (the sequence is split over cp ranks).
        dp: data-parallel degree of dense parameters; -1 infers ``world / (pp*tp*cp)``.
        pp: pipeline-parallel degree, shared by both views (outermost axis).
        etp: expert-tensor-parallel degree (each expert's FFN dim is split over etp ranks).
        ep: expert-parallel degree (experts are split over ep ranks).
        edp: expert-data-parallel degree; -1 infers ``world / (pp*etp*ep)``.

    Per pipeline stage both views cover the same ranks: ``tp*cp*dp == etp*ep*edp == world/pp``.
    """

    tp: int = 1
    cp: int = 1
    dp: int = INFERRED
    pp: int = 1
    etp: int = 1
    ep: int = 1
    edp: int = INFERRED

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            inferable = f.name in ("dp", "edp")
            if not isinstance(v, int) or isinstance(v, bool):
                raise FoldError(f"Fold.{f.name} must be an int, got {v!r}")
            if v <= 0 and not (inferable and v == INFERRED):
                hint = " (or -1 to infer it from the world size)" if inferable else ""
                raise FoldError(f"Fold.{f.name} must be a positive integer{hint}, got {v}")
        if self.dp != INFERRED and self.edp != INFERRED:
            self._check_products()

    # ------------------------------------------------------------------ derived sizes
    @property
    def resolved(self) -> bool:
        return self.dp != INFERRED and self.edp != INFERRED

    @property
    def world_size(self) -> int:
        """Ranks the fold covers; only defined once dp and edp are known."""
        self._require_resolved("world_size")
        return self.pp * self.tp * self.cp * self.dp

    @property
    def stage_size(self) -> int:
        """Ranks per pipeline stage, ``tp*cp*dp == etp*ep*edp``."""
        self._require_resolved("stage_size")
        return self.tp * self.cp * self.dp

    def attn_sizes(self) -> tuple[int, int, int, int]:
        """Sizes of the attention view's axes, in ``ATTN_AXES`` order (pp, dp, cp, tp)."""
        self._require_resolved("attn_sizes")
        return (self.pp, self.dp, self.cp, self.tp)

    def moe_sizes(self) -> tuple[int, int, int, int]:
        """Sizes of the MoE view's axes, in ``MOE_AXES`` order (pp, edp, ep, etp)."""
        self._require_resolved("moe_sizes")
        return (self.pp, self.edp, self.ep, self.etp)

    def size(self, axis: str) -> int:
        """Degree of one named axis (``"tp"``, ``"ep"``, ...)."""
        if axis not in ATTN_AXES + MOE_AXES:
            raise FoldError(f"unknown axis {axis!r}; axes are {sorted(set(ATTN_AXES + MOE_AXES))}")
        return getattr(self, axis)

    # ------------------------------------------------------------------ resolution
    def resolve(self, world_size: int) -> Fold:
        """Fill in inferred degrees for ``world_size`` ranks and check that everything fits.

        Raises:
            FoldError: the world is not divisible by a fixed product, the two views cover a
                different number of ranks, or the fold's ranks differ from ``world_size``.
        """
        if not isinstance(world_size, int) or world_size <= 0:
            raise FoldError(f"world size must be a positive integer, got {world_size!r}")
        dp, edp = self.dp, self.edp
        if dp == INFERRED:
            dp = self._infer(world_size, "dp", {"pp": self.pp, "tp": self.tp, "cp": self.cp})
        if edp == INFERRED:
            edp = self._infer(world_size, "edp", {"pp": self.pp, "etp": self.etp, "ep": self.ep})
        fold = dataclasses.replace(self, dp=dp, edp=edp)
        if fold.world_size != world_size:
            raise FoldError(
                f"the fold covers pp*tp*cp*dp = {fold.pp}*{fold.tp}*{fold.cp}*{fold.dp} = "
                f"{fold.world_size} ranks but the world has {world_size}; launch "
                f"{fold.world_size} ranks or set dp=-1 to infer it"
            )
        return fold

    def _infer(self, world: int, name: str, fixed: dict[str, int]) -> int:
        prod = 1
        for v in fixed.values():
            prod *= v
        if world % prod:
            expr = "*".join(fixed)
            vals = "*".join(str(v) for v in fixed.values())
            raise FoldError(
                f"cannot infer {name}: world size {world} is not divisible by {expr} = {vals} = "
                f"{prod}; choose degrees whose product divides {world} "
                f"(divisors: {_divisors(world)})"
            )
        return world // prod

    def _check_products(self) -> None:
        attn = self.tp * self.cp * self.dp
        moe = self.etp * self.ep * self.edp
        if attn == moe:
            return
        hint = ""
        if attn % (self.etp * self.ep) == 0:
            hint = f"; set edp={attn // (self.etp * self.ep)}"
        elif moe % (self.tp * self.cp) == 0:
            hint = f"; set dp={moe // (self.tp * self.cp)}"
        raise FoldError(
            f"attention ranks per stage tp*cp*dp = {self.tp}*{self.cp}*{self.dp} = {attn} but "
            f"MoE ranks per stage etp*ep*edp = {self.etp}*{self.ep}*{self.edp} = {moe}{hint}"
        )

    def _require_resolved(self, what: str) -> None:
        if not self.resolved:
            raise FoldError(
                f"Fold.{what} needs dp and edp; call fold.resolve(world_size) first "
                f"(got dp={self.dp}, edp={self.edp})"
            )

    # ------------------------------------------------------------------ model-dependent checks
    def check_experts(self, num_experts: int) -> None:
        """Raise FoldError unless ``num_experts`` splits evenly over ep."""
        if num_experts <= 0 or num_experts % self.ep:
            ok = [d for d in _divisors(max(num_experts, 1)) if d <= max(num_experts, 1)]
            raise FoldError(
                f"num_experts = {num_experts} is not divisible by ep = {self.ep}; choose ep "
                f"from {ok} or a number of experts divisible by {self.ep}"
            )

    def check_expert_ffn(self, ffn_size: int) -> None:
        """Raise FoldError unless the experts' FFN size splits evenly over etp."""
        if ffn_size <= 0 or ffn_size % self.etp:
            raise FoldError(
                f"expert FFN size = {ffn_size} is not divisible by etp = {self.etp}; choose etp "
                f"from {_divisors(max(ffn_size, 1))} or an FFN size divisible by {self.etp}"
            )

    def build(self, device_type: str = "cpu"):
        """Create the folded mesh on an initialized process group (``build_folded_mesh``)."""
        from ._mesh import build_folded_mesh

        return build_folded_mesh(self, device_type)

    def __str__(self) -> str:
        d = "?" if self.dp == INFERRED else self.dp
        e = "?" if self.edp == INFERRED else self.edp
        return (
            f"Fold(attn: pp{self.pp} dp{d} cp{self.cp} tp{self.tp} | "
            f"moe: pp{self.pp} edp{e} ep{self.ep} etp{self.etp})"
        )
