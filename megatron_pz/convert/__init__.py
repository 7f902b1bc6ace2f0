"""Hugging Face <-> Megatron conversion (Qwen3, Qwen3-MoE, Llama; local and Transformer Engine specs).

Public entry points: :func:`megatron_pz.convert.weights.megatron_to_hf_tensors` (export, rollout
weight sync), :func:`megatron_pz.convert.weights.load_hf_tensors` (import),
:func:`megatron_pz.convert.hf_to_megatron.import_hf_checkpoint` and
:func:`megatron_pz.convert.megatron_to_hf.export_hf_checkpoint` (the ``convert`` commands).
"""
