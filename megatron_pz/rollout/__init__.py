"""Rollout engines: turn prompts into sampled completions (Megatron KV-cache decoding, the ``hf`` engine, vLLM),
and what every engine shares (the engine protocol, request checks and noise streams, the rollout/train phases,
the bucketed weight sync). Rollouts on ranks of their own are :mod:`megatron_pz.disagg`."""
