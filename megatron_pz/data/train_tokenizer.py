"""``train-tokenizer``: a byte-level BPE trained on the cleaned articles of the preprocess inputs."""

from __future__ import annotations

import argparse
import json
from typing import Optional

from megatron_pz.errors import PzError, guarded

from .sources import InputError
from .tokenizer import train_bpe_tokenizer
from .tokenizer_corpus import article_texts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", help="same inputs as preprocess (.xml/.bz2/.parquet/.arrow/.jsonl)")
    parser.add_argument("--out", required=True, help="tokenizer folder to write")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--max-pages", type=int, default=None, help="train on the first N pages only")
    parser.add_argument("--extra-text", action="append", default=[], help="extra text to include (repeatable)")


def run_from_args(args: argparse.Namespace) -> int:
    skipped: dict = {}
    try:
        out = train_bpe_tokenizer(
            article_texts(args.inputs, args.max_pages, skipped), args.vocab_size, args.out, args.extra_text
        )
    except (ValueError, FileNotFoundError) as err:  # the inputs, the tokenizer, the output folder
        if isinstance(err, PzError):
            raise
        raise InputError(str(err)) from err
    print(json.dumps({"tokenizer": str(out), "vocab_size": args.vocab_size, "skipped": skipped}))
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="train_tokenizer", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return guarded("train-tokenizer", run_from_args, parser.parse_args(argv))
