"""TP=2: log-probs and entropies from vocabulary shards equal full-vocabulary log_softmax.

Each rank holds half of a full logits tensor (same seed on both ranks); values and gradients with
respect to its shard must equal the full computation's to 1e-6, with the group given explicitly
and taken from Megatron's parallel_state, and agree with Megatron's vocab_parallel_cross_entropy.
"""

import torch

from megatron_pz.config import ParallelConfig, RuntimeConfig
from megatron_pz.rl.logprobs import vocab_parallel_entropy, vocab_parallel_logprobs
from megatron_pz.runtime import initialize


def main():
    info = initialize(ParallelConfig(tp=2), RuntimeConfig(device="cpu"))
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    group = parallel_state.get_tensor_model_parallel_group()
    rank = parallel_state.get_tensor_model_parallel_rank()
    gen = torch.Generator().manual_seed(7)
    b, s, v = 3, 5, 16
    full = torch.randn(b, s, v, generator=gen) * 3.0
    full[0, 0] += 1000.0  # large logits: the max shift must keep it finite
    targets = torch.randint(0, v, (b, s), generator=gen)
    targets[1, :] = torch.tensor([0, 7, 8, 15, 9])  # both shards' edges
    c_lp = torch.randn(b, s, generator=gen)
    c_ent = torch.randn(b, s, generator=gen)

    ref_full = full.clone().requires_grad_(True)
    ref_logp_all = torch.log_softmax(ref_full, -1)
    ref_lp = ref_logp_all.gather(-1, targets[..., None]).squeeze(-1)
    ref_ent = -(ref_logp_all.exp() * ref_logp_all).sum(-1)
    ((ref_lp * c_lp).sum() + (ref_ent * c_ent).sum()).backward()
    ref_grad = ref_full.grad[..., rank * v // 2:(rank + 1) * v // 2]

    for tp_group in (group, None):
        shard = full[..., rank * v // 2:(rank + 1) * v // 2].clone().requires_grad_(True)
        lp = vocab_parallel_logprobs(shard, targets, tp_group=tp_group)
        ent = vocab_parallel_entropy(shard, tp_group=tp_group)
        assert torch.allclose(lp, ref_lp.detach(), atol=1e-6, rtol=0), (lp - ref_lp).abs().max()
        assert torch.allclose(ent, ref_ent.detach(), atol=1e-5, rtol=1e-6), (ent - ref_ent).abs().max()
        ((lp * c_lp).sum() + (ent * c_ent).sum()).backward()
        err = (shard.grad - ref_grad).abs().max().item()
        assert err < 1e-6, f"rank {rank}: gradient differs by {err}"

    shard = full[..., rank * v // 2:(rank + 1) * v // 2].clone()
    megatron_lp = -vocab_parallel_cross_entropy(shard.transpose(0, 1).contiguous(), targets.t().contiguous()).t()
    assert torch.allclose(vocab_parallel_logprobs(shard, targets), megatron_lp, atol=1e-5)
    print(f"rank {info.rank}: logprob/entropy TP=2 == full vocabulary OK", flush=True)


if __name__ == "__main__":
    main()
