"""``validate_config``: every setting checked against the others and the world size, before
any process group, model or data exists.

The checks mirror what would fail later, deep inside a run: ``Fold.resolve`` (the fold on
the ranks), ``check_sequence`` (batch over dp, sequence over cp and tp), ``check_model``
(model sizes over tp, ep and etp) and the data sources. Here each error names the
``section.field`` to change, and the model's fields as ``model.overrides.<field>``.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from .._fold import Fold, FoldError
from ..models import PRESETS, ModelConfig
from ..pipeline import check_pipeline, split_layers
from ._config_io import ConfigError, check_overrides, config_from_dict, config_to_dict, did_you_mean
from ._dashboards import check_dashboards
from ._profiling import check_profile
from ._sources import BYTE_VOCAB
from .config import TrainConfig

CHOICES: dict[str, tuple[str, ...]] = {
    "fold.dispatcher": ("alltoall", "allgather"),
    "fold.data_parallel": ("fsdp", "replicate"),
    "fold.activation_checkpoint": ("none", "full"),
    "data.source": ("stdlib", "tokens", "text", "corpus", "prepared"),
    "data.sampling": ("epochs", "replacement"),
    "data.dtype": ("uint16", "uint32"),
    "training.dtype": ("auto", "bf16", "fp32"),
    "training.on_nonfinite": ("stop", "skip"),
    "training.device": ("auto", "cpu", "cuda"),
}
"""The allowed values of each string setting that is a choice."""

RANGES: dict[str, tuple[object, str]] = {
    "data.seq_len": (lambda v: v >= 1, "at least 1"),
    # data.py takes the last val_fraction as validation: both splits must hold tokens
    "data.val_fraction": (lambda v: 0 < v < 1, "strictly between 0 and 1"),
    "data.max_bytes": (lambda v: v >= 1, "at least 1"),
    "optimizer.lr": (lambda v: v > 0, "positive"),
    "optimizer.min_lr_ratio": (lambda v: 0 <= v <= 1, "between 0 and 1"),
    "optimizer.warmup_steps": (lambda v: v >= 0, "0 or more"),
    "optimizer.weight_decay": (lambda v: v >= 0, "0 or more"),
    "optimizer.beta1": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "optimizer.beta2": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "optimizer.eps": (lambda v: v > 0, "positive"),
    "optimizer.grad_clip": (lambda v: v >= 0, "0 (off) or positive"),
    "training.steps": (lambda v: v >= 1, "at least 1"),
    "training.global_batch": (lambda v: v >= 1, "at least 1"),
    "training.micro_batch": (lambda v: v >= 0, "0 (no accumulation) or positive"),
    "training.val_every": (lambda v: v >= 0, "0 (never) or positive"),
    "training.val_batches": (lambda v: v >= 1, "at least 1"),
    "training.stop_after": (lambda v: v >= 0, "0 (run to training.steps) or positive"),
    "training.fail_at_step": (lambda v: v >= 0, "0 (off) or positive"),
    "checkpoint.every": (lambda v: v >= 0, "0 (only at the end) or positive"),
    "checkpoint.keep": (lambda v: v >= 1, "at least 1"),
    "metrics.log_every": (lambda v: v >= 1, "at least 1"),
}
"""Numeric settings and the values they allow (NaN fails every comparison, so it is caught)."""


def _get(cfg: TrainConfig, key: str):
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _hf_model_config(path: str) -> ModelConfig:
    from ..hf import CheckpointError, config_from_hf
    from ..hf._load import read_config

    try:
        return config_from_hf(read_config(Path(path)))[0]
    except CheckpointError as e:
        raise ConfigError(f"model.hf_path = {path!r}: {e}") from None


def model_config(cfg: TrainConfig) -> ModelConfig:
    """The model's ``ModelConfig``: ``model.preset`` (or, when set, ``model.hf_path``'s
    config.json) with ``model.overrides`` applied. Raises ``ConfigError`` naming the setting."""
    m = cfg.model
    overrides = check_overrides(m.overrides)
    if m.hf_path:
        base, origin = _hf_model_config(m.hf_path), f"model.hf_path = {m.hf_path!r}"
    elif m.preset not in PRESETS:
        raise ConfigError(f"model.preset = {m.preset!r} is not a model preset: choose one of "
                          f"{', '.join(PRESETS)} or set model.hf_path"
                          f"{did_you_mean(m.preset, PRESETS)}")
    else:
        base, origin = PRESETS[m.preset], f"model.preset = {m.preset!r}"
    try:
        return dataclasses.replace(base, **overrides)
    except ValueError as e:
        where = f"model.overrides = {overrides}" if overrides else origin
        raise ConfigError(f"{where} gives an invalid model: {e}; fix model.overrides") from None


def _resolve_fold(cfg: TrainConfig, world_size: int) -> Fold:
    f = cfg.fold
    degrees = dict(tp=f.tp, cp=f.cp, dp=f.dp, pp=f.pp, ep=f.ep, etp=f.etp, edp=f.edp)
    try:
        return Fold(**degrees).resolve(world_size)
    except FoldError as e:
        shown = " ".join(f"fold.{k}={v}" for k, v in degrees.items())
        raise ConfigError(f"the fold ({shown}) does not fit world size {world_size}: "
                          f"{str(e).replace('Fold.', 'fold.')}") from None


def _check_batch(cfg: TrainConfig, fold: Fold, world_size: int) -> None:
    t, dp = cfg.training, fold.dp
    if t.global_batch % dp:
        raise ConfigError(
            f"training.global_batch = {t.global_batch} is not divisible by dp = {dp} "
            f"(data-parallel replicas of {world_size} ranks with fold.tp*fold.cp*fold.pp = "
            f"{fold.tp * fold.cp * fold.pp}); set training.global_batch to a multiple of {dp}"
        )
    per_replica = t.global_batch // dp
    if t.micro_batch and per_replica % t.micro_batch:
        raise ConfigError(
            f"training.micro_batch = {t.micro_batch} does not divide the {per_replica} "
            f"sequences per replica (training.global_batch {t.global_batch} / dp {dp}); "
            f"choose one of {_divisors(per_replica)}, or 0 for no accumulation"
        )


def _check_seq_len(seq: int, fold: Fold) -> None:
    cp, tp = fold.cp, fold.tp
    if (cp > 1 and seq % (2 * cp)) or (seq // cp) % tp:
        # smallest length with seq % 2cp == 0 and (seq / cp) % tp == 0
        need = cp * math.lcm(2, tp) if cp > 1 else tp
        why = (f"context parallelism cuts it into 2*fold.cp = {2 * cp} load-balanced chunks "
               f"and " if cp > 1 else "")
        raise ConfigError(
            f"data.seq_len = {seq} does not split over the fold: {why}sequence parallelism "
            f"splits each rank's seq_len/fold.cp tokens over fold.tp = {tp}; use a multiple "
            f"of {need}, e.g. {need * max(1, round(seq / need))}"
        )


def _check_model(cfg: TrainConfig, mc: ModelConfig, fold: Fold) -> None:
    """The sizes ``foldmesh.parallelize.check_model`` splits, against the fold."""
    source = (f"model.hf_path {cfg.model.hf_path!r}" if cfg.model.hf_path
              else f"model.preset {cfg.model.preset!r}")

    def fail(name: str, size: int, axis: str, degree: int, what: str):
        origin = "model.overrides" if name in cfg.model.overrides else source
        raise ConfigError(
            f"the model's {name} = {size} (from {origin}) is not divisible by fold.{axis} = "
            f"{degree}: {what}; choose fold.{axis} from {_divisors(size)} or set "
            f"model.overrides.{name} to a multiple of {degree}"
        )

    for name, size in mc.tp_split_sizes().items():
        if size % fold.tp:
            fail(name, size, "tp", fold.tp, "tensor parallelism splits it over the tp ranks")
    if len(mc.dense_layer_ids) < mc.num_layers:  # some layer is MoE
        if mc.num_experts % fold.ep:
            fail("num_experts", mc.num_experts, "ep", fold.ep,
                 "expert parallelism gives each ep rank the same number of experts")
        if mc.expert_ffn_size % fold.etp:
            fail("expert_ffn_size", mc.expert_ffn_size, "etp", fold.etp,
                 "expert tensor parallelism splits each expert's FFN over the etp ranks")
    if cfg.data.source in ("stdlib", "text") and mc.vocab_size < BYTE_VOCAB:
        raise ConfigError(
            f"data.source = {cfg.data.source!r} reads bytes (ids 0..255) but the model's "
            f"vocab_size = {mc.vocab_size} (from {source}); set model.overrides.vocab_size = "
            f"{BYTE_VOCAB} or more"
        )


def microbatches(cfg: TrainConfig, fold: Fold) -> int:
    """Micro-batches per optimizer step: ``global_batch / dp / micro_batch`` (1 without
    accumulation); with pp > 1 they are the pipeline's micro-batches."""
    rows = cfg.training.global_batch // fold.dp
    return rows // (cfg.training.micro_batch or rows)


def _check_pipeline(cfg: TrainConfig, mc: ModelConfig, fold: Fold) -> None:
    """The schedule, the stages per rank, the layer split and the micro-batches (pp > 1)."""
    f = cfg.fold
    if f.pp == 1:
        return
    n = microbatches(cfg, fold)
    try:
        spr = check_pipeline(f.pp_schedule, f.pp, f.pp_stages_per_rank, n)
        split_layers(mc.num_layers, f.pp * spr, f.pp_layers or None)
    except FoldError as e:
        msg = str(e)
        for key in ("pp_schedule", "pp_stages_per_rank", "pp_layers"):
            msg = msg.replace(key, f"fold.{key}")
        msg = msg.replace(" pp ", " fold.pp ").replace("(pp ", "(fold.pp ")
        if "micro-batch" in msg:
            mb = cfg.training.micro_batch
            how = f"training.micro_batch {mb}" if mb else \
                "training.micro_batch 0 (the whole replica batch)"
            msg += (f"; here training.global_batch {cfg.training.global_batch} / dp {fold.dp} "
                    f"/ {how} gives {n}: set training.micro_batch to give more")
        raise ConfigError(msg) from None
    if mc.tie_embeddings:
        raise ConfigError(
            f"fold.pp = {f.pp} with tied embeddings (tie_embeddings in the model's config): "
            "the embedding lives on the first stage and the output head on the last, and "
            "foldmesh refuses to keep two copies in sync; set model.overrides.tie_embeddings "
            "= false or fold.pp = 1")


def _check_documents(cfg: TrainConfig, mc: ModelConfig) -> None:
    """A document source's tokenizer (or prepared directory) against the model."""
    from ..data import DataError, check_vocab, load_tokenizer, read_manifest
    from ._corpus import tokenizer_spec

    d = cfg.data
    spec = tokenizer_spec(cfg)
    what = (f"data.tokenizer = {spec!r}" if d.source == "corpus"
            else f"data.path = {d.path!r} (prepared)")
    try:
        if d.source == "corpus":
            vocab = load_tokenizer(spec).vocab_size
        else:
            vocab = read_manifest(Path(d.path))["vocab_size"]
        check_vocab(vocab, mc.vocab_size)
    except DataError as e:
        raise ConfigError(f"{what}: {e}") from None
    except (KeyError, ValueError) as e:
        raise ConfigError(f"data.path = {d.path!r}: not a prepared token directory ({e}); "
                          "write one with python -m foldmesh.data.prepare") from None


def _check_data_path(cfg: TrainConfig) -> None:
    d = cfg.data
    if d.source not in ("tokens", "text", "corpus", "prepared"):
        return
    if not d.path:
        raise ConfigError(f"data.source = {d.source!r} needs data.path: set it to a file or "
                          "a directory" + (" of *.bin token files" if d.source == "tokens" else ""))
    if not Path(d.path).exists():
        raise ConfigError(f"data.path = {d.path!r} does not exist (data.source = {d.source!r}); "
                          "fix data.path (relative paths start at the working directory)")


def validate_config(cfg: TrainConfig, world_size: int) -> None:
    """Raise ``ConfigError`` unless ``cfg`` can run on ``world_size`` ranks.

    Checked: value types, choices and ranges; the fold on the world; the pipeline (schedule,
    stages per rank, layer split, micro-batches, untied embeddings) when fold.pp > 1; the
    global batch over dp and micro-batches; ``data.seq_len`` over cp and tp; the model preset
    (or ``model.hf_path``'s config.json) with ``model.overrides``, its sizes over tp, ep and
    etp, and its vocabulary against byte-level data; ``data.path`` for file sources; the
    profiled steps against ``training.steps``, and that the packages of the dashboards asked
    for (TensorBoard, W&B) import.
    Not checked: whether ``training.device = "cuda"`` has a GPU (the trainer finds out).
    """
    # A config built in Python skipped config_from_dict's type checks.
    config_from_dict(config_to_dict(cfg))
    for key, allowed in CHOICES.items():
        if _get(cfg, key) not in allowed:
            value = _get(cfg, key)
            raise ConfigError(f"{key} = {value!r} is not allowed; choose one of "
                              f"{', '.join(map(repr, allowed))}{did_you_mean(value, allowed)}")
    for key, (ok, allowed) in RANGES.items():
        if not ok(_get(cfg, key)):
            raise ConfigError(f"{key} = {_get(cfg, key)!r} must be {allowed}")
    if not cfg.checkpoint.dir:
        raise ConfigError("checkpoint.dir is empty; set it to the run's directory")
    fold = _resolve_fold(cfg, world_size)
    _check_batch(cfg, fold, world_size)
    _check_seq_len(cfg.data.seq_len, fold)
    mc = model_config(cfg)
    _check_model(cfg, mc, fold)
    _check_pipeline(cfg, mc, fold)
    _check_data_path(cfg)
    if cfg.data.source in ("corpus", "prepared"):
        _check_documents(cfg, mc)
    check_profile(cfg)
    check_dashboards(cfg.metrics)
