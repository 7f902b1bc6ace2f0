"""Host memory of a run on CPU: this process's resident set now and at its peak (step metrics), and the C
allocator's mmap threshold that lets freed tensors go back to the system.

On CPU the memory plan's budget is host RAM (``megatron-pz plan``); logging the process's resident set
beside it every step is how the plan is checked against a real run (README "A real model on a CPU").
``ru_maxrss`` is the kernel's high-water mark of the resident set (KiB on Linux).

torch's CPU tensors come from glibc's ``malloc``. glibc serves a block above its *mmap threshold* with its
own ``mmap`` (returned to the system on free) and everything below from its heaps, which keep freed memory
for reuse and fragment; the threshold starts at 128 KiB and rises to the size of every mmapped block freed,
up to 32 MiB. A training step frees activations of a few MiB each (SmolLM2-135M, 2048 tokens: 4.5-12 MiB
per layer tensor), so after the first step they all stayed in the heaps: the process kept 6 GiB it no longer
used and peaked 4 GiB above the plan (13.4 GiB measured against 9.35 planned, fp32). Fixing the threshold
at 128 KiB (``mallopt(M_MMAP_THRESHOLD)``, which also stops the adjustment) gives every such tensor back
when it is freed: live 5.5 GiB after the step, peak 10.3 GiB.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import resource

import psutil

GIB = 2**30
M_MMAP_THRESHOLD = -3  # glibc malloc.h
MMAP_THRESHOLD_BYTES = 128 * 1024


def return_freed_tensors_to_the_system() -> bool:
    """Fix glibc's mmap threshold at 128 KiB (see the module docstring); False where the C library has no
    ``mallopt`` (not glibc) or refuses. Call once per CPU process, before the model is built."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = getattr(libc, "mallopt", None)
    except OSError:
        return False
    return bool(mallopt is not None and mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))


def host_memory_metrics() -> dict[str, float]:
    return {"memory/rss_gib": psutil.Process().memory_info().rss / GIB,
            "memory/peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB}
