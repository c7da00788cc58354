"""Pipeline parallelism on the fold: the model split by layers into stages, each stage
parallelized over its pp stage's ranks, run by torch.distributed.pipelining's schedules.

    parts = split_model(model, fm, schedule="1F1B")           # this pp rank's stages
    for part in parts:
        foldmesh.parallelize(part, fm)                        # TP+SP, CP, MoE fold, AC
        part.to_empty(device=device)
        part.init_weights(seed=0)                             # same values as the whole model
        foldmesh.apply_fsdp(part, fm, reshard_after_forward=False)   # or replication
    pipe = apply_pipeline(parts, fm, schedule="1F1B", microbatches=4, microbatch_size=2,
                          seq_len=S)
    loss = pipe.step(ids, labels)                             # this replica's [b, S] rows
    foldmesh.clip_grad_norm_(parts, fm, 1.0)                  # every stage counted once

docs/pipeline.md describes the placements, what crosses a stage boundary and the memory of
each schedule.
"""

from ._pipeline import Pipeline, apply_pipeline
from ._schedules import SCHEDULES, check_pipeline
from ._split import split_layers, split_model, stage_indices

__all__ = [
    "SCHEDULES",
    "Pipeline",
    "apply_pipeline",
    "check_pipeline",
    "split_layers",
    "split_model",
    "stage_indices",
]
