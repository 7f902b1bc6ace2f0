"""megatron-pz: reinforcement pretraining (PretrainZero, RLP) on raw text with Megatron-Core.

Importing the package is cheap and GPU-free: Transformer Engine and vLLM are imported only by the
code paths that use them (TE layer spec, FP8, the vLLM rollout engine).
"""

__version__ = "0.1.0"

# Before megatron-core is first imported: its import-time notices about optional GPU packages and the
# deprecations it triggers are expected (listed with reasons there); other warnings stay visible.
from megatron_pz.runtime.expected_warnings import silence_expected_warnings  # noqa: E402
from megatron_pz.runtime.lean_imports import defer_torch_compile_in_megatron, skip_sklearn_in_transformers_generation  # noqa: E402,E501

silence_expected_warnings()
skip_sklearn_in_transformers_generation()
defer_torch_compile_in_megatron()
