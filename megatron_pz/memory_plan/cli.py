"""``megatron-pz plan CONFIG.yaml [key.sub=value ...] [--gpu-memory-gib 80] [--nodes N --gpus-per-node G]``.

Prints the per-GPU memory plan of a run (see :mod:`megatron_pz.memory_plan`) without building anything,
so a layout can be sized before a job waits in a queue, then the checkpoint's size, its write time and
the early warning (``sbatch --signal``) that leaves time to write it
(:mod:`megatron_pz.memory_plan.checkpoint_time`). Exit code 1 when the plan does not fit; 2 when
``--time-limit`` leaves no time to train between start-up and the early warning.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from megatron_pz.config import ConfigError, validate_parallel_sizes
from megatron_pz.memory_plan import GIB, plan_run, plan_split, render
from megatron_pz.memory_plan.checkpoint_time import (early_warning_lead, plan_checkpoint, slurm_seconds,
                                                     time_limit_problem)

# HELP_FAST: `megatron-pz --help` imports every subcommand's module, so what ``plan`` reads a run config with is
# imported when the command runs, not when the parser is built.


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "plan", help="per-GPU memory budget of a run config (actor + rollout engine), before launching",
        description="Plan the per-GPU memory of a run per phase (rollout, scoring, training) and say whether it "
                    "fits. Environment variables the YAML uses but that are unset (e.g. ${MODEL_DIR}) are "
                    "tolerated: the model shapes then come from model.architecture.")
    p.add_argument("config", help="YAML run config")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. parallel.tp=4 train.max_tokens_per_micro_batch=8192")
    p.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory of one GPU in GiB (default 80)")
    p.add_argument("--nodes", type=int, default=None, help="nodes (default: runtime.world_size / gpus per node)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    p.add_argument("--min-margin", type=float, default=None,
                   help="share of the GPU to leave free (default: runtime.memory_plan_margin, 0.10)")
    p.add_argument("--time-limit", default=None, metavar="TIME",
                   help="the job's time limit (or what it has left), as sbatch --time takes it (e.g. 48:00:00, "
                        "2-00:00:00, 90): exit 2 when it is not longer than the early warning's lead plus "
                        "preemption.startup_seconds (slurm/launch.sh passes squeue's time left)")
    p.set_defaults(func=run)


def load_for_planning(config: str, overrides: list[str]):
    """The run config, with unset ``${VAR}`` placeholders of the YAML left empty instead of failing."""
    from megatron_pz.run_config import load_run_config  # lazy: see HELP_FAST

    text = Path(config).read_text() if Path(config).is_file() else ""
    unset = [v for v in sorted(set(re.findall(r"\$\{(\w+)\}", text))) if v not in os.environ]
    for var in unset:
        os.environ[var] = f"/unset/{var}"
    try:
        return load_run_config(config, overrides), unset
    finally:
        for var in unset:
            os.environ.pop(var, None)


def hf_config_for_planning(cfg):
    """The model folder's config when it exists, else ``model.architecture`` (the shapes the YAML states)."""
    from megatron_pz.model.provider import load_hf_config, resolve_hf_config  # lazy: see HELP_FAST

    source = cfg.model.hf_config
    if source and (Path(source).is_dir() or Path(source).is_file()):
        return resolve_hf_config(cfg), f"model from {source}"
    if not cfg.model.architecture:
        raise ConfigError(f"model.hf_config {source!r} not found and no model.architecture to plan from")
    return load_hf_config(dict(cfg.model.architecture), cfg.model.hf_overrides), "model from model.architecture"


def plan_config(config: str, overrides: list[str], gpu_memory_gib: float = 80.0, nodes=None,
                gpus_per_node: int = 8, min_margin=None):
    cfg, unset = load_for_planning(config, overrides)
    hf, source = hf_config_for_planning(cfg)
    world = nodes * gpus_per_node if nodes else (cfg.runtime.world_size or 1)
    device = "cpu" if cfg.runtime.device == "cpu" else "cuda"
    margin = cfg.runtime.memory_plan_margin if min_margin is None else min_margin
    if cfg.rollout.disaggregated:  # one plan per role; the trainers are the job's first ranks
        plan = plan_split(cfg, hf, world, gpu_memory_gib * GIB, device, margin, gpus_per_node)
        validate_parallel_sizes(cfg.parallel, hf, plan.trainers)
        training = plan.training
    else:
        validate_parallel_sizes(cfg.parallel, hf, world)
        plan = training = plan_run(cfg, hf, world, gpu_memory_gib * GIB, device, margin)
    training.notes.insert(0, source + (f" (unset: {', '.join(unset)})" if unset else ""))
    training.gpus_per_node = gpus_per_node
    return plan


def early_warning(config: str, overrides: list[str], nodes=None, gpus_per_node: int = 8):
    """(run config, checkpoint size, its write time in s, the ``--signal`` lead in s, world of the writers)."""
    cfg, _ = load_for_planning(config, overrides)
    hf, _ = hf_config_for_planning(cfg)
    world = nodes * gpus_per_node if nodes else (cfg.runtime.world_size or 1)
    if cfg.rollout.disaggregated:  # the rollout ranks hold no training state: only the trainers write
        world -= cfg.rollout.ranks
    device = "cpu" if cfg.runtime.device == "cpu" else "cuda"
    size = plan_checkpoint(cfg, hf, world, device, min(gpus_per_node, world))
    return (cfg, size, *early_warning_lead(size, cfg.preemption), world)


def checkpoint_lines(config: str, overrides: list[str], nodes=None, gpus_per_node: int = 8) -> list[str]:
    """How big a checkpoint is, how long it takes to write, and the early warning SLURM must give."""
    cfg, size, write, lead, world = early_warning(config, overrides, nodes, gpus_per_node)
    p = cfg.preemption
    def gib(n: float) -> str:
        return f"{n / GIB:.1f} GiB" if n >= GIB / 10 else f"{n / 2**20:.1f} MiB"

    return [f"checkpoint: {gib(size.total)} in all; a node writes at most {gib(size.per_node)} "
            f"({min(gpus_per_node, world)} ranks), {write:.0f} s at preemption.save_bytes_per_s="
            f"{p.save_bytes_per_s:.3g}",
            f"SLURM early warning: #SBATCH --signal=B:USR1@{lead}  (preemption.phase_seconds={p.phase_seconds:g} + "
            f"preemption.save_margin={p.save_margin:g} x {write:.0f} s, rounded up to 10 s)"]


def check_arguments(args: argparse.Namespace) -> None:
    """The plan's numbers describe a machine: a GPU has memory, a job has nodes, a margin is a share."""
    if not args.gpu_memory_gib > 0:
        raise ConfigError(f"--gpu-memory-gib must be > 0 (one GPU's memory in GiB, e.g. 80), got {args.gpu_memory_gib}")
    if args.nodes is not None and args.nodes < 1:
        raise ConfigError(f"--nodes must be >= 1, got {args.nodes}")
    if args.gpus_per_node < 1:
        raise ConfigError(f"--gpus-per-node must be >= 1, got {args.gpus_per_node}")
    if args.min_margin is not None and not 0.0 <= args.min_margin < 1.0:
        raise ConfigError(f"--min-margin must be in [0, 1) (a share of the GPU), got {args.min_margin}")


def time_limit_line(config: str, overrides: list[str], time_limit: str, nodes=None, gpus_per_node: int = 8) -> str:
    """A line saying that a job of ``time_limit`` trains before its early warning; ConfigError when it cannot."""
    try:
        seconds = slurm_seconds(time_limit)
    except ValueError:
        raise ConfigError(f"--time-limit {time_limit!r}: not a SLURM time (minutes, H:M:S, D-H:M:S or UNLIMITED)")
    if seconds is None:
        return "time limit: none; SLURM's early warning comes only on a preemption or scancel"
    cfg, _, _, lead, _ = early_warning(config, overrides, nodes, gpus_per_node)
    problem = time_limit_problem(seconds, lead, cfg.preemption.startup_seconds)
    if problem:
        raise ConfigError(problem)
    return (f"time limit: {seconds:.0f} s; the early warning comes {seconds - lead:.0f} s after the start, "
            f"{seconds - lead - cfg.preemption.startup_seconds:.0f} s after the planned start-up "
            f"(preemption.startup_seconds={cfg.preemption.startup_seconds:g})")


def run(args: argparse.Namespace) -> int:
    check_arguments(args)
    plan = plan_config(args.config, args.overrides, args.gpu_memory_gib, args.nodes, args.gpus_per_node,
                       args.min_margin)
    where = "" if hasattr(plan, "training") else f" (pipeline stage {plan.stage})"  # a split names it per role
    print(f"memory plan of {args.config}")  # a line of its own: a long path would wrap the tables' titles
    print(render(plan, f"per-GPU memory plan{where}, GiB"))
    for line in checkpoint_lines(args.config, args.overrides, args.nodes, args.gpus_per_node):
        print(line)
    if args.time_limit is not None:  # after the plan's lines, which say where the lead comes from
        sys.stdout.flush()  # before a refusal's message on stderr
        print(time_limit_line(args.config, args.overrides, args.time_limit, args.nodes, args.gpus_per_node))
    return 0 if plan.fits else 1
