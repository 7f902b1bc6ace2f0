"""Initialise torch.distributed and Megatron's parallel groups for one process of a run.

Works under ``torchrun`` (reads RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR) and as a single plain process
(then it makes a world of one on a free loopback port). On CPU the world is gloo and the compatibility
layer in :mod:`megatron_pz.runtime.cpu_compat` is applied first.

The collective rule, on every device: **each collective runs on the device of its tensors, and every rank
of one collective passes tensors on the same device.** On GPU the world is ``cpu:gloo,cuda:nccl``
(:func:`world_backend`): one process group with a backend per device type, as verl sets it up, so
tensors from the model (logits, log-probs, weight buckets, activations) go over NCCL and the host-side
bookkeeping (metric sums, flags, sizes, ``*_object`` collectives) goes over gloo without a round trip
through the GPU. Megatron's groups inherit both backends (``new_group`` without a backend copies the
default group's). An NCCL-only world would fail at the first CPU collective ("No backend type
associated with device type cpu").
"""

from __future__ import annotations

import datetime
import os
import random
import socket
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from megatron_pz.config import CUDA_WORLD_BACKEND, ConfigError, ParallelConfig, RuntimeConfig
from megatron_pz.runtime import cpu_compat
from megatron_pz.runtime.host_memory import return_freed_tensors_to_the_system


@dataclass
class RuntimeInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str


def resolve_device(requested: str = "auto") -> torch.device:
    if requested == "cpu":
        return torch.device("cpu")
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("runtime.device='cuda' was requested but no CUDA device is available")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return resolve_device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def world_backend(device: torch.device, requested: str = "auto") -> str:
    """The backend string of the default process group for ``device`` (see the module docstring).

    ``requested`` is ``runtime.backend``: ``auto`` picks gloo on CPU and ``cpu:gloo,cuda:nccl`` on GPU;
    an explicit value must still serve CPU tensors (host-side metrics and flags run on CPU).
    """
    if requested == "auto":
        return CUDA_WORLD_BACKEND if device.type == "cuda" else "gloo"
    if device.type == "cpu" and requested != "gloo":
        raise ConfigError(f"runtime.backend={requested!r} on a CPU run: only gloo (or auto) runs on CPU")
    if device.type == "cuda" and requested != CUDA_WORLD_BACKEND:
        raise ConfigError(f"runtime.backend={requested!r} on a GPU run: the trainer reduces host-side metrics "
                          f"on CPU tensors, so the world needs a CPU backend too; use auto or "
                          f"{CUDA_WORLD_BACKEND!r}")
    return requested


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def initialize(parallel=None, runtime=None) -> RuntimeInfo:
    """Set up the process group, Megatron model-parallel groups and seeds.

    ``parallel``/``runtime`` are :class:`megatron_pz.config.ParallelConfig`/``RuntimeConfig``
    (defaults when None). Safe to call again in the same process with the same sizes.
    """
    from megatron.core import parallel_state, tensor_parallel

    parallel = parallel or ParallelConfig()
    runtime = runtime or RuntimeConfig()
    device = resolve_device(runtime.device)
    if device.type == "cpu":
        cpu_compat.apply()
        return_freed_tensors_to_the_system()  # freed activations leave the heap (runtime/host_memory.py)
    else:
        torch.cuda.set_device(device)

    backend = world_backend(device, runtime.backend)

    if not dist.is_initialized():
        if "RANK" not in os.environ:  # a plain single process: make a world of one
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        dist.init_process_group(
            backend=backend, timeout=datetime.timedelta(minutes=runtime.timeout_minutes)
        )

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=parallel.virtual_pp,
        context_parallel_size=parallel.cp,
        expert_model_parallel_size=parallel.ep,
        expert_tensor_parallel_size=parallel.etp,
    )
    set_seed(runtime.seed)
    if runtime.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    return RuntimeInfo(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        device=device,
        backend=backend,
    )


def set_seed(seed: int) -> None:
    """Seed python/numpy/torch identically on every rank; Megatron's tracker forks TP/EP-specific
    streams from it (different dropout per TP rank, same init for replicated weights)."""
    from megatron.core import tensor_parallel

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
