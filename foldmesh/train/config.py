"""The trainer's configuration: one dataclass per section, a docstring per field.

A run is configured by a TOML file with these sections (any may be omitted) plus
``--section.field value`` overrides on the command line; ``foldmesh.train.load_config``
merges them, checks every key and value, and names the key when something is wrong.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ModelSection:
    preset: str = "demo"
    """A name from ``foldmesh.models.PRESETS``; the fields below override it."""
    overrides: dict = field(default_factory=dict)
    """ModelConfig fields replacing the preset's, e.g. ``{num_layers = 2}``."""
    hf_path: str = ""
    """A local Hugging Face checkpoint directory to start from instead of random weights
    (its config.json replaces ``preset``)."""


@dataclass
class FoldSection:
    tp: int = 1
    """Tensor-parallel ranks (attention and dense MLPs; sequence parallel)."""
    cp: int = 1
    """Context-parallel ranks (sequence split in load-balanced chunks)."""
    dp: int = -1
    """Data-parallel replicas; -1: the world size divided by tp·cp·pp."""
    pp: int = 1
    """Pipeline-parallel ranks (the outermost axis of both views); the model's layers are
    split over pp · pp_stages_per_rank stages."""
    ep: int = 1
    """Expert-parallel ranks of the MoE layers."""
    etp: int = 1
    """Expert-tensor-parallel ranks (each expert's FFN split)."""
    edp: int = -1
    """Expert data-parallel replicas; -1: inferred."""
    dispatcher: str = "alltoall"
    """MoE token dispatcher: "alltoall" (the paper's) or "allgather"."""
    data_parallel: str = "fsdp"
    """"fsdp" (FSDP2: dense weights over dp·cp, experts over edp) or "replicate" (every rank
    keeps whole weights; gradients all-reduced)."""
    activation_checkpoint: str = "none"
    """"none" or "full" (recompute every block in backward)."""
    pp_schedule: str = "1F1B"
    """Pipeline schedule (with pp > 1), one of torch.distributed.pipelining's: "GPipe",
    "1F1B", "Interleaved1F1B", "LoopedBFS", "InterleavedZeroBubble", "ZBVZeroBubble",
    "DualPipeV" (the zero-bubble ones need torch >= 2.13). The step's micro-batches are
    ``training.micro_batch``'s."""
    pp_stages_per_rank: int = 0
    """Stages (virtual pipeline stages) per pp rank; 0: the schedule's default, 1 for GPipe
    and 1F1B, 2 for the others (the V schedules need exactly 2)."""
    pp_layers: tuple[int, ...] = ()
    """Layers of each stage, in stage order (summing to the model's layers); empty: balanced,
    the embedding and the output head counting as one layer each."""


@dataclass
class DataSection:
    source: str = "stdlib"
    """Token streams, windows drawn with replacement: "stdlib" (the Python standard library's
    own source files at byte level, no download), "tokens" (memory-mapped token files:
    ``path``, ``dtype``), "text" (text files under ``path`` at byte level). Document corpora,
    packed into sequences epoch by epoch (``sampling``): "corpus" (local text, JSON Lines
    and Parquet files under ``path``, tokenized once by ``tokenizer`` into
    ``checkpoint.dir``/tokens before training) or "prepared" (a directory written by
    ``python -m foldmesh.data.prepare``; no tokenizer at run time)."""
    path: str = ""
    """A file or directory for "tokens" / "text" / "corpus" / "prepared" (for "tokens":
    *.bin files of ids)."""
    tokenizer: str = ""
    """For "corpus": a Hugging Face tokenizer.json or a directory holding one, or "bytes";
    empty: ``model.hf_path``'s tokenizer when it has one, else "bytes"."""
    text_field: str = "text"
    """The JSON Lines field / Parquet column holding each document's text ("corpus")."""
    sampling: str = "epochs"
    """Document corpora: "epochs" (shuffled documents without replacement, epoch after
    epoch, EOS between documents, padding masked out of the loss) or "replacement" (windows
    drawn with replacement from the token stream)."""
    dtype: str = "uint16"
    """Token id type of "tokens" files: "uint16" or "uint32"."""
    seq_len: int = 256
    """Tokens per training sequence."""
    val_fraction: float = 0.05
    """Share of the token stream held out for validation (taken from its end)."""
    max_bytes: int = 16_000_000
    """At most this many bytes of "stdlib"/"text" sources are read (a cap for small machines)."""


@dataclass
class OptimizerSection:
    lr: float = 3e-3
    """Peak learning rate of AdamW."""
    min_lr_ratio: float = 0.1
    """The cosine schedule decays to ``lr * min_lr_ratio``."""
    warmup_steps: int = 20
    """Linear warm-up from 0 over this many optimizer steps."""
    weight_decay: float = 0.1
    """Decoupled weight decay (not applied to norms, biases and the router's bias)."""
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = off)."""


@dataclass
class TrainingSection:
    steps: int = 300
    """Optimizer steps of the whole run."""
    global_batch: int = 16
    """Sequences per optimizer step over all data-parallel replicas."""
    micro_batch: int = 0
    """Sequences per replica per forward; 0 = global_batch / dp (no accumulation)."""
    seed: int = 0
    """Seed of the weights, the data order and dropout-free randomness."""
    deterministic: bool = False
    """Deterministic algorithms (bitwise-reproducible runs and resumes)."""
    dtype: str = "auto"
    """"auto" (bf16 on GPU, fp32 on CPU), "bf16" or "fp32": compute dtype; parameters and
    gradient reductions stay fp32."""
    on_nonfinite: str = "stop"
    """A non-finite loss or gradient norm: "stop" the run, or "skip" the step."""
    val_every: int = 50
    """Validation loss every this many steps (0 = never)."""
    val_batches: int = 4
    """Global batches per validation."""
    stop_after: int = 0
    """End this launch after this many steps (with a checkpoint); the next launch resumes.
    For time-limited jobs; 0 = run to ``steps``."""
    fail_at_step: int = 0
    """Fault injection for tests: rank 1 exits at this step on the first attempt (0 = off)."""
    device: str = "auto"
    """"auto" (cuda when available, else cpu), "cpu" or "cuda"."""


@dataclass
class CheckpointSection:
    dir: str = "runs/demo"
    """Run directory: checkpoints, metrics.jsonl, plots, exported weights."""
    every: int = 100
    """Save a distributed checkpoint every this many steps (0 = only at the end)."""
    keep: int = 2
    """Keep the newest this many checkpoints."""
    resume: bool = True
    """Resume from the newest complete checkpoint in ``dir`` when there is one."""
    export_hf: bool = False
    """Write Hugging Face safetensors to ``dir``/hf at the end."""


@dataclass
class MoESection:
    force_balance: bool = False
    """Benchmarking only: every router ignores its scores and spreads each rank's tokens
    evenly over the experts (``foldmesh.moe.apply_force_balance``), as Megatron-Core's
    published figures are measured. The trainer says so at start and in metrics.jsonl."""


@dataclass
class MetricsSection:
    log_every: int = 10
    """A log line and a metrics.jsonl record every this many steps."""
    progress: bool = True
    """A progress bar on rank 0, drawn only when stdout and stderr are terminals: a batch job's
    log (Slurm, nohup, tee, CI) gets the log lines alone. False turns it off everywhere."""
    plots: bool = True
    """Draw PNG plots into the run directory at the end."""
    tensorboard: bool = False
    """TensorBoard event files with metrics.jsonl's scalars in ``checkpoint.dir``/tensorboard
    (rank 0; needs ``pip install tensorboard``)."""
    wandb: bool = False
    """The same scalars to an offline Weights & Biases run in ``checkpoint.dir``/wandb
    (needs ``pip install wandb``; upload later with ``wandb sync``)."""
    profile_steps: tuple[int, ...] = ()
    """``[first, last]``: a torch.profiler trace of these optimizer steps (1-based,
    inclusive) on every rank, ``checkpoint.dir``/profile/rank<k>.json (Chrome trace format,
    for Perfetto or chrome://tracing); empty = off."""
    memory_snapshot: bool = False
    """With ``profile_steps``, on CUDA: record allocations from the first profiled step and
    write ``checkpoint.dir``/profile/memory-rank<k>.pickle after it (for
    pytorch.org/memory_viz); ignored on CPU."""


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    fold: FoldSection = field(default_factory=FoldSection)
    data: DataSection = field(default_factory=DataSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    moe: MoESection = field(default_factory=MoESection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
