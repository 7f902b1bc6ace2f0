"""Process setup: torch.distributed, Megatron parallel_state, seeds, CPU compatibility; and around a run: stop
signals (:mod:`.preemption`), the run-directory lock (:mod:`.run_lock`), the torchrun launcher
(:mod:`.launcher`) and how a SLURM job ends (:mod:`.requeue`).

The process-setup names are loaded on first use (PEP 562): importing this package, which every
``megatron_pz`` import does, must not import torch, so that ``python -m megatron_pz.runtime.launcher``
holds stop signals within milliseconds of its start rather than after torch's 1-2 s import (see
:mod:`.launcher`); the SLURM helpers run by ``slurm/launch.sh`` start that much faster too."""

_DISTRIBUTED = ("RuntimeInfo", "destroy", "initialize", "resolve_device")
__all__ = list(_DISTRIBUTED)


def __getattr__(name: str):
    if name in _DISTRIBUTED:
        from megatron_pz.runtime import distributed  # lazy: importing the package must not import torch (docstring)

        return getattr(distributed, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
