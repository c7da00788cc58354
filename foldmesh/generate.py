"""Tokens in, text out: greedy decoding with a trained run or a Hugging Face directory.

    python -m foldmesh.generate --run runs/demo --prompt "def main(" --tokens 64
    python -m foldmesh.generate --run runs/demo --checkpoint 100 --prompt "import "
    python -m foldmesh.generate --hf runs/demo/hf --prompt "class "

One process, no torchrun and no process group. ``--run`` rebuilds the plain
``foldmesh.models.Transformer`` from the run's ``config.toml`` (written by the trainer) and
loads the model weights of its newest complete checkpoint (or ``--checkpoint STEP``) with
``torch.distributed.checkpoint``, which gathers the shards of any fold into whole tensors;
``--hf`` reads a Hugging Face directory with ``foldmesh.from_pretrained``. Then it appends
the most likely token ``--tokens`` times and prints the continuation (the prompt is not
repeated) on stdout, and a summary line on stderr.

The text goes through the run's tokenizer: bytes for ``data.source = "stdlib"`` or
``"text"`` (ids are UTF-8 bytes; a continuation cut inside a character shows U+FFFD),
``data.tokenizer`` (by default ``model.hf_path``'s) for ``"corpus"``, the tokenizer that
``foldmesh.data.prepare`` recorded in the manifest of a ``"prepared"`` or ``"tokens"``
directory, and a ``tokenizer.json`` beside the weights for ``--hf`` (else bytes);
``--tokenizer`` overrides it. The model sees at most the run's
``data.seq_len`` last tokens (the length it was trained on); no KV cache: every new token
runs the whole window again, which is plenty for a look at what a small run learned.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .models import Transformer

BYTE_VOCAB = 256


class GenerateError(ValueError):
    """A bad argument, run directory or checkpoint; the message names it and the fix."""


# ---------------------------------------------------------------------------- text <-> ids
@dataclass
class TextCodec:
    """What decoding needs of a tokenizer."""

    name: str
    vocab_size: int
    encode: Callable[[str], list[int]]
    decode: Callable[[list[int]], str]


def load_codec(spec: str) -> TextCodec:
    """``"bytes"`` or a ``tokenizer.json`` (or a directory holding one), through
    ``foldmesh.data.tokenizer`` when it is installed; bytes alone without it."""
    try:
        from .data.tokenizer import load_tokenizer
    except ImportError:
        load_tokenizer = None
    if load_tokenizer is not None:
        from .data import DataError

        try:
            tok = load_tokenizer(spec)
        except DataError as e:
            raise GenerateError(f"--tokenizer {spec}: {e}") from None
        return TextCodec(tok.name, tok.vocab_size,
                         lambda text: [int(i) for i in tok.encode_batch([text])[0]], tok.decode)
    if spec != "bytes":
        raise GenerateError(f"--tokenizer {spec}: this install reads text at byte level only "
                            "(foldmesh.data.tokenizer is missing); use --tokenizer bytes")
    return TextCodec("bytes", BYTE_VOCAB, lambda text: list(text.encode("utf-8")),
                     lambda ids: bytes(ids).decode("utf-8", errors="replace"))


def run_tokenizer(cfg) -> str:
    """The tokenizer a run's data was read with (see the module docstring)."""
    d, hf = cfg.data, cfg.model.hf_path
    if d.source in ("stdlib", "text"):
        return "bytes"
    if d.source == "corpus":  # data.tokenizer, by default model.hf_path's
        if getattr(d, "tokenizer", ""):
            return d.tokenizer
        return hf if hf and (Path(hf) / "tokenizer.json").is_file() else "bytes"
    # "prepared" and "tokens" directories: the tokenizer foldmesh.data.prepare recorded
    manifest = Path(d.path) / "MANIFEST.json"
    try:
        return json.loads(manifest.read_text(encoding="utf-8"))["tokenizer"]["name"]
    except (OSError, ValueError, KeyError, TypeError):
        raise GenerateError(f"the run read token files (data.path = {d.path!r}) without a "
                            f"readable {manifest} naming their tokenizer: pass --tokenizer "
                            "(a tokenizer.json, its directory, or bytes)") from None


# ---------------------------------------------------------------------------- models
def _checkpoint_path(run_dir: Path, step: int | None) -> Path:
    from .train import checkpoint as ckpt

    found = ckpt.complete_checkpoints(run_dir)
    if not found:
        raise GenerateError(f"{run_dir} holds no complete checkpoint (checkpoints/step-*/ with "
                            "a MANIFEST.json): train it first, or pass the run's checkpoint.dir")
    if step is None:
        return found[-1]
    for path in found:
        if int(path.name[len(ckpt.PREFIX):]) == step:
            return path
    steps = [int(p.name[len(ckpt.PREFIX):]) for p in found]
    raise GenerateError(f"--checkpoint {step}: {run_dir} has no complete checkpoint of step "
                        f"{step}; it has steps {steps}")


def load_run(run_dir: str | Path, step: int | None = None, device: str | torch.device = "cpu"
             ) -> tuple[Transformer, object, Path]:
    """The run's whole model in eval mode with the weights of checkpoint ``step`` (default:
    the newest), its ``TrainConfig`` and the checkpoint's path. Works without a process
    group: ``dcp.load`` then reads in this process (torch >= 2.3), gathering every shard."""
    import torch.distributed.checkpoint as dcp

    from .train import checkpoint as ckpt
    from .train import model_config
    from .train._run_config import read_run_config

    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    path = _checkpoint_path(run_dir, step)
    ckpt.verify(path)
    model = Transformer(model_config(cfg), device=device)
    # tied weights appear under two names sharing one tensor: load it once
    state, seen = {}, set()
    for name, t in model.state_dict().items():
        if id(t) not in seen:
            seen.add(id(t))
            state[name] = t
    saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    for name, t in state.items():
        meta = saved.get(f"model.{name}")
        if meta is None or tuple(meta.size) != tuple(t.shape):
            got = "missing" if meta is None else f"of shape {list(meta.size)}"
            raise GenerateError(
                f"{path}: model weight {name} is {got} but {run_dir / 'config.toml'} builds it "
                f"with shape {list(t.shape)}: the config does not match the checkpoint; restore "
                "the run's config.toml")
    with warnings.catch_warnings():
        # "torch.distributed is disabled ... assuming the intent is to load in a single
        # process": exactly the intent
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        wrapped = {"model": state}
        dcp.load(wrapped, checkpoint_id=str(path))
    model.load_state_dict(wrapped["model"], strict=False)
    model.tie_weights()
    return model.eval(), cfg, path


def load_hf(path: str | Path, device: str | torch.device = "cpu") -> Transformer:
    from .hf import from_pretrained

    return from_pretrained(path, device=device)


# ---------------------------------------------------------------------------- decoding
@torch.no_grad()
def greedy(model: Transformer, ids: list[int], tokens: int, vocab: int | None = None,
           context: int | None = None) -> list[int]:
    """The ``tokens`` ids that greedy decoding appends to ``ids``.

    Args:
        model: a whole ``Transformer`` (ids [1, L] -> logits [1, L, V]).
        vocab: only ids below it are chosen (a tokenizer smaller than the model's
            vocabulary); None: all V.
        context: at most this many last ids are fed to the model; None: all.
    """
    device = next(model.parameters()).device
    seq, out = list(ids), []
    for _ in range(tokens):
        window = seq[-context:] if context else seq
        x = torch.tensor([window], dtype=torch.int64, device=device)
        logits = model(x)[0, -1, :vocab].float()  # [V]
        # NOTE: host synchronisation per token: the next input depends on it
        nxt = int(logits.argmax())
        seq.append(nxt)
        out.append(nxt)
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m foldmesh.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="a trainer run directory (its checkpoint.dir)")
    src.add_argument("--hf", help="a Hugging Face checkpoint directory")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--tokens", type=int, default=64, help="tokens to generate (default 64)")
    p.add_argument("--checkpoint", type=int, default=None, metavar="STEP",
                   help="with --run: the checkpoint of this step (default: the newest)")
    p.add_argument("--tokenizer", default=None,
                   help="bytes, a tokenizer.json or its directory (default: the run's)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from .hf import CheckpointError as HFCheckpointError
    from .train import ConfigError
    from .train.checkpoint import CheckpointError

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        if args.tokens < 0:
            raise GenerateError(f"--tokens {args.tokens} must be 0 or more")
        if args.run is not None:
            model, cfg, source = load_run(args.run, args.checkpoint, device)
            spec, context = args.tokenizer or run_tokenizer(cfg), cfg.data.seq_len
        else:
            if args.checkpoint is not None:
                raise GenerateError("--checkpoint STEP picks a checkpoint of --run; a --hf "
                                    "directory holds one set of weights")
            model, source, context = load_hf(args.hf, device), Path(args.hf), None
            spec = args.tokenizer or ("bytes" if not (source / "tokenizer.json").is_file()
                                      else str(source))
        codec = load_codec(spec)
        V = model.config.vocab_size
        if codec.vocab_size > V:
            raise GenerateError(f"the tokenizer {codec.name} has {codec.vocab_size} ids but the "
                                f"model's vocab_size is {V}: pass the --tokenizer it was "
                                "trained with")
        ids = codec.encode(args.prompt)
        if not ids:
            raise GenerateError("--prompt is empty: give at least one character to continue")
    except (GenerateError, ConfigError, CheckpointError, HFCheckpointError) as e:
        print(f"foldmesh.generate: {e}", file=sys.stderr)
        return 2
    new = greedy(model, ids, args.tokens, vocab=codec.vocab_size, context=context)
    sys.stdout.write(codec.decode(new) + "\n")
    sys.stdout.flush()
    print(f"foldmesh.generate: {len(new)} tokens after a {len(ids)}-token prompt, greedy, from "
          f"{source} ({codec.name} tokenizer)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
