"""Rollout engines: turn prompts into sampled completions (Megatron KV-cache decoding, vLLM)."""
