"""EMA teacher for RLP: a slowly moving copy of the policy that scores the no-think baseline.

    phi <- tau * phi + (1 - tau) * theta        after every optimizer step (RLP: tau = 0.999)

The teacher is a second set of model chunks with the policy's architecture and parallel layout,
so every rank updates its own shard locally (no communication). Parameters are matched by name
after unwrapping DDP / Float16Module ``.module`` wrappers; a missing or extra name is an error,
never a silent skip. Buffers are not averaged (Megatron's are derived, e.g. rotary frequencies).

Precision: the average is kept in fp32. In bf16 a 0.1 % step (tau = 0.999) is below the format's
resolution (8 bits of mantissa), so ``phi.mul_(tau).add_(theta, alpha=1 - tau)`` rounds back to
``phi`` and the teacher never moves. A teacher in bf16/fp16 therefore gets an fp32 shadow of each
parameter; the shadow is averaged and the teacher's parameter is the shadow rounded to its dtype. An
fp32 teacher is its own average (no shadow). The policy side is read as it is (call
``Actor.finish_param_sync`` first when parameters are gathered lazily).

Checkpointing: ``state_dict()`` holds tau, the initialised flag and each teacher chunk's
``state_dict`` and the fp32 shadows; a trainer using distributed checkpoints may instead save the
teacher chunks like model chunks (``sharded_state_dict``) and ``EmaTeacher.initialized`` with its own
state; the shadow is then rebuilt from the restored (rounded) teacher at the first update.
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
        self.shadow: dict[str, torch.Tensor] = {}  # fp32 averages of the non-fp32 teacher parameters
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
            yield name, phi, theta

    @torch.no_grad()
    def initialize_from(self, policy_chunks) -> None:
        """phi <- theta (RLP: on the first batch)."""
        self.shadow = {}
        for name, phi, theta in self._pairs(policy_chunks):
            phi.copy_(theta)
            if phi.dtype != torch.float32:
                self.shadow[name] = theta.detach().float().clone()
        self.initialized = True

    @torch.no_grad()
    def update(self, policy_chunks) -> None:
        """phi <- tau * phi + (1 - tau) * theta; the first call initialises instead."""
        if not self.initialized:
            self.initialize_from(policy_chunks)
            return
        for name, phi, theta in self._pairs(policy_chunks):
            if phi.dtype == torch.float32:
                phi.mul_(self.tau).add_(theta.float(), alpha=1.0 - self.tau)
                continue
            average = self.shadow.get(name)
            if average is None:  # after a restore of the rounded teacher only
                average = self.shadow[name] = phi.detach().float().clone()
            average.mul_(self.tau).add_(theta.float(), alpha=1.0 - self.tau)
            phi.copy_(average)

    def state_dict(self) -> dict:
        return {"tau": self.tau, "initialized": self.initialized,
                "chunks": [unwrap(c).state_dict() for c in self.chunks],
                "shadow": {k: v.clone() for k, v in self.shadow.items()}}

    def load_state_dict(self, state: dict) -> None:
        if len(state["chunks"]) != len(self.chunks):
            raise ValueError(f"EMA checkpoint has {len(state['chunks'])} chunks, this run has {len(self.chunks)}")
        for chunk, sd in zip(self.chunks, state["chunks"]):
            unwrap(chunk).load_state_dict(sd)
        self.tau = float(state["tau"])
        self.initialized = bool(state["initialized"])
        self.shadow = {k: v.clone().float() for k, v in state.get("shadow", {}).items()}
