"""The planner's view of a trainer config: ``python -m foldmesh.train --plan``."""

from __future__ import annotations

from .._fold import Fold
from ..pipeline._schedules import check_pipeline
from ._workload import Layout, Workload


def from_train_config(cfg, world_size: int, device_type: str = "cuda"
                      ) -> tuple[Workload, Layout]:
    """The ``Workload`` and ``Layout`` a ``foldmesh.train.TrainConfig`` runs on
    ``world_size`` ranks (``device_type`` decides what ``training.dtype = "auto"`` means)."""
    from ..train._config_check import model_config

    f, t = cfg.fold, cfg.training
    fold = Fold(tp=f.tp, cp=f.cp, dp=f.dp, pp=f.pp, ep=f.ep, etp=f.etp,
                edp=f.edp).resolve(world_size)
    dtype = t.dtype if t.dtype != "auto" else ("bf16" if device_type == "cuda" else "fp32")
    mc = model_config(cfg)
    workload = Workload(model=mc, global_batch=t.global_batch, seq_len=cfg.data.seq_len,
                        compute_dtype=dtype, pad_to_capacity=mc.pad_to_capacity,
                        dispatcher=f.dispatcher)
    rows = t.global_batch // fold.dp
    stages = 1
    if fold.pp > 1:
        stages = check_pipeline(f.pp_schedule, fold.pp, f.pp_stages_per_rank or None, None)
    layout = Layout(fold=fold, micro_batch=t.micro_batch or rows, schedule=f.pp_schedule,
                    stages_per_rank=stages, activation_checkpoint=f.activation_checkpoint,
                    data_parallel=f.data_parallel,
                    pp_layers=tuple(f.pp_layers) if fold.pp > 1 else ())
    return workload, layout
