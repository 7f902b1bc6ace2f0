"""RL algorithm core: experience records, GRPO loss and advantages, vocab-parallel log-probs."""
