"""Reinforcement-pretraining objectives: PretrainZero, its baselines (Random RLPT, next-token
reasoning, RPT) and RLP. Each turns passages into rewarded, advantage-filled experiences."""
