"""Atomic, resharding-capable training checkpoints on Megatron's ``dist_checkpointing`` (torch_dist).

Layout of a checkpoint root::

    root/latest_checkpointed_iteration.txt   # "120": the step of the newest *complete* checkpoint
    root/iter_0000120/                       # dist_checkpointing files (model, optimizer, ...)
    root/iter_0000120/pz_checkpoint.json     # step, parallel layout, dtype, what is inside (written last)
    root/iter_0000120/hf_config.json         # the Hugging Face config, so export needs nothing else
    root/iter_0000120/tokenizer/             # tokenizer files copied from the HF folder

A save writes into a hidden sibling ``.tmp_iter_*`` directory; only after every rank finished does
rank 0 rename it into place and then atomically rewrite the ``latest`` file. A crash before that
leaves the previous checkpoint as the latest, and a directory without ``pz_checkpoint.json`` is never
loaded; nor is one whose files are not all there at the sizes written (:mod:`megatron_pz.checkpoint_integrity`).
The latest pointer never moves backwards (a save of an older step is written but not made the latest).
Model weights are keyed by global names (``decoder.layers.<global>``), so dist_checkpointing reshards them
when the TP/PP/EP layout at load differs from the one at save.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_pz.checkpoint_integrity import (  # noqa: F401  (the layout's names, importable from here too)
    LATEST_FILE, META_FILE, CheckpointError, describe, find_resume, iter_dir_name, iteration_steps, problems,
    read_pointer, recorded_files,
)
from megatron_pz.checkpoint_memory import without_copies
from megatron_pz.data.tokenizer import copy_tokenizer_files
from megatron_pz.model.provider import load_hf_config

HF_CONFIG_FILE = "hf_config.json"
TOKENIZER_DIR = "tokenizer"
FORMAT_VERSION = 1
# Distributed-optimizer state format (Megatron's names). "dp_reshardable" (Megatron-LM's default) saves
# each rank's buffers in parallel and reshards only over DP; "fully_reshardable" gathers on DP rank 0
# and may be loaded at another TP/PP too. ("fully_sharded_model_space" is refused by megatron-core 0.16.)
OPTIMIZER_FORMATS = ("dp_reshardable", "fully_reshardable")


# ------------------------------------------------------------------------------------------ helpers


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _unwrap(chunk):
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def _parallel_layout() -> dict:
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return {"tp": 1, "pp": 1, "ep": 1, "dp": _world(), "world_size": _world()}
    return {
        "tp": ps.get_tensor_model_parallel_world_size(),
        "pp": ps.get_pipeline_model_parallel_world_size(),
        "ep": ps.get_expert_model_parallel_world_size(),
        "etp": ps.get_expert_tensor_parallel_world_size(),
        "cp": ps.get_context_parallel_world_size(),
        "dp": ps.get_data_parallel_world_size(),
        "world_size": _world(),
    }


def _model_state(model_chunks, prefix: str = "") -> dict:
    """One entry per chunk (``model``, or ``model0``, ``model1``... for virtual pipeline), like Megatron."""
    if len(model_chunks) == 1:
        return {"model": _unwrap(model_chunks[0]).sharded_state_dict(prefix=prefix)}
    return {f"model{i}": _unwrap(c).sharded_state_dict(prefix=prefix) for i, c in enumerate(model_chunks)}


def _sharded_state(model_chunks, optimizer, extra_models, is_loading: bool,
                   optimizer_format: str = "dp_reshardable") -> dict:
    state = _model_state(model_chunks)
    for name, chunks in (extra_models or {}).items():
        for key, value in _model_state(chunks, prefix=f"extra_models.{name}.").items():
            state[f"extra_models.{name}.{key}"] = value
    if optimizer is not None:
        if is_loading:
            _materialize_optimizer_state(optimizer)
        model_only = {k: v for k, v in state.items() if k.startswith("model")}
        state["optimizer"] = optimizer.sharded_state_dict(
            model_only, is_loading=is_loading,
            metadata={"distrib_optim_sharding_type": optimizer_format, "chained_optim_avoid_prefix": True})
    return state


def _materialize_optimizer_state(optimizer) -> None:
    """A fresh DistributedOptimizer over torch Adam has no state (not even ``step``) until its first step,
    and its ``state_dict`` asserts on that. Megatron fills such state with a zero-gradient step before
    loading (``_init_optimizer_states_with_dummy_values``); every value is overwritten by the load."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(opt, DistributedOptimizer) and not opt.optimizer.state:
            opt._init_optimizer_states_with_dummy_values()


def _restore_adam_steps(optimizer) -> None:
    """With torch's Adam (no apex/TE), the distributed optimizer keeps the iteration count per param
    group in its common state, but its per-bucket parameter state also carries a ``step`` that the load
    leaves at the placeholder value; Adam's bias correction reads the per-param one. Make them agree."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if inner is None:
            continue
        for group in inner.param_groups:
            if "step" not in group or group["step"] is None:
                continue
            for p in group["params"]:
                state = inner.state.get(p)
                if state and "step" in state:
                    state["step"] = torch.tensor(float(group["step"]), dtype=torch.float32)


def capture_rng_state() -> dict:
    """This rank's RNG streams: python, numpy, torch (CPU and CUDA) and Megatron's tracker."""
    from megatron.core import tensor_parallel

    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _per_rank_object(payload: Any):
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject("pz_per_rank_state", payload, (_world(),), (_rank(),), replica_id=0)


def _hf_config_dict(hf_config) -> Optional[dict]:
    if hf_config is None:
        return None
    if isinstance(hf_config, dict):
        return dict(hf_config)
    return hf_config.to_dict()


# --------------------------------------------------------------------------------------------- save


def save_checkpoint(root, step: int, model_chunks, optimizer=None, scheduler=None,
                    extra_models: Optional[dict[str, list]] = None, extra_state: Optional[dict] = None,
                    hf_config=None, tokenizer_dir=None, optimizer_format: str = "dp_reshardable",
                    rng_state: Optional[dict] = None) -> Path:
    """Write ``root/iter_{step:07d}`` atomically and point ``latest`` at it. Collective over all ranks.

    ``extra_state`` is common state (the same on every rank: step counters, data position); its
    ``per_rank`` entry, if any, is stored per rank along with each rank's RNG states (``rng_state``, as
    :func:`capture_rng_state` returned it earlier, when the state to resume from is not the current one).
    ``optimizer_format`` is one of :data:`OPTIMIZER_FORMATS` (load reads it back from the metadata).
    """
    if optimizer_format not in OPTIMIZER_FORMATS:
        raise CheckpointError(f"optimizer_format={optimizer_format!r}; expected one of {OPTIMIZER_FORMATS}")
    from megatron.core import dist_checkpointing

    if importlib.util.find_spec("psutil") is None:
        # megatron-core's torch_dist writer forks a process that needs psutil; without it the child
        # dies and the parent waits forever instead of failing.
        raise CheckpointError("saving a checkpoint needs the 'psutil' package (pip install psutil)")
    root = Path(root)
    final = root / iter_dir_name(step)
    tmp = root / f".tmp_{iter_dir_name(step)}"
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)  # left over from an interrupted save
        tmp.mkdir()
    _barrier()

    extra_state = dict(extra_state or {})
    per_rank = extra_state.pop("per_rank", None)
    state = without_copies(_sharded_state(model_chunks, optimizer, extra_models, is_loading=False,
                                          optimizer_format=optimizer_format), is_loading=False)
    state["pz_per_rank"] = _per_rank_object({"rng": rng_state or capture_rng_state(), "per_rank": per_rank})
    state["pz_common"] = {"step": int(step), "extra_state": extra_state,
                          "scheduler": scheduler.state_dict() if scheduler is not None else None}
    _writer_results_in_process()
    dist_checkpointing.save(state, str(tmp))

    if _rank() == 0:
        params = _unwrap(model_chunks[0]).config.params_dtype if hasattr(_unwrap(model_chunks[0]), "config") else None
        if hf_config is not None:
            (tmp / HF_CONFIG_FILE).write_text(json.dumps(_hf_config_dict(hf_config), indent=2, default=str))
        tokenizer_files = copy_tokenizer_files(tokenizer_dir, tmp / TOKENIZER_DIR)
        meta = {
            "format_version": FORMAT_VERSION,
            "step": int(step),
            "parallel": _parallel_layout(),
            "params_dtype": str(params).replace("torch.", "") if params is not None else None,
            "num_model_chunks": len(model_chunks),
            "has_optimizer": optimizer is not None,
            "optimizer_format": optimizer_format if optimizer is not None else None,
            "optimizer_layout": _optimizer_layout(optimizer),
            "has_scheduler": scheduler is not None,
            "extra_models": sorted(extra_models or {}),
            "tokenizer_files": tokenizer_files,
            "files": recorded_files(tmp),  # what the load checks: every file there, at this size
        }
        _atomic_write_text(tmp / META_FILE, json.dumps(meta, indent=2))  # completion marker
    _barrier()
    if _rank() == 0:
        _publish(root, tmp, final, step)
    _barrier()
    return final


def _optimizer_layout(optimizer) -> Optional[str]:
    """"distributed" (state sharded over DP ranks) or "local": checkpoints of the two do not load into each
    other (optimizer.use_distributed_optimizer)."""
    if optimizer is None:
        return None
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    chained = getattr(optimizer, "chained_optimizers", [optimizer])
    return "distributed" if any(isinstance(o, DistributedOptimizer) for o in chained) else "local"


def _writer_results_in_process() -> None:
    """No helper process between the checkpoint writer and this rank.

    megatron-core 0.16.1's torch_dist writer (``dist_checkpointing/strategies/filesystem_async.py``) forks
    one writer process per file and collects their results in this process
    (``write_preloaded_data_multiproc``), then hands them on through the module global ``_results_queue``,
    which ``_get_write_results_queue`` creates on first use as ``mp.get_context("spawn").Manager().Queue()``:
    a server process per rank. A stop signal sent to every process of the job ends that server (the
    default action of SIGTERM and SIGUSR1), and the save under way dies with ``BrokenPipeError``. Our saves
    are synchronous (``AsyncRequest.execute_sync``: the put and ``retrieve_write_results``'s get both run
    in this process), so an in-process queue does the same job. The forked writers inherit this process's
    signal handlers (:mod:`megatron_pz.runtime.preemption`), so they survive such a signal too.
    """
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if not hasattr(filesystem_async, "_results_queue"):
        raise CheckpointError("megatron.core.dist_checkpointing.strategies.filesystem_async has no _results_queue: "
                              "this megatron-core is not the 0.16 line this code was written against "
                              "(megatron_pz/checkpoint.py, _writer_results_in_process)")
    if not isinstance(filesystem_async._results_queue, queue.Queue):
        filesystem_async._results_queue = queue.Queue()


def _publish(root: Path, tmp: Path, final: Path, step: int) -> None:
    """Rename the finished temp dir into place, then move ``latest`` to it (each step atomic)."""
    old = None
    if final.exists():
        old = root / f".old_{final.name}"
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(root)
    current, _ = read_pointer(root)
    if current is None or current <= step:  # never backwards: an older step is written, the pointer stays
        _atomic_write_text(root / LATEST_FILE, str(int(step)))
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------------------------- load


def latest_checkpoint(root) -> Optional[Path]:
    """The newest complete checkpoint under ``root`` (None when there is none yet)."""
    root = Path(root)
    latest = root / LATEST_FILE
    if not latest.is_file():
        return None
    text = latest.read_text().strip()
    try:
        step = int(text)
    except ValueError:
        raise CheckpointError(f"{latest} should hold a step number, found {text!r}")
    path = root / iter_dir_name(step)
    if not (path / META_FILE).is_file():
        raise CheckpointError(f"{latest} points at step {step} but {path} is missing or incomplete")
    return path


def resolve_checkpoint_dir(path) -> Path:
    """An iteration dir as given, or the latest one when ``path`` is a checkpoint root; either way complete
    (:func:`megatron_pz.checkpoint_integrity.problems`), else :class:`CheckpointError` says what is missing and,
    for a root, which complete checkpoint to name instead."""
    path = Path(path)
    if path.name.startswith((".tmp_", ".old_")):
        raise CheckpointError(f"{path} is a temporary directory of a save that did not finish; not loading it")
    if not path.exists():
        raise CheckpointError("does not exist", path, "give a checkpoint root (with "
                              f"{LATEST_FILE}) or one of its iter_* folders")
    if (path / LATEST_FILE).is_file() or iteration_steps(path):
        point = find_resume(path)
        if point.damaged:
            instead = (f"the newest complete one is {point.path}: name that folder instead" if point.path
                       else "it holds no complete checkpoint")
            raise CheckpointError(f"{point.what_is_wrong()}; {instead}")
        if point.path is None:
            raise CheckpointError("holds no checkpoint yet", path)
        return point.path
    if (path / META_FILE).is_file() or (path / "metadata.json").is_file():
        found = problems(path)
        if found:
            raise CheckpointError(f"incomplete: {describe(found)}", path,
                                  "the save that wrote it did not finish, or a file was lost since")
        return path
    raise CheckpointError(f"{path} is neither a checkpoint root (with {LATEST_FILE}) nor a finished "
                          f"iteration dir (with {META_FILE})")


def read_metadata(path) -> dict:
    return json.loads((resolve_checkpoint_dir(path) / META_FILE).read_text())


def read_hf_config(path):
    """The Hugging Face config stored with a checkpoint (a ``PretrainedConfig``)."""
    ckpt = resolve_checkpoint_dir(path)
    if not (ckpt / HF_CONFIG_FILE).is_file():
        raise CheckpointError(f"{ckpt} has no {HF_CONFIG_FILE}: it was saved without hf_config")
    return load_hf_config(ckpt / HF_CONFIG_FILE)


def load_checkpoint(path, model_chunks, optimizer=None, scheduler=None, extra_models=None,
                    strict: bool = True, restore_rng: bool = True) -> dict:
    """Load into the given (already built) model chunks and optimizer; return ``{"step", **extra_state}``.

    ``path`` is a root (the latest checkpoint is read) or an iteration dir. Model weights reshard across
    TP/PP/EP changes. Per-rank state (RNG, ``extra_state['per_rank']``) is only restored when the world
    size matches the one at save; the result's ``per_rank_restored`` says whether it was.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.core import CheckpointingException
    from torch.distributed.checkpoint.api import CheckpointException as TorchCheckpointException

    ckpt = resolve_checkpoint_dir(path)
    meta = json.loads((ckpt / META_FILE).read_text())
    if optimizer is not None and not meta.get("has_optimizer"):
        raise CheckpointError(f"{ckpt} holds weights only, no optimizer state (an HF import or a warm start)",
                              remedy="start a run from it with train.init_checkpoint (API: optimizer=None)")
    layout, mine = meta.get("optimizer_layout"), _optimizer_layout(optimizer)
    if optimizer is not None and layout and layout != mine:
        raise CheckpointError(f"{ckpt} holds a {layout} optimizer's state, this run builds a {mine} one",
                              remedy=f"set optimizer.use_distributed_optimizer={str(layout == 'distributed').lower()}")
    missing_extra = sorted(set(extra_models or {}) - set(meta.get("extra_models", [])))
    if missing_extra:
        raise CheckpointError(f"{ckpt} holds no extra model(s) {missing_extra}; it has {meta.get('extra_models')}")

    state = without_copies(_sharded_state(model_chunks, optimizer, extra_models, is_loading=True,
                                          optimizer_format=meta.get("optimizer_format") or "dp_reshardable"),
                           is_loading=True)
    same_world = meta["parallel"].get("world_size") == _world()
    if same_world:
        state["pz_per_rank"] = _per_rank_object(None)
    # The checkpoint may hold more than asked for (optimizer, teacher): that is fine. What does not fit (a
    # shape, a key) fails inside dist_checkpointing; the message then names this checkpoint.
    try:
        loaded = dist_checkpointing.load(state, str(ckpt), strict="assume_ok_unexpected")
    except (CheckpointingException, TorchCheckpointException, KeyError, EOFError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"cannot load {ckpt}: {_first_line(exc)}",
                              remedy="does it hold this model (model.*) and optimizer (optimizer.*)?") from exc

    def load_chunks(chunks, prefix):
        keys = ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]
        for chunk, key in zip(chunks, keys):
            sd = loaded[f"{prefix}{key}"]
            if prefix:  # extra models' tensor names carry their prefix (unique checkpoint keys)
                sd = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in sd.items()}
            _unwrap(chunk).load_state_dict(sd, strict=strict)

    load_chunks(model_chunks, "")
    for name, chunks in (extra_models or {}).items():
        load_chunks(chunks, f"extra_models.{name}.")
    if optimizer is not None:
        with torch.no_grad():  # it copies into leaf main params in place
            optimizer.load_state_dict(loaded["optimizer"])
        _restore_adam_steps(optimizer)
    common = loaded.get("pz_common", {})
    if scheduler is not None:
        if common.get("scheduler") is None:
            raise CheckpointError(f"{ckpt} holds no scheduler state")
        scheduler.load_state_dict(common["scheduler"])
    result = {"step": int(common.get("step", meta["step"])), **common.get("extra_state", {})}
    result["per_rank_restored"] = same_world
    if same_world:
        per_rank = loaded["pz_per_rank"]
        if restore_rng:
            restore_rng_state(per_rank["rng"])
        if per_rank.get("per_rank") is not None:
            result["per_rank"] = per_rank["per_rank"]
    return result


def _first_line(exc: BaseException, limit: int = 300) -> str:
    """``Type: message``, its first line, shortened; torch's CheckpointException: the first rank's error."""
    failures = getattr(exc, "failures", None)
    if failures:
        exc = next(iter(failures.values()))[0]
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= limit else text[:limit] + " ..."
