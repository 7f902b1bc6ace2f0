"""Run Megatron-Core 0.16.1 on CPU (gloo) by covering its CUDA assumptions.

Megatron-Core is written for GPUs: it allocates buffers on ``torch.cuda.current_device()``,
passes ``device="cuda"`` literally, calls ``.cuda()``, keeps CUDA RNG states for tensor-parallel
dropout, uses CUDA streams/events in the MoE dispatcher and checks ``param.type()`` against CUDA
tensor type names in the optimizer. None of that is needed for correctness on CPU, so this module
maps each assumption onto its CPU equivalent. Every item is listed in ``COMPAT_ITEMS`` with the
Megatron code it covers; re-check them whenever megatron-core is upgraded and delete what upstream
fixed.

It is applied explicitly by :func:`megatron_pz.runtime.initialize` only when the run's device is
CPU, and never on a machine where CUDA is in use (``apply()`` refuses if CUDA is available and
initialised with devices, unless forced for a test).
"""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

COMPAT_ITEMS = {
    "current_device": "torch.cuda.current_device() used as a buffer device -> CPU device",
    "device_kwarg": "factory calls with device='cuda' (pipeline schedules, rotary, buffers) -> CPU",
    "tensor_cuda": "Tensor.cuda()/Module.cuda() -> no-op",
    "rng": "CUDA RNG state get/set (tensor_parallel.random tracker) -> CPU generator state",
    "streams": "torch.cuda.Stream/Event/current_stream/stream/synchronize -> inert stand-ins",
    "te_general_gemm": "moe_utils references te_general_gemm without TE -> defined as None",
    "moe_split_sizes": "moe_utils.maybe_move_tensor_to_cpu(as_numpy=True) ignores CPU tensors -> numpy",
    "param_type": "optimizer checks param.type()=='torch.cuda.FloatTensor' -> CPU float passes",
}

_applied = False
_lock = threading.Lock()


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, int) and not isinstance(device, bool):
        return True  # a bare int means a CUDA ordinal in torch's factory functions
    return False


class _CudaToCpuDeviceMode(TorchFunctionMode):
    """Rewrites a CUDA ``device=`` argument (and ``.to('cuda')``) to CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if device is not None and _is_cuda_device(device):
            kwargs = dict(kwargs, device="cpu")
        if func in (torch.Tensor.to,) and args:
            args = tuple("cpu" if (i > 0 and _is_cuda_device(a) and not isinstance(a, int)) else a
                         for i, a in enumerate(args))
        return func(*args, **kwargs)


class _InertStream:
    """Stand-in for torch.cuda.Stream: work on CPU is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, event=None):
        return event or _InertEvent()

    def synchronize(self):
        pass

    def query(self):
        return True


class _InertEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args, **kwargs):
        pass

    def wait(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


def _patch_torch() -> None:
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.nn.Module.cuda = lambda self, *a, **k: self

    cpu_rng_get = torch.get_rng_state
    cpu_rng_set = torch.set_rng_state
    torch.cuda.get_rng_state = lambda device="cuda": cpu_rng_get()
    torch.cuda.set_rng_state = lambda state, device="cuda": cpu_rng_set(state)
    # torch.manual_seed itself calls torch.cuda.manual_seed_all: that one must do nothing more.
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    torch.cuda.manual_seed_all = lambda seed: None

    torch.cuda.Stream = _InertStream
    torch.cuda.Event = _InertEvent
    torch.cuda.current_stream = lambda *a, **k: _InertStream()
    torch.cuda.default_stream = lambda *a, **k: _InertStream()
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()
    torch.cuda.synchronize = lambda *a, **k: None

    original_type = torch.Tensor.type

    @functools.wraps(original_type)
    def type_reporting_cuda_names(self, *args, **kwargs):
        result = original_type(self, *args, **kwargs)
        if not args and not kwargs and isinstance(result, str):
            return _CUDA_TYPE_NAMES.get(result, result)
        return result

    torch.Tensor.type = type_reporting_cuda_names


def _patch_megatron() -> None:
    from megatron.core.tensor_parallel import random as mp_random
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    mp_random._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: (
        torch.get_rng_state()
    )
    mp_random._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: (
        torch.set_rng_state(new_state)
    )

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if torch.is_tensor(tensor) and as_numpy:
            return tensor.cpu().numpy()
        return tensor

    moe_utils.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu


def apply(force: bool = False) -> None:
    """Install the CPU compatibility layer once per process (idempotent).

    Refuses when CUDA devices are present unless ``force`` is set: on GPU these patches would hide
    real device placement bugs.
    """
    global _applied
    with _lock:
        if _applied:
            return
        if torch.cuda.is_available() and not force:
            raise RuntimeError(
                "megatron_pz.runtime.cpu_compat must not be applied on a machine with CUDA devices; "
                "set runtime.device='cuda' (the default when a GPU is present)."
            )
        _patch_torch()
        _patch_megatron()
        _CudaToCpuDeviceMode().__enter__()  # stays active for the life of the process
        _applied = True


def is_applied() -> bool:
    return _applied
