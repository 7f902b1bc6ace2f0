"""EMA teacher: phi <- tau * phi + (1 - tau) * theta, by hand numbers, through DDP-style wrappers."""

import pytest
import torch

from megatron_pz.rl.ema import EmaTeacher


class Wrapper(torch.nn.Module):
    """Stands for Megatron's DDP / Float16Module: the real model sits in ``.module``."""

    def __init__(self, module):
        super().__init__()
        self.module = module


def net(value: float):
    m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2))
    with torch.no_grad():
        for p in m.parameters():
            p.fill_(value)
    return m


def test_ema_formula_by_hand():
    policy = [Wrapper(Wrapper(net(3.0)))]
    teacher = EmaTeacher([net(1.0)], tau=0.9)
    assert not any(p.requires_grad for p in teacher.chunks[0].parameters())
    teacher.update(policy)  # first call: copy (RLP initialises the teacher to theta)
    assert all(torch.all(p == 3.0) for p in teacher.chunks[0].parameters())
    with torch.no_grad():
        for p in policy[0].module.module.parameters():
            p.fill_(1.0)
    teacher.update(policy)  # 0.9 * 3 + 0.1 * 1 = 2.8
    assert all(torch.allclose(p, torch.full_like(p, 2.8)) for p in teacher.chunks[0].parameters())
    teacher.update(policy)  # 0.9 * 2.8 + 0.1 * 1 = 2.62
    assert all(torch.allclose(p, torch.full_like(p, 2.62)) for p in teacher.chunks[0].parameters())


def test_ema_per_parameter_values_and_checkpoint():
    torch.manual_seed(0)
    policy, teacher_net = net(0.0), net(0.0)
    with torch.no_grad():
        for p in policy.parameters():
            p.copy_(torch.randn_like(p))
        for p in teacher_net.parameters():
            p.copy_(torch.randn_like(p))
    before = [p.clone() for p in teacher_net.parameters()]
    teacher = EmaTeacher([teacher_net], tau=0.999)
    teacher.initialized = True  # as after a resume: no re-copy
    teacher.update([policy])
    for phi0, phi, theta in zip(before, teacher_net.parameters(), policy.parameters()):
        assert torch.allclose(phi, 0.999 * phi0 + 0.001 * theta, atol=1e-7)

    restored = EmaTeacher([net(5.0)], tau=0.5)
    restored.load_state_dict(teacher.state_dict())
    assert restored.tau == 0.999 and restored.initialized
    for a, b in zip(restored.chunks[0].parameters(), teacher_net.parameters()):
        assert torch.equal(a, b)


def test_ema_refuses_mismatched_models():
    teacher = EmaTeacher([net(0.0)], tau=0.9)
    with pytest.raises(ValueError, match="only in policy"):
        teacher.update([torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2), torch.nn.Linear(2, 2))])
    with pytest.raises(ValueError, match="shape"):
        teacher.update([torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.LayerNorm(2))])
    with pytest.raises(ValueError, match="tau"):
        EmaTeacher([net(0.0)], tau=1.5)


@pytest.mark.slow
def test_ema_on_megatron_chunks_tp2():
    from multiproc import run_torchrun

    out = run_torchrun("ema_tp2.py", nproc=2, timeout=300)
    assert out.count("TP-sharded params OK") == 2
