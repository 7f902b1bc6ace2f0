"""Parity of parallel layouts on real Megatron code paths (run under torchrun, gloo, CPU).

usage: parity_worker.py MODE OUT_DIR
  tp  : TP=1 logits vs TP=2 logits (gathered) for the same weights
  pp  : PP=1 vs PP=2 losses over 2 training steps (same weights, same batch)
  ep  : MoE EP=1 vs EP=2 losses over 2 training steps
  dp  : 3 training steps, DP=world with the distributed optimizer; writes final params to OUT_DIR
The same weights reach each layout through a Megatron distributed checkpoint written by the first.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_pz.config import ModelConfig, OptimizerConfig, ParallelConfig, RuntimeConfig
from megatron_pz.model import build_model, load_hf_config
from megatron_pz.runtime import initialize
from megatron_pz.train.actor import Actor, unwrap
from megatron_pz.train.batching import TokenSequence, make_micro_batches
from megatron_pz.train.losses import next_token_loss

DENSE = dict(model_type="qwen3", vocab_size=256, hidden_size=64, intermediate_size=128,
             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             tie_word_embeddings=False)
MOE = dict(DENSE, model_type="qwen3_moe", moe_intermediate_size=32, num_experts=4,
           num_experts_per_tok=2, norm_topk_prob=True, router_aux_loss_coef=0.0)


def batch(num_rows=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(num_rows):
        n = 9 + 3 * i
        toks = torch.randint(0, 256, (n,), generator=g).tolist()
        rows.append(TokenSequence(toks, [1.0] * n, index=i))
    return rows


def save_weights(model, path):
    from megatron.core import dist_checkpointing

    Path(path).mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(unwrap(model).sharded_state_dict(), str(path))


def load_weights(model, path):
    from megatron.core import dist_checkpointing

    m = unwrap(model)
    state = dist_checkpointing.load(m.sharded_state_dict(), str(path))
    m.load_state_dict(state)


def gathered_logits(model, ids):
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    with torch.no_grad():
        out = model(ids, pos, None)
    return gather_from_tensor_model_parallel_region(out)


def train_losses(hf, par, weights, steps=2, save_to=None, rows=None, opt_cfg=None):
    initialize(par, RuntimeConfig(device="cpu"))
    opt_cfg = opt_cfg or OptimizerConfig(lr=1e-2, clip_grad=1.0, use_distributed_optimizer=True)
    actor = Actor(hf, ModelConfig(), par, opt_cfg, torch.device("cpu"), total_steps=10)
    if save_to:
        save_weights(actor.chunks[0], save_to)
    if weights:
        load_weights(actor.chunks[0], weights)
    losses = []
    for _ in range(steps):
        mbs = make_micro_batches(rows or batch(), max_tokens_per_micro_batch=40)
        result = actor.train_step(mbs, next_token_loss)
        losses.append(result.metrics["loss_sum"] / result.metrics["num_tokens"])
    return losses, actor


def main():
    mode, out = sys.argv[1], Path(sys.argv[2])
    world = int(__import__("os").environ["WORLD_SIZE"])
    report = {}
    if mode == "tp":
        hf = load_hf_config(DENSE)
        ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
        initialize(ParallelConfig(tp=1), RuntimeConfig(device="cpu"))
        m1 = build_model(hf, ModelConfig(), ParallelConfig(tp=1))
        ref = gathered_logits(m1, ids)
        save_weights(m1, out / "w")
        initialize(ParallelConfig(tp=2), RuntimeConfig(device="cpu"))
        m2 = build_model(hf, ModelConfig(), ParallelConfig(tp=2))
        shard_cols = unwrap(m2).output_layer.weight.shape[0]
        load_weights(m2, out / "w")
        got = gathered_logits(m2, ids)
        report = dict(max_abs_diff=(got - ref).abs().max().item(), shard_vocab=shard_cols,
                      ref_abs_mean=ref.abs().mean().item())
    elif mode in ("pp", "ep"):
        hf = load_hf_config(DENSE if mode == "pp" else MOE)
        base, split = (ParallelConfig(), ParallelConfig(pp=2)) if mode == "pp" else \
            (ParallelConfig(), ParallelConfig(ep=2))
        ref, ref_actor = train_losses(hf, base, None, save_to=out / "w")
        got, actor = train_losses(hf, split, out / "w")
        count = lambda a: sum(p.numel() for p in a.chunks[0].parameters())  # noqa: E731
        report = dict(ref=ref, got=got, local_params=count(actor), full_params=count(ref_actor))
    elif mode == "dp":
        hf = load_hf_config(DENSE)
        rows = batch(num_rows=4, seed=3)
        initialize(ParallelConfig(), RuntimeConfig(device="cpu"))
        rank = dist.get_rank()
        mine = rows[rank::world]  # DP shards of the concatenated batch
        opt = OptimizerConfig(lr=1e-2, clip_grad=1.0, use_distributed_optimizer=world > 1)
        losses, actor = train_losses(hf, ParallelConfig(), None, steps=3, rows=mine, opt_cfg=opt)
        params = {n: p.detach().clone() for n, p in unwrap(actor.chunks[0]).named_parameters()}
        if rank == 0:
            torch.save(params, out / f"params_world{world}.pt")
        report = dict(losses=losses)
    if dist.get_rank() == 0:
        (out / f"{mode}_world{world}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
