"""``megatron-pz`` command line: one subcommand per shipped feature.

Each subcommand lives beside the code it drives and exposes ``register(subparsers)``; this module only
collects them, so ``--help`` lists exactly what is installed and working.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

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
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from megatron_pz.config import ConfigError  # lazy: after parsing, so that --help loads no more than it must
    from megatron_pz.runtime.run_lock import RunDirLocked  # lazy: see above

    try:
        return int(args.func(args) or 0)
    except (ConfigError, RunDirLocked) as exc:  # bad input, or refused before any work: one clear line
        if args.command == "train":  # the stop handlers are train's; other commands (plan) never set them
            from megatron_pz.runtime.preemption import ignore_stop_signals  # lazy: see above

            ignore_stop_signals()  # under torchrun every rank exits with this code, none killed on its way out
        print(f"megatron-pz {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
