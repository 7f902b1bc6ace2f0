"""``megatron-pz`` command line: one subcommand per shipped feature.

Each subcommand lives beside the code it drives and exposes ``register(subparsers)``; this module only
collects them, so ``--help`` lists exactly what is installed and working.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

from megatron_pz.errors import guarded  # a leaf module: --help stays fast

SUBCOMMAND_MODULES = (
    "megatron_pz.train.cli",  # train
    "megatron_pz.data.cli",  # preprocess, train-tokenizer
    "megatron_pz.convert.cli",  # convert
    "megatron_pz.eval.cli",  # eval
    "megatron_pz.memory_plan.cli",  # plan
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatron-pz",
        description="Reinforcement pretraining (PretrainZero, RLP) with Megatron-Core.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        if importlib.util.find_spec(name) is None:
            continue
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done, 2 bad input refused before any work, 1 a failure during work (or a bug: then with
    its traceback), 75 a run stopped by a signal after its checkpoint (see :mod:`megatron_pz.errors`)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    # the stop handlers are train's; other commands (plan) never set them. Under torchrun every rank then exits
    # with its own code, none killed on its way out.
    on_error = ignore_stop_signals if args.command == "train" else None
    return guarded(args.command, args.func, args, on_error=on_error)


def ignore_stop_signals() -> None:
    from megatron_pz.runtime.preemption import ignore_stop_signals as ignore  # lazy: only once train failed

    ignore()


if __name__ == "__main__":
    sys.exit(main())
