"""Process setup: torch.distributed, Megatron parallel_state, seeds, CPU compatibility."""

from megatron_pz.runtime.distributed import (  # noqa: F401
    RuntimeInfo,
    destroy,
    initialize,
    resolve_device,
)
