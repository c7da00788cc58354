"""Which layers each pipeline stage holds, which stages each pp rank runs, and the split itself.

A model of L layers runs as ``num_stages = pp · stages_per_rank`` stages. By default the
layers are spread so that every stage does about the same work, counting the embedding and
the output head as one layer each (the first and the last stage then hold one layer fewer
than the others); an explicit split (layers per stage) overrides it.

Loop schedules (GPipe, 1F1B, Interleaved1F1B, LoopedBFS, InterleavedZeroBubble) put stage s on
pp rank ``s % pp``; V schedules (ZBVZeroBubble, DualPipeV) put stages r and 2·pp-1-r on rank
r, so that rank 0 holds both the first and the last stage.
"""

from __future__ import annotations

import copy

from .._fold import FoldError
from .._mesh import FoldedMesh
from ..models import Transformer
from ._schedules import check_pipeline, schedule_style


def split_layers(num_layers: int, num_stages: int,
                 layers_per_stage: tuple[int, ...] | list[int] | None = None
                 ) -> list[range]:
    """The global layer indices of every stage, in stage order.

    Args:
        num_layers: L, layers of the whole model.
        num_stages: stages of the pipeline (pp · stages_per_rank).
        layers_per_stage: an explicit split (one count per stage, summing to L); None: the
            balanced default, the embedding and the head weighing one layer each.

    Raises:
        FoldError: the layers cannot be split so that every stage holds at least one.
    """
    if layers_per_stage:
        counts = list(layers_per_stage)
        if len(counts) != num_stages or sum(counts) != num_layers or min(counts) < 1:
            raise FoldError(
                f"pp_layers = {counts} does not split {num_layers} layers over {num_stages} "
                f"stages (pp x pp_stages_per_rank): give {num_stages} counts of at least 1 "
                f"summing to {num_layers}, or leave pp_layers empty for the balanced default"
            )
    else:
        if num_layers < num_stages:
            raise FoldError(
                f"{num_layers} layers cannot be split over {num_stages} pipeline stages "
                f"(pp x pp_stages_per_rank): every stage needs at least one layer; lower pp "
                f"or pp_stages_per_rank, or use a model with at least {num_stages} layers"
            )
        units = num_layers + 2  # the embedding and the head weigh one layer each
        base, extra = divmod(units, num_stages)
        counts = [base + (1 if s < extra else 0) for s in range(num_stages)]
        counts[0] -= 1
        counts[-1] -= 1
        # a short model can leave an end stage empty: take a layer from the largest stage
        for end in (0, num_stages - 1):
            while counts[end] < 1:
                donor = max(range(num_stages), key=lambda s: counts[s])
                counts[donor] -= 1
                counts[end] += 1
        if num_stages == 1:
            counts = [num_layers]
    out, start = [], 0
    for c in counts:
        out.append(range(start, start + c))
        start += c
    return out


def stage_indices(pp_rank: int, pp: int, stages_per_rank: int, style: str) -> list[int]:
    """The stages pp rank ``pp_rank`` runs, in increasing order ("loop" or "v" placement)."""
    if style == "v":
        return sorted(s for i in range(stages_per_rank)
                      for s in [i * pp + (pp_rank if i % 2 == 0 else pp - 1 - pp_rank)])
    return [pp_rank + i * pp for i in range(stages_per_rank)]


def split_model(model: Transformer, fm: FoldedMesh, *, schedule: str = "1F1B",
                stages_per_rank: int | None = None,
                layers_per_stage: tuple[int, ...] | list[int] | None = None
                ) -> list[Transformer]:
    """This pp rank's stages of ``model``, each a ``Transformer`` holding only its layers.

    Call it on the whole model built on the meta device, before ``foldmesh.parallelize``
    (which is then applied to every stage). Every stage keeps the whole model's parameter
    names (``embed``, ``layers.<global index>``, ``norm``, ``lm_head``), so checkpoints and
    Hugging Face names do not depend on pp. The stage index is ``stage.pipeline_stage``.

    Args:
        model: the whole plain model (usually on the meta device; it is copied, not changed).
        fm: the folded mesh; its pp is the number of pipeline ranks.
        schedule: a name from ``foldmesh.pipeline.SCHEDULES``; V schedules place stages in a V.
        stages_per_rank: stages per pp rank (virtual stages); None: 1 for single-stage
            schedules, 2 for the others.
        layers_per_stage: an explicit split (see ``split_layers``).

    Raises:
        FoldError: tied embeddings (they would live on two stages), an unknown schedule, a
            number of stages the schedule cannot run, or layers that do not split.
    """
    cfg = model.config
    pp = fm.fold.pp
    stages_per_rank = check_pipeline(schedule, pp, stages_per_rank, None)
    if cfg.tie_embeddings:
        raise FoldError(
            f"tie_embeddings with pp = {pp}: the embedding lives on the first stage and the "
            "output projection on the last, and foldmesh does not keep two copies in sync; "
            "untie them (ModelConfig.tie_embeddings = False) or set pp = 1"
        )
    if not model.is_whole:
        raise FoldError("split_model takes the whole model, not a stage of it")
    num_stages = pp * stages_per_rank
    layers = split_layers(cfg.num_layers, num_stages, layers_per_stage)
    parts = []
    for s in stage_indices(fm.coordinate("pp"), pp, stages_per_rank, schedule_style(schedule)):
        part = copy.deepcopy(model)
        keep = {str(i) for i in layers[s]}
        for key in [k for k in part.layers if k not in keep]:
            del part.layers[key]
        if s != 0:
            part.embed = None
        if s != num_stages - 1:
            part.norm = None
            part.lm_head = None
        part.pipeline_stage = s
        parts.append(part)
    return parts
