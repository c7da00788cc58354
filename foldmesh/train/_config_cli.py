"""The trainer's command line: ``--preset``, ``--config FILE.toml``, ``--section.field`` flags.

Settings are layered, later layers winning: the dataclass defaults, then ``--preset NAME``
(one of ``TRAIN_PRESETS``), then the ``--config`` file, then each ``--section.field VALUE``
(or ``--section.field=VALUE``) in the order given. Tables merge key by key, so
``--model.overrides.num_layers 2`` changes one ``ModelConfig`` field and keeps the preset's
others. Each layer is checked on its own first, so an error says where the bad value came from.

An override's value is read as a TOML value when it parses as one (``10``, ``3e-4``,
``false``, ``{num_layers = 2}``), else taken as a bare string (``replicate``, ``runs/x``);
for string fields the text is taken verbatim unless it is a quoted TOML string.
"""

from __future__ import annotations

import ast
import copy
import inspect
import itertools
import sys
import textwrap

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from . import config as _config_module
from ._config_io import (
    FIELD_TYPES,
    MODEL_FIELD_TYPES,
    SECTIONS,
    ConfigError,
    config_from_dict,
    config_to_dict,
    did_you_mean,
    field_type,
    toml_value,
)
from .config import TrainConfig

_ALL_ONES = {"tp": 1, "cp": 1, "pp": 1, "ep": 1, "etp": 1}

TRAIN_PRESETS: dict[str, dict] = {
    "demo": {  # torchrun --nproc-per-node 8: every axis of the fold on CPU
        "model": {"preset": "demo"},
        "fold": {"tp": 2, "cp": 2, "ep": 4, "etp": 2},
        "data": {"source": "stdlib", "seq_len": 128},
        "optimizer": {"lr": 3e-3, "warmup_steps": 20},
        "training": {"steps": 200, "global_batch": 16, "val_every": 50},
        "checkpoint": {"dir": "runs/demo", "every": 100},
        "metrics": {"log_every": 10},
    },
    "debug": {  # seconds on any number of ranks: a tiny model, no model parallelism
        # byte-level data needs 256 ids; debug-mixtral has 64
        "model": {"preset": "debug-mixtral", "overrides": {"vocab_size": 256}},
        "fold": dict(_ALL_ONES),
        "data": {"source": "stdlib", "seq_len": 32, "max_bytes": 1_000_000},
        "optimizer": {"warmup_steps": 5},  # the default 20 would be the whole run
        "training": {"steps": 20, "global_batch": 8, "val_every": 10},
        "checkpoint": {"dir": "runs/debug", "every": 10},
        "metrics": {"log_every": 5},
    },
    "single-gpu": {  # one GPU, bf16: the demo model scaled up (about 110M parameters)
        "model": {"preset": "demo", "overrides": {
            "hidden_size": 512, "num_layers": 8, "num_heads": 8, "num_kv_heads": 4,
            "num_experts": 8, "expert_ffn_size": 1024, "vocab_size": 256}},
        "fold": dict(_ALL_ONES),
        "data": {"source": "stdlib", "seq_len": 1024},
        "optimizer": {"lr": 1e-3, "warmup_steps": 100},
        "training": {"steps": 2000, "global_batch": 32, "device": "cuda", "dtype": "bf16",
                     "val_every": 200},
        "checkpoint": {"dir": "runs/single-gpu", "every": 500},
        "metrics": {"log_every": 20},
    },
}
"""Named starting points, applied before the ``--config`` file (nested like a TOML file)."""

_PRESET_NOTES = {
    "demo": "8 CPU ranks (torchrun --nproc-per-node 8): tp=2 cp=2 ep=4 etp=2, 300 steps",
    "debug": "any number of ranks, all degrees 1: tiny debug-mixtral model, 20 steps",
    "single-gpu": "1 GPU, bf16: the demo model scaled to hidden 512 x 8 layers, 2000 steps",
}


# ---------------------------------------------------------------------------- reading values
def read_toml(path: str) -> dict:
    """The TOML file ``path`` as a nested dict."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: no such file; pass the path of a TOML file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"--config {path} is not valid TOML: {e}") from None


def parse_value(text: str, hint) -> object:
    """An override's text as a value for a field annotated ``hint`` (see the module docstring)."""
    try:
        parsed = tomllib.loads(f"v = {text}")
    except tomllib.TOMLDecodeError:
        return text  # a bare word: `replicate`, `runs/x`
    if set(parsed) != {"v"}:  # text with a newline could smuggle in more keys
        return text
    if hint is str and not isinstance(parsed["v"], str):
        return text  # `--data.path 2024` means the directory "2024"
    return parsed["v"]


def _override(flag: str, text: str) -> dict:
    """``--section.field`` (or ``--model.overrides.<field>``) and its text as a one-key layer."""
    parts = flag[2:].split(".")
    if len(parts) == 3 and parts[:2] == ["model", "overrides"]:
        if parts[2] not in MODEL_FIELD_TYPES:
            raise ConfigError(f"{flag}: model.overrides.{parts[2]} is not a ModelConfig field"
                              f"{did_you_mean(parts[2], MODEL_FIELD_TYPES)}")
        return {"model": {"overrides": {parts[2]: parse_value(text, MODEL_FIELD_TYPES[parts[2]])}}}
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"{flag!r} is not a setting: write --section.field VALUE, e.g. "
                          "--training.steps 10 (see --help)")
    section, name = parts
    return {section: {name: parse_value(text, field_type(section, name))}}


def merge(into: dict, layer: dict) -> dict:
    """Deep-merge ``layer`` into ``into`` (tables key by key, other values replaced)."""
    for k, v in layer.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            merge(into[k], v)
        else:
            into[k] = dict(v) if isinstance(v, dict) else v
    return into


def _layers(argv: list[str]) -> list[tuple[str, dict]]:
    """(where it came from, nested dict) for the preset, the file and each override."""
    preset, path, overrides = None, None, []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: settings are --section.field VALUE "
                              "(see --help)")
        flag, eq, text = arg.partition("=")
        if not eq:
            if i + 1 == len(argv) or argv[i + 1].startswith("--"):
                raise ConfigError(f"{flag} needs a value: write {flag} VALUE or {flag}=VALUE")
            text, i = argv[i + 1], i + 1
        i += 1
        if flag in ("--preset", "--config"):
            if (preset if flag == "--preset" else path) is not None:
                raise ConfigError(f"{flag} is given twice; pass it once")
            if flag == "--config":
                path = text
            elif text not in TRAIN_PRESETS:
                raise ConfigError(f"--preset {text!r} is unknown; choose one of "
                                  f"{', '.join(TRAIN_PRESETS)}{did_you_mean(text, TRAIN_PRESETS)}")
            else:
                preset = text
        else:
            overrides.append((f"{flag} {text}", _override(flag, text)))
    layers = [(f"--preset {preset}", TRAIN_PRESETS[preset])] if preset else []
    layers += [(f"--config {path}", read_toml(path))] if path else []
    return layers + overrides


def load_config(argv: list[str] | None = None) -> TrainConfig:
    """The run's ``TrainConfig`` from the command line (``sys.argv[1:]`` by default).

    ``-h``/``--help`` prints every setting with its default and docstring, then exits 0.
    Raises ``ConfigError`` for a bad flag, file, key or value; it does not check the settings
    against each other or the world size (``validate_config`` does).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if "-h" in argv or "--help" in argv:
        print(help_text())
        raise SystemExit(0)
    merged: dict = {}
    for source, layer in _layers(argv):
        try:
            config_from_dict(layer)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        # a copy: merging later layers into a preset's nested tables must not change the
        # preset for the next load_config in this process
        merge(merged, copy.deepcopy(layer))
    return config_from_dict(merged)


# ---------------------------------------------------------------------------- help
def field_docs() -> dict[str, dict[str, str]]:
    """Section -> field -> the docstring under it in ``config.py`` (whitespace collapsed)."""
    by_class = {}
    for node in ast.parse(inspect.getsource(_config_module)).body:
        if isinstance(node, ast.ClassDef):
            docs = by_class[node.name] = {}
            for stmt, nxt in itertools.pairwise(node.body):
                if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                        and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                        and isinstance(nxt.value.value, str)):
                    docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return {s: by_class.get(c.__name__, {}) for s, c in SECTIONS.items()}


def _type_name(hint) -> str:
    return "table" if hint is dict else getattr(hint, "__name__", str(hint))


def help_text() -> str:
    """Usage, presets, then every ``--section.field`` with its type, default and docstring."""
    docs, defaults = field_docs(), config_to_dict(TrainConfig())
    out = [
        "usage: python -m foldmesh.train [--preset NAME] [--config FILE.toml] "
        "[--section.field VALUE ...]",
        "",
        textwrap.fill(
            "Later settings win: the defaults below, then --preset, then the --config file "
            "(TOML with the sections below), then --section.field VALUE or "
            "--section.field=VALUE. Values are TOML (10, 3e-4, false, {num_layers = 2}) or "
            "bare strings. Tables merge key by key; --model.overrides.FIELD VALUE sets one "
            "ModelConfig field.", 96),
        "",
        "presets:",
        *(f"  {name:<12} {_PRESET_NOTES[name]}" for name in TRAIN_PRESETS),
    ]
    for section, fields in FIELD_TYPES.items():
        out += ["", f"[{section}]"]
        for name, hint in fields.items():
            default = toml_value(defaults[section][name], f"{section}.{name}")
            out.append(f"  --{section}.{name} ({_type_name(hint)}, default {default})")
            doc = docs[section].get(name)
            if doc:
                out.append(textwrap.fill(doc, 96, initial_indent=" " * 6,
                                         subsequent_indent=" " * 6))
    return "\n".join(out)
