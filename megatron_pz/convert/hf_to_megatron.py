"""Import: a Hugging Face safetensors folder -> a Megatron distributed checkpoint (step 0, no optimizer).

Runs in-process on every rank of a world of ``tp*pp*ep`` ranks (the CLI launches that world itself
with torchrun when started as a single process). Each rank reads, tensor by tensor, only the HF
tensors of the parameters it owns, keeps its shard, and the ranks together write the checkpoint.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

import torch.distributed as dist

from megatron_pz.checkpoint import save_checkpoint
from megatron_pz.config import ConfigError, ModelConfig, ParallelConfig, RuntimeConfig, validate_parallel_sizes
from megatron_pz.convert.hf_io import CheckpointFormatError, HFCheckpointReader, check_against_config
from megatron_pz.convert.targets import check_import_target
from megatron_pz.convert.weights import WeightMismatchError, load_hf_tensors
from megatron_pz.errors import during_work
from megatron_pz.model.provider import build_model, load_hf_config
from megatron_pz.runtime import initialize

log = logging.getLogger(__name__)

_DTYPE_NAMES = {"float32", "bfloat16", "float16"}


def params_dtype_of(hf_config, requested: str = "auto") -> str:
    """The dtype to build the model in: as requested, else the HF config's own dtype, else float32."""
    if requested != "auto":
        if requested not in _DTYPE_NAMES:
            raise ConfigError(f"--dtype must be one of auto, {', '.join(sorted(_DTYPE_NAMES))}; got {requested!r}")
        return requested
    dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    name = str(dtype).replace("torch.", "") if dtype is not None else "float32"
    return name if name in _DTYPE_NAMES else "float32"


def world_size_for(tp: int, pp: int, ep: int) -> int:
    return tp * pp * ep


def build_model_from_hf(hf_dir, parallel: ParallelConfig, dtype: str = "auto", device: str = "auto"):
    """Initialise the world at ``parallel``, build this rank's model and fill it from ``hf_dir``.

    Collective. Returns ``(model, hf_config)``. Every tensor of the folder must be used by some rank.
    """
    hf_dir = Path(hf_dir)
    hf_config = load_hf_config(hf_dir)
    reader = HFCheckpointReader(hf_dir)
    skipped = check_against_config(reader, hf_config)  # same verdict on every rank, before any collective
    validate_parallel_sizes(parallel, hf_config, int(os.environ.get("WORLD_SIZE", "1")))
    with during_work():
        return _build_and_fill(hf_dir, hf_config, reader, skipped, parallel, dtype, device)


def _build_and_fill(hf_dir: Path, hf_config, reader: HFCheckpointReader, skipped: list[str], parallel: ParallelConfig,
                    dtype: str, device: str):
    info = initialize(parallel, RuntimeConfig(device=device))
    # every parameter is overwritten below (unused/missing tensors are errors), so skip the random init
    model = build_model(hf_config, ModelConfig(params_dtype=params_dtype_of(hf_config, dtype), spec="auto",
                                               init_weights=False),
                        parallel, device=info.device)
    used = load_hf_tensors([model], hf_config, reader.get)
    everyone: list[Optional[set]] = [None] * info.world_size
    dist.all_gather_object(everyone, used)
    used_anywhere = set().union(*everyone)
    unused = sorted(set(reader.names()) - used_anywhere - set(skipped))
    if unused:
        raise WeightMismatchError(f"{len(unused)} tensor(s) of {hf_dir} were not used by any rank: "
                                  + ", ".join(unused[:12]))
    if skipped and info.rank == 0:
        log.warning("skipped %d derived tensor(s) of %s: %s", len(skipped), hf_dir, ", ".join(skipped))
    return model, hf_config


def import_hf_checkpoint(hf_dir, out_dir, tp: int = 1, pp: int = 1, ep: int = 1, dtype: str = "auto",
                         device: str = "auto", into_existing: bool = False) -> Path:
    """Convert ``hf_dir`` into ``out_dir/iter_0000000`` at the given layout; return that directory.

    ``out_dir`` must be new, empty or a previous import; a run's checkpoints only with ``into_existing``,
    and then their latest pointer stays (:func:`megatron_pz.convert.targets.check_import_target`).
    Call on every rank of the world (or in a plain process for tp=pp=ep=1).
    """
    check_import_target(hf_dir, out_dir, into_existing)
    model, hf_config = build_model_from_hf(hf_dir, ParallelConfig(tp=tp, pp=pp, ep=ep), dtype, device)
    with during_work():
        path = save_checkpoint(out_dir, 0, [model], hf_config=hf_config, tokenizer_dir=hf_dir)
    if dist.get_rank() == 0:
        log.info("imported %s into %s (tp=%d pp=%d ep=%d)", hf_dir, path, tp, pp, ep)
    return path


__all__ = ["build_model_from_hf", "import_hf_checkpoint", "params_dtype_of", "world_size_for",
           "CheckpointFormatError"]
