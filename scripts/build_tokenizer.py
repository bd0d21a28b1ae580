"""Rebuild the shipped tokenizer from the shipped instruction set.

Usage:
  python scripts/build_tokenizer.py [--data PATH] [--out DIR] [--vocab-size N] [--check]

Trains a byte-level BPE tokenizer (the `tokenizers` library) on every record's
plain-template text and saves it in Hugging Face format to
sparcom_jax/data/tokenizer/. Training is single-threaded, so the same data gives
the same files; `--check` rebuilds into a temporary directory and fails if the
result differs from the shipped files.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import sys
import tempfile

# Before `tokenizers` starts its thread pool: one thread keeps BPE merges reproducible.
os.environ["RAYON_NUM_THREADS"] = "1"

from sparcom_jax.data import SHIPPED_PATH, TOKENIZER_DIR, load_instructions  # noqa: E402
from sparcom_jax.data.tokenizer import DEFAULT_VOCAB_SIZE, build_default_tokenizer  # noqa: E402

FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(SHIPPED_PATH), help="instruction file to train on")
    ap.add_argument("--out", default=str(TOKENIZER_DIR), help="output directory")
    ap.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE)
    ap.add_argument("--check", action="store_true", help="verify the files in --out are up to date")
    args = ap.parse_args(argv)

    records = load_instructions(args.data)
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            build_default_tokenizer(records, tmp, args.vocab_size)
            _, mismatch, errors = filecmp.cmpfiles(tmp, args.out, FILES, shallow=False)
        if mismatch or errors:
            print(f"out of date: {mismatch + errors}; rerun scripts/build_tokenizer.py", file=sys.stderr)
            return 1
        print(f"{args.out} is up to date")
        return 0
    out = build_default_tokenizer(records, args.out, args.vocab_size)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    print(f"trained on {len(records)} records from {args.data}; vocab {len(tok)}; saved to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
