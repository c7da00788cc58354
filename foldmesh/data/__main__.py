"""``python -m foldmesh.data prepare ...`` (the same as ``python -m foldmesh.data.prepare``)
or ``python -m foldmesh.data verify DIR [--checksums] [--no-inputs]``."""

from __future__ import annotations

import argparse
import sys

from ._errors import DataError
from .format import verify
from .prepare import main as prepare_main


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["prepare"]:
        return prepare_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m foldmesh.data",
                                     description="Check a prepared token directory.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("prepare", help="tokenize a corpus (python -m foldmesh.data.prepare -h)")
    check = sub.add_parser("verify", help="check a prepared directory against its manifest")
    check.add_argument("dir")
    check.add_argument("--checksums", action="store_true",
                       help="also compare every file's sha256 (reads all data)")
    check.add_argument("--no-inputs", action="store_true",
                       help="do not compare the input files' sizes and mtimes")
    args = parser.parse_args(argv)
    try:
        m = verify(args.dir, check_inputs=not args.no_inputs, checksums=args.checksums)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.dir}: ok, {m['num_documents']} documents, {m['num_tokens']} tokens "
          f"({m['dtype']}, vocab_size {m['vocab_size']}, eos_id {m['eos_id']}) in "
          f"{len(m['shards'])} shards")
    return 0


if __name__ == "__main__":
    sys.exit(main())
