"""This process's resident memory now and at its peak, for the step metrics of a run on CPU.

On CPU the memory plan's budget is host RAM (``megatron-pz plan``); logging the process's resident set
beside it every step is how the plan is checked against a real run (README "A real model on a CPU").
``ru_maxrss`` is the kernel's high-water mark of the resident set (KiB on Linux).
"""

from __future__ import annotations

import resource

import psutil

GIB = 2**30


def host_memory_metrics() -> dict[str, float]:
    return {"memory/rss_gib": psutil.Process().memory_info().rss / GIB,
            "memory/peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB}
