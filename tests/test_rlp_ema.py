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


def test_ema_moves_a_bf16_teacher():
    """RLP's tau = 0.999 on a bf16 teacher: a 0.1 % step is below bf16's resolution, so an average
    kept in bf16 never moves. After 1,000 steps toward a policy 2 bf16 ulps away the fp32 average is
    1 + d * (1 - 0.999**1000) and the teacher holds it rounded to bf16 (the old code stayed at 1.0)."""
    policy = [Wrapper(net(1.0).to(torch.bfloat16))]
    teacher = EmaTeacher([net(1.0).to(torch.bfloat16)], tau=0.999)
    teacher.update(policy)  # initialise
    target = torch.tensor(1.0 + 2 * 2.0 ** -7, dtype=torch.bfloat16)  # 1.015625, exact in bf16
    with torch.no_grad():
        for p in policy[0].module.parameters():
            p.fill_(target)
    for _ in range(1000):
        teacher.update(policy)
    expected = 1.0 + (target.item() - 1.0) * (1.0 - 0.999 ** 1000)  # 1.009880...
    for name, p in unwrap_params(teacher):
        assert p.dtype == torch.bfloat16
        assert torch.all(p == torch.tensor(expected, dtype=torch.bfloat16)), (name, p)  # 1.0078125, not 1.0
        assert torch.allclose(teacher.shadow[name], torch.full_like(teacher.shadow[name], expected), atol=5e-5)
    # the shadow survives the EMA's own checkpoint
    restored = EmaTeacher([net(0.0).to(torch.bfloat16)], tau=0.5)
    restored.load_state_dict(teacher.state_dict())
    assert restored.shadow.keys() == teacher.shadow.keys()
    assert all(torch.equal(restored.shadow[k], teacher.shadow[k]) for k in teacher.shadow)


def unwrap_params(teacher):
    from megatron_pz.rl.ema import _named_params

    return list(_named_params(teacher.chunks).items())


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
