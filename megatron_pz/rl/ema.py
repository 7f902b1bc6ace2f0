"""EMA teacher for RLP: a slowly moving copy of the policy that scores the no-think baseline.

    phi <- tau * phi + (1 - tau) * theta        after every optimizer step (RLP: tau = 0.999)

The teacher is a second set of model chunks with the policy's architecture and parallel layout,
so every rank updates its own shard locally (no communication). Parameters are matched by name
after unwrapping DDP / Float16Module ``.module`` wrappers; a missing or extra name is an error,
never a silent skip. Buffers are not averaged (Megatron's are derived, e.g. rotary frequencies).

Checkpointing: ``state_dict()`` holds tau, the initialised flag and each teacher chunk's
``state_dict``; a trainer using distributed checkpoints may instead save the teacher chunks like
model chunks (``sharded_state_dict``) and ``EmaTeacher.initialized`` with its own state.
"""

from __future__ import annotations

import torch


def unwrap(module):
    while hasattr(module, "module") and isinstance(module.module, torch.nn.Module):
        module = module.module
    return module


def _named_params(chunks) -> dict[str, torch.nn.Parameter]:
    out = {}
    for i, chunk in enumerate(chunks):
        for name, p in unwrap(chunk).named_parameters():
            out[f"{i}.{name}"] = p
    return out


class EmaTeacher:
    def __init__(self, teacher_chunks, tau: float = 0.999):
        if not 0.0 <= tau <= 1.0:
            raise ValueError(f"EMA tau must be in [0, 1], got {tau}")
        self.chunks = list(teacher_chunks)
        self.tau = float(tau)
        self.initialized = False
        for chunk in self.chunks:
            unwrap(chunk).requires_grad_(False)
            chunk.eval()

    def _pairs(self, policy_chunks):
        teacher = _named_params(self.chunks)
        policy = _named_params(policy_chunks)
        if teacher.keys() != policy.keys():
            missing = sorted(policy.keys() - teacher.keys())[:5]
            extra = sorted(teacher.keys() - policy.keys())[:5]
            raise ValueError(f"EMA teacher and policy parameters differ: only in policy {missing}, "
                             f"only in teacher {extra}")
        for name, phi in teacher.items():
            theta = policy[name]
            if phi.shape != theta.shape:
                raise ValueError(f"EMA parameter {name}: teacher shape {tuple(phi.shape)} != "
                                 f"policy shape {tuple(theta.shape)}")
            yield phi, theta

    @torch.no_grad()
    def initialize_from(self, policy_chunks) -> None:
        """phi <- theta (RLP: on the first batch)."""
        for phi, theta in self._pairs(policy_chunks):
            phi.copy_(theta)
        self.initialized = True

    @torch.no_grad()
    def update(self, policy_chunks) -> None:
        """phi <- tau * phi + (1 - tau) * theta; the first call initialises instead."""
        if not self.initialized:
            self.initialize_from(policy_chunks)
            return
        for phi, theta in self._pairs(policy_chunks):
            phi.mul_(self.tau).add_(theta.to(phi.dtype), alpha=1.0 - self.tau)

    def state_dict(self) -> dict:
        return {"tau": self.tau, "initialized": self.initialized,
                "chunks": [unwrap(c).state_dict() for c in self.chunks]}

    def load_state_dict(self, state: dict) -> None:
        if len(state["chunks"]) != len(self.chunks):
            raise ValueError(f"EMA checkpoint has {len(state['chunks'])} chunks, this run has {len(self.chunks)}")
        for chunk, sd in zip(self.chunks, state["chunks"]):
            unwrap(chunk).load_state_dict(sd)
        self.tau = float(state["tau"])
        self.initialized = bool(state["initialized"])
