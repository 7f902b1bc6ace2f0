"""``megatron-pz train CONFIG.yaml [key.sub=value ...]``."""

from __future__ import annotations

import argparse

import torch.distributed as dist

from megatron_pz.runtime import destroy
from megatron_pz.runtime.preemption import EXIT_STOPPED, ignore_stop_signals, install_stop_signals


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="run PretrainZero / RLP / baseline RL training from a YAML config",
        description="Train with a run config (see examples/*.yaml). Launch with torchrun for several "
                    "ranks; a plain process runs a world of one.")
    p.add_argument("config", help="YAML run config")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. train.steps=10 parallel.tp=2")
    p.add_argument("--check", action="store_true",
                   help="check the config, the data and the checkpoint the run would start from, and exit "
                        "(nothing is written)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Exit code 0 when every step ran; ``EXIT_STOPPED`` (75) when a stop signal ended the run after its
    checkpoint was written (see :mod:`megatron_pz.runtime.preemption`)."""
    if not args.check:
        install_stop_signals()  # first: until then SIGUSR1 would end the process
    from megatron_pz.run_config import load_run_config  # lazy: `megatron-pz --help` imports every subcommand's module

    cfg = load_run_config(args.config, args.overrides)
    if args.check:
        from megatron_pz.model.provider import resolve_hf_config  # lazy: see load_run_config's
        from megatron_pz.train.preflight import preflight  # lazy: see load_run_config's

        start = preflight(cfg, resolve_hf_config(cfg))
        print("\n".join(["config ok", *start.describe()]))
        return 0
    from megatron_pz.train.trainer import train  # lazy: it loads megatron-core (4 s); --help and --check need none

    result = train(cfg)

    if result.get("stopped"):
        ignore_stop_signals()
        destroy()
        return EXIT_STOPPED
    if dist.get_rank() == 0 and result.get("role") != "rollout":  # a rollout rank's world has a rank 0 too
        b, a = result.get("before") or {}, result.get("after") or {}
        print("held-out mask accuracy (span candidates): before RL {} -> after RL {}; (any valid word): {} -> {}; "
              "generator valid-mask rate: {} -> {}".format(
            _fmt(b.get("eval/mask_accuracy")), _fmt(a.get("eval/mask_accuracy")),
            _fmt(b.get("eval/word_mask_accuracy")), _fmt(a.get("eval/word_mask_accuracy")),
            _fmt(b.get("eval/generator_valid_mask_rate")), _fmt(a.get("eval/generator_valid_mask_rate"))))
    destroy()
    return 0


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"
