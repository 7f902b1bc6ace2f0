"""Actor.finish_param_sync with the distributed optimizer and overlap_param_gather (DP=2).

After ``train_step`` each rank has updated only its shard; with ``overlap_param_gather`` the other
shard is gathered lazily by the next forward. Checks: right after the step the parameters differ
between the two ranks (stale halves, what an EMA update or a weight sync would read), after
``finish_param_sync`` they are equal on both ranks and equal to what the next forward uses (a second
call changes nothing), and the next training step still runs. Prints PARAM_SYNC_OK.
"""

import torch
import torch.distributed as dist

from megatron_pz.config import ModelConfig, OptimizerConfig, ParallelConfig, RuntimeConfig
from megatron_pz.model import load_hf_config
from megatron_pz.runtime import initialize
from megatron_pz.train.actor import Actor, unwrap
from megatron_pz.train.batching import TokenSequence, make_micro_batches

TINY = dict(model_type="qwen3", vocab_size=256, hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            tie_word_embeddings=False)


def loss_fn(mb, logits):
    from megatron_pz.train.losses import token_logprobs

    logp = token_logprobs(mb, logits)
    n = mb.loss_mask.sum()
    return -(logp * mb.loss_mask).sum(), n.to(torch.int), {"num_tokens": n.detach()}


def flat(actor):
    return torch.cat([p.detach().reshape(-1).float() for p in unwrap(actor.chunks[0]).parameters()])


def gathered(vector):
    parts = [torch.empty_like(vector) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, vector)
    return parts


def main():
    parallel = ParallelConfig()
    info = initialize(parallel, RuntimeConfig(device="cpu", seed=3))
    hf = load_hf_config(TINY)
    opt = OptimizerConfig(lr=1e-2, use_distributed_optimizer=True, overlap_param_gather=True,
                          overlap_grad_reduce=True)
    actor = Actor(hf, ModelConfig(), parallel, opt, info.device, total_steps=4)
    g = torch.Generator().manual_seed(100 + dist.get_rank())  # different data per DP rank
    rows = [TokenSequence(torch.randint(0, 256, (12,), generator=g).tolist(), [1.0] * 12, index=i) for i in range(4)]
    batches = make_micro_batches(rows, 64, 0)
    before = flat(actor)
    actor.train_step(batches, loss_fn)
    stale = gathered(flat(actor))
    assert not torch.equal(stale[0], stale[1]), "expected lazily gathered (stale) shards right after the step"
    assert not torch.equal(flat(actor), before)  # this rank's own shard did move
    actor.finish_param_sync()
    fresh = gathered(flat(actor))
    assert torch.equal(fresh[0], fresh[1]), "finish_param_sync must leave every rank with the same parameters"
    actor.finish_param_sync()  # nothing pending: no change
    assert torch.equal(flat(actor), fresh[0])
    mine = flat(actor)
    with torch.no_grad():  # the next forward's own lazy gather finds nothing left to change
        chunk = actor.chunks[0]
        chunk.eval()
        chunk(batches[0].input_ids, batches[0].position_ids, None)
        chunk.train()
    assert torch.equal(flat(actor), mine)
    actor.train_step(batches, loss_fn)  # training goes on
    actor.finish_param_sync()
    again = gathered(flat(actor))
    assert torch.equal(again[0], again[1]) and not torch.equal(again[0], mine)
    print(f"rank {dist.get_rank()}: finish_param_sync OK", flush=True)
    dist.barrier()
    print("PARAM_SYNC_OK", flush=True)


if __name__ == "__main__":
    main()
