"""megatron-pz: reinforcement pretraining (PretrainZero, RLP) on raw text with Megatron-Core.

Importing the package is cheap and GPU-free: Transformer Engine and vLLM are imported only by the
code paths that use them (TE layer spec, FP8, the vLLM rollout engine).
"""

__version__ = "0.1.0"
