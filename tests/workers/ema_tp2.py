"""EMA teacher on real Megatron chunks at TP=2: the policy is the Actor's DDP-wrapped GPTModel.

Checks: names match through the DDP wrapper; after initialize_from the teacher's vocab-parallel
log-probs equal the policy's; after the policy moves, every local shard follows
phi = tau * phi_old + (1 - tau) * theta exactly.
"""

import torch

from megatron_pz.config import ModelConfig, OptimizerConfig, ParallelConfig, RuntimeConfig
from megatron_pz.model import load_hf_config
from megatron_pz.rl.ema import EmaTeacher
from megatron_pz.rl.logprobs import vocab_parallel_logprobs
from megatron_pz.runtime import initialize
from megatron_pz.train.actor import Actor, build_model_chunks, unwrap

TINY = dict(model_type="qwen3", vocab_size=256, hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            tie_word_embeddings=False)


def logprobs(chunk, ids):
    pos = torch.arange(ids.shape[1])[None].expand_as(ids)
    with torch.no_grad():
        logits = chunk(ids, pos, attention_mask=None)
    return vocab_parallel_logprobs(logits[:, :-1], ids[:, 1:])


def main():
    parallel = ParallelConfig(tp=2)
    info = initialize(parallel, RuntimeConfig(device="cpu"))
    hf = load_hf_config(TINY)
    actor = Actor(hf, ModelConfig(), parallel, OptimizerConfig(), info.device, total_steps=1)
    teacher = EmaTeacher(build_model_chunks(hf, ModelConfig(), parallel, info.device), tau=0.9)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))

    before = logprobs(teacher.chunks[0], ids)
    teacher.update(actor.chunks)  # first call initialises phi <- theta
    assert teacher.initialized
    after, policy_lp = logprobs(teacher.chunks[0], ids), logprobs(actor.chunks[0], ids)
    assert torch.equal(after, policy_lp), (after - policy_lp).abs().max()
    assert not torch.allclose(before, after)

    phi_old = {n: p.detach().clone() for n, p in unwrap(teacher.chunks[0]).named_parameters()}
    with torch.no_grad():
        for p in unwrap(actor.chunks[0]).parameters():
            p.add_(torch.randn_like(p) * 0.1)
    teacher.update(actor.chunks)
    theta = dict(unwrap(actor.chunks[0]).named_parameters())
    checked = 0
    for name, phi in unwrap(teacher.chunks[0]).named_parameters():
        expected = 0.9 * phi_old[name] + 0.1 * theta[name].detach()
        assert torch.allclose(phi, expected, atol=1e-6), name
        checked += 1
    assert checked == len(theta) and "decoder.layers.0.self_attention.linear_qkv.weight" in theta
    print(f"rank {info.rank}: EMA over {checked} TP-sharded params OK", flush=True)


if __name__ == "__main__":
    main()
