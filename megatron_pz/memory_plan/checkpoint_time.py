"""How big a training checkpoint is, how long writing it takes, and how early SLURM must warn the job.

What a save writes (``megatron_pz.checkpoint.save_checkpoint``, torch_dist format): every parameter once
(in the params dtype; replicas across data parallelism are written by one of them), the RLP EMA
teacher's weights when an objective uses it, and the optimizer state: for every parameter element the
fp32 main copy and Adam's two fp32 moments (12 bytes; each element's state is written by the data-parallel
rank that owns it). The rank that writes most is a data-parallel rank 0: its model-parallel shard of the
weights plus its shard of the optimizer state (:func:`checkpoint_size` bounds what one node writes).
``bench/bench_checkpoint_save.py`` compares these bytes with what a save wrote (tiny and 0.44B).

The early warning (``sbatch --signal=B:USR1@LEAD``) must cover the ranks reaching their next agreement point
(they finish the rollout or update phase they are in: ``preemption.phase_seconds``) and the write, with
``preemption.save_margin`` to spare: ``LEAD = phase_seconds + save_margin x bytes per node / save_bytes_per_s``.
A job's time limit must be longer than ``LEAD + preemption.startup_seconds``, or the warning comes before its
first RL step, on every attempt (:func:`time_limit_problem`; ``slurm/launch.sh`` refuses such a job).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_pz.memory_plan.model_state import Layout, Shapes, chunk_params, layout_of, total_params, worst_model_state
from megatron_pz.memory_plan.plan import params_dtype_bytes

OPTIMIZER_BYTES_PER_ELEMENT = 12  # fp32 main param + exp_avg + exp_avg_sq


@dataclass
class CheckpointSize:
    total: int  # bytes of one checkpoint, all ranks
    per_rank: int  # the rank that writes most
    per_node: int  # upper bound for one node

    def seconds(self, bytes_per_s: float) -> float:
        """Time to write it when each node writes at ``bytes_per_s`` (nodes write in parallel)."""
        return self.per_node / bytes_per_s


def checkpoint_size(s: Shapes, lay: Layout, spec: str, grouped_gemm: bool, param_bytes: int,
                    distributed_optimizer: bool, with_teacher: bool, ranks_per_node: int) -> CheckpointSize:
    """Bytes of one checkpoint: in all, for the rank that writes most, and at most for one node.

    A node's bound: its ranks' optimizer shards, plus the weights its ranks write, at most one
    pipeline stage's worth (every TP/EP shard of a stage: the data-parallel rank 0s that write them sit
    together in Megatron's default rank order) and never more than the whole checkpoint.
    """
    copies = 2 if with_teacher else 1
    total_weights = total_params(s) * param_bytes * copies
    total = total_weights + total_params(s) * OPTIMIZER_BYTES_PER_ELEMENT
    per_rank = rank_weights = rank_optimizer = 0
    for stage in range(lay.pp):
        weights = sum(q.numel for v in range(lay.vp or 1)
                      for q in chunk_params(s, lay, stage, spec, grouped_gemm, v)) * param_bytes * copies
        st = worst_model_state(s, lay, stage, spec, grouped_gemm, param_bytes, distributed_optimizer, False)
        optimizer = st.moments // 8 * OPTIMIZER_BYTES_PER_ELEMENT  # two fp32 moments per element it owns
        per_rank = max(per_rank, weights + optimizer)
        rank_weights, rank_optimizer = max(rank_weights, weights), max(rank_optimizer, optimizer)
    ranks = min(ranks_per_node, lay.world)
    node_weights = min(total_weights, ranks * rank_weights, lay.tp * lay.ep * rank_weights)
    return CheckpointSize(total=total, per_rank=per_rank, per_node=min(total, node_weights + ranks * rank_optimizer))


def plan_checkpoint(cfg, hf, world: int, device: str = "cuda", ranks_per_node: int = 8) -> CheckpointSize:
    """:func:`checkpoint_size` of a run config on ``world`` ranks (shapes, dtype and spec as the memory plan
    derives them)."""
    spec = cfg.model.spec if cfg.model.spec != "auto" else ("te" if device == "cuda" else "local")
    return checkpoint_size(Shapes.from_hf(hf), layout_of(cfg.parallel, world), spec, cfg.model.moe_grouped_gemm,
                           params_dtype_bytes(cfg.model, device), cfg.optimizer.use_distributed_optimizer,
                           cfg.objective.uses_rlp(), ranks_per_node)


def early_warning_lead(size: CheckpointSize, preemption) -> tuple[float, int]:
    """(seconds to write one checkpoint, the ``--signal`` lead in seconds rounded up to 10 s)."""
    write = size.seconds(preemption.save_bytes_per_s)
    lead = preemption.phase_seconds + preemption.save_margin * write
    return write, int(math.ceil(lead / 10.0) * 10)


def slurm_seconds(text: str) -> float | None:
    """Seconds of a SLURM duration, in the forms ``sbatch --time`` takes and ``squeue`` prints: ``M``,
    ``M:S``, ``H:M:S``, ``D-H``, ``D-H:M``, ``D-H:M:S``; None for no limit (``UNLIMITED``, ``INFINITE``,
    ``NOT_SET``). Raises ValueError on anything else."""
    text = text.strip()
    if text.upper() in ("UNLIMITED", "INFINITE", "NOT_SET", ""):
        return None
    days, _, rest = text.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if len(parts) > 3:
        raise ValueError(text)
    if days:  # D-H, D-H:M, D-H:M:S
        h, m, s = (parts + [0, 0])[:3]
        return float(int(days) * 86400 + h * 3600 + m * 60 + s)
    if len(parts) == 1:  # minutes
        return float(parts[0] * 60)
    if len(parts) == 2:  # minutes:seconds
        return float(parts[0] * 60 + parts[1])
    return float(parts[0] * 3600 + parts[1] * 60 + parts[2])


def time_limit_problem(time_left: float, lead: int, startup: float) -> str | None:
    """Why a job with ``time_left`` seconds cannot train before SLURM's early warning (``lead`` seconds before
    its end) once start-up (``startup`` seconds) is over, or None when it can. Such a job would be warned
    before its first RL step on every attempt: refused before it takes the GPUs."""
    if time_left > lead + startup:
        return None
    need = int(math.ceil((lead + startup) / 60.0)) + 1
    return (f"the job's time limit leaves {time_left:.0f} s, not more than SLURM's early warning lead "
            f"(--signal=B:USR1@{lead}: preemption.phase_seconds + save_margin x the checkpoint's write time) plus "
            f"start-up ({startup:.0f} s, preemption.startup_seconds) = {lead + startup:.0f} s: every attempt "
            f"would be warned before its first RL step. Submit with a longer time limit (--time={need} or more) "
            f"or a shorter lead (--signal=B:USR1@N, with preemption.save_bytes_per_s measured on this cluster's "
            f"file system)")
