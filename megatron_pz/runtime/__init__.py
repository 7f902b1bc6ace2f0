"""Process setup: torch.distributed, Megatron parallel_state, seeds, CPU compatibility; and around a run: stop
signals (:mod:`.preemption`), the run-directory lock (:mod:`.run_lock`), the torchrun launcher
(:mod:`.launcher`) and how a SLURM job ends (:mod:`.requeue`)."""

from megatron_pz.runtime.distributed import (  # noqa: F401
    RuntimeInfo,
    destroy,
    initialize,
    resolve_device,
)
