"""RMSNorm for the local (CPU) layer spec under sequence parallelism.

megatron-core 0.16.1's local spec builds its norms with ``WrappedTorchNorm``, which asserts
``not config.sequence_parallel``. The reason is the weight gradient, not the math: under sequence
parallelism each tensor-parallel rank normalises its own block of the sequence with a replicated weight,
so each rank's weight gradient is a partial sum. Transformer Engine's norms mark such weights
``sequence_parallel = True`` and ``finalize_model_grads`` (``_allreduce_non_tensor_model_parallel_grads``)
all-reduces them over TP, as it does for the MoE router's weight. This norm is ``torch.nn.RMSNorm`` with
that mark, so the local spec can run TP with SP (and so MoE with TP) on CPU.
"""

from __future__ import annotations

import torch


class SequenceParallelRMSNorm(torch.nn.RMSNorm):
    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused):
        if config.normalization != "RMSNorm":
            raise ValueError(f"SequenceParallelRMSNorm is an RMSNorm; the model asks for {config.normalization}")
        super().__init__(normalized_shape=hidden_size, eps=eps)
        self.weight.sequence_parallel = bool(config.sequence_parallel)


def use_sequence_parallel_norms(spec) -> None:
    """Replace every ``WrappedTorchNorm`` in a layer / block spec (in place) by :class:`SequenceParallelRMSNorm`."""
    import dataclasses

    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    def swap(node):
        if node is WrappedTorchNorm:
            return SequenceParallelRMSNorm
        if isinstance(node, ModuleSpec):
            node.module = swap(node.module)
            node.submodules = swap(node.submodules)
        elif isinstance(node, list):
            node[:] = [swap(x) for x in node]
        elif dataclasses.is_dataclass(node) and not isinstance(node, type):
            for f in dataclasses.fields(node):
                setattr(node, f.name, swap(getattr(node, f.name)))
        return node

    swap(spec)
