"""``megatron-pz preprocess`` and ``megatron-pz train-tokenizer`` (same arguments as the tools/ scripts)."""

from __future__ import annotations

from . import preprocess, train_tokenizer


def register(subparsers) -> None:
    p = subparsers.add_parser("preprocess", help="Wikipedia dump -> passages + span candidates (IndexedDataset)")
    preprocess.add_arguments(p)
    p.set_defaults(func=preprocess.run_from_args)
    t = subparsers.add_parser("train-tokenizer", help="train a byte-level BPE tokenizer on the inputs")
    train_tokenizer.add_arguments(t)
    t.set_defaults(func=train_tokenizer.run_from_args)
