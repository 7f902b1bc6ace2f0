"""Warnings we have read and expect, silenced by their exact message; every other warning stays visible.

Each entry names who raises it and why it is noise for us. Checked against megatron-core 0.16.1,
vLLM 0.32.0 and torch 2.13.0: on an upgrade, delete the filters and read what comes back.
"""

from __future__ import annotations

import warnings

EXPECTED_WARNINGS: list[tuple[type[Warning], str, str]] = [
    (UserWarning, r"Transformer Engine and Apex are not installed",
     "megatron-core's notice at import of its optimizer/fused kernels; on CPU neither can exist, and on a "
     "GPU without TE we say it once ourselves (model.provider.resolve_spec)"),
    (UserWarning, r"Apex is not installed\. Falling back to Torch Norm",
     "megatron-core's local spec; apex is not a dependency of ours (TE provides the fused norms on GPU)"),
    (FutureWarning, r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated",
     "called by megatron-core's DDP and distributed optimizer; torch 2.13 renamed them"),
    (FutureWarning, r"`load_state_dict` is deprecated and will be removed",
     "torch.distributed.checkpoint, called by megatron-core's dist_checkpointing torch strategy"),
    (FutureWarning, r"Please use DTensor instead and we are deprecating ShardedTensor",
     "megatron-core's dist_checkpointing builds ShardedTensors for the torch_dist format"),
    (FutureWarning, r"`torch\.distributed\.reduce_op` is deprecated",
     "vLLM 0.32.0's CPU platform (triton_utils/dispatcher.py) walks torch's module attributes when it binds "
     "its kernels and touches the deprecated alias; nothing of ours uses it"),
]


def silence_expected_warnings() -> None:
    """Install the filters (idempotent: ``filterwarnings`` replaces an identical filter)."""
    for category, message, _why in EXPECTED_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
