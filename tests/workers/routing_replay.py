"""MoE routing replay (R3) on real Megatron paths (launched by tests/test_routing_replay.py).

usage: routing_replay.py MODE OUT_DIR
  single  : one process. A tiny Qwen3-MoE whose routers are near ties decodes on the Megatron engine
            (routes recorded); native training routing then disagrees with the rollout (agreement < 1,
            visible log-prob gap), replay restores agreement 1 and the dense model's gap; replayed
            native routes give native gradients (with and without full recompute); the RLP scorer's
            policy pass replays; a second model built in the process does not silence replay.
  layouts : two ranks. The same checks at EP=2 (filler micro-batches in the all-to-all), PP=2,
            PP=2 x VPP=2 and TP=2 with sequence parallelism (+ TP2+SP losses equal TP1).
Writes OUT_DIR/<mode>.json (rank 0).
  checkpoint OUT_DIR OVERRIDES... : the run config's model (examples/tiny_cpu.yaml + OVERRIDES) with
            near-tie routers, saved as a checkpoint for ``train.init_checkpoint``.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rollout_common import EOS, VOCAB, byte_tokenizer, sharpen  # noqa: E402

from megatron_pz.config import ModelConfig, OptimizerConfig, ParallelConfig, RuntimeConfig  # noqa: E402
from megatron_pz.model.provider import load_hf_config  # noqa: E402
from megatron_pz.rollout.base import SamplingParams  # noqa: E402
from megatron_pz.rollout.megatron_engine import MegatronRolloutEngine  # noqa: E402
from megatron_pz.rollout.route_recorder import RouteRecorder  # noqa: E402
from megatron_pz.model.routes import RouteShape  # noqa: E402
from megatron_pz.runtime import initialize  # noqa: E402
from megatron_pz.train.actor import Actor, build_model_chunks, unwrap  # noqa: E402
from megatron_pz.train.batching import TokenSequence  # noqa: E402
from megatron_pz.train.losses import next_token_loss, token_logprobs  # noqa: E402

NEAR_TIE = 1e-6  # router rows = u + NEAR_TIE * R: expert scores differ by about fp32 rounding
PROMPTS = ["hello world, this is", "the quick brown fox", "abc", "Paris is the capital of", "MoE routing"]


def moe_config(layers: int = 2, dense: bool = False):
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                num_attention_heads=2, num_key_value_heads=2, head_dim=32, eos_token_id=EOS,
                max_position_embeddings=512, tie_word_embeddings=False)
    if dense:
        return load_hf_config(dict(base, model_type="qwen3"))
    return load_hf_config(dict(base, model_type="qwen3_moe", num_experts=8, num_experts_per_tok=2,
                               moe_intermediate_size=64, norm_topk_prob=True, router_aux_loss_coef=0.0))


def build_actor(hf, parallel, replay="off", recompute=None, source=None):
    actor = Actor(hf, ModelConfig(recompute=recompute), parallel,
                  OptimizerConfig(lr=1e-3, use_distributed_optimizer=False), torch.device("cpu"), total_steps=10,
                  routing_replay=replay)
    if source is None:
        for chunk in actor.chunks:
            sharpen(unwrap(chunk), 4.0)
            near_tie_routers(chunk)
    else:  # the same weights as `source`
        for dst, src in zip(actor.chunks, source.chunks):
            unwrap(dst).load_state_dict(unwrap(src).state_dict())
    return actor


def near_tie_routers(chunk):
    """Every router's rows equal up to NEAR_TIE: top-k is decided by fp32 rounding, which differs
    between KV-cache decoding and the full training forward (seeded per layer: same on every rank)."""
    from megatron.core.transformer.moe.router import TopKRouter

    for module in unwrap(chunk).modules():
        if isinstance(module, TopKRouter):
            g = torch.Generator().manual_seed(1000 + int(module.layer_number))
            with torch.no_grad():
                u = torch.randn(1, module.weight.shape[1], generator=g)
                module.weight.copy_(u + NEAR_TIE * torch.randn(module.weight.shape, generator=g))


def rollouts(actor, hf, prompts, record=True):
    engine = MegatronRolloutEngine(actor.chunks, byte_tokenizer(), hf, max_batch_size=4,
                                   route_shape=RouteShape.from_hf(hf) if record else None)
    tok = byte_tokenizer()
    out = engine.generate([tok.encode(p) for p in prompts], SamplingParams(max_new_tokens=16, n=2, seed=5))
    engine.finish_phase()
    return [c for group in out for c in group]


def rows_of(completions, with_routes=True):
    return [TokenSequence(c.prompt_ids + c.token_ids, [0.0] * len(c.prompt_ids) + [1.0] * len(c.token_ids),
                          index=i, routes=c.routes if with_routes else None) for i, c in enumerate(completions)]


def world_stats(gaps: list[torch.Tensor]) -> dict:
    flat = torch.cat(gaps) if gaps else torch.zeros(0)
    t = torch.tensor([flat.sum().item(), float(flat.numel())], dtype=torch.float64)
    top = torch.tensor([flat.max().item() if flat.numel() else 0.0])
    dist.all_reduce(t)
    dist.all_reduce(top, op=dist.ReduceOp.MAX)
    return {"gap_mean": (t[0] / t[1]).item(), "gap_max": top.item(), "tokens": int(t[1])}


def measure(actor, completions, max_tokens=96) -> dict:
    """Routing agreement and |train - rollout| log-prob gap over response tokens, the old-log-prob pass."""
    batches = actor.micro_batches(rows_of(completions), max_tokens, 0)
    if actor.routing is not None:
        with actor.routing.measuring():
            values = actor.forward_values(batches, token_logprobs)
        agreement = actor.routing.take_agreement()
    else:
        values, agreement = actor.forward_values(batches, token_logprobs), None
    gaps = []
    for mb, vals in zip(batches, values):
        for r, idx in enumerate(mb.indices):
            if idx >= 0:
                c = completions[idx]
                p = len(c.prompt_ids)
                gaps.append((vals[r, p:p + len(c.token_ids)] - torch.tensor(c.logprobs)).abs())
    fillers = torch.tensor([float(sum(all(i < 0 for i in mb.indices) for mb in batches))])
    dist.all_reduce(fillers)  # fully padded micro-batches (equalize_micro_batches) over the world
    return {"agreement": agreement, **world_stats(gaps), "fillers": int(fillers.item())}


def native_training_routes(actor, hf, rows, max_tokens):
    """The routes the actor's own training forward chooses natively for ``rows`` (RECORD during one
    forward-only pass; a hook keeps each micro-batch's ids), cut like a rollout's: all tokens but the last."""
    from megatron.core import parallel_state as ps

    shape = RouteShape.from_hf(hf)
    recorder = RouteRecorder(actor.chunks, shape)
    tp = ps.get_tensor_model_parallel_world_size() if actor.transformer_config.sequence_parallel else 1
    batches = actor.micro_batches(rows, max_tokens, 0)
    kept = {id(router): [] for router, _ in recorder.routers}
    hooks = [router.register_forward_hook(
        lambda mod, args, output: kept[id(mod)].append(mod.router_replay.recorded_topk_idx.clone()))
        for router, _ in recorder.routers]
    with recorder.recording():
        actor.forward_values(batches, token_logprobs)
    for h in hooks:
        h.remove()
    out = [None] * len(rows)
    for i, mb in enumerate(batches):
        b, s = mb.input_ids.shape
        buffer = recorder.new_buffer(b, s)
        for router, column in recorder.routers:
            ids = kept[id(router)][i]
            if tp > 1:  # each TP rank routed its own sequence block: put the blocks back together
                parts = [torch.empty_like(ids) for _ in range(tp)]
                dist.all_gather(parts, ids.contiguous(), group=ps.get_tensor_model_parallel_group())
                ids = torch.cat(parts)
            buffer[:, :, column] = ids.reshape(s, b, -1).transpose(0, 1).to(torch.int32)
        buffer = recorder.gather(buffer, ps.get_pipeline_model_parallel_group(),
                                 ps.get_pipeline_model_parallel_world_size())
        for r, (idx, length) in enumerate(zip(mb.indices, mb.lengths)):
            if idx >= 0:
                out[idx] = buffer[r, :length - 1].numpy().astype(shape.dtype)
    return out


def grads_after_step(actor, rows, max_tokens):
    actor.train_step(actor.micro_batches(rows, max_tokens, 0), next_token_loss)
    return [p.main_grad.detach().clone() for chunk in actor.chunks for p in chunk.parameters()]


def schedule_loss_diff(actor, rows, max_tokens) -> float:
    """|train_step's loss - the forward-only pass's| on the same micro-batches and weights, summed over the
    world like train_step's metrics (the schedules must pair every micro-batch with its own activations)."""
    from megatron.core import parallel_state as ps

    batches = actor.micro_batches(rows, max_tokens, 0)
    values = actor.forward_values(batches, token_logprobs)
    counted = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
    forward = torch.tensor([sum(-(v * mb.loss_mask).sum().item() for v, mb in zip(values, batches)) if counted
                            else 0.0], dtype=torch.float64)
    dist.all_reduce(forward)
    trained = actor.train_step(batches, next_token_loss).metrics["loss_sum"]
    return abs(trained - forward.item())


def max_diff(a, b) -> float:
    d = torch.tensor([max((x - y).abs().max().item() for x, y in zip(a, b))])
    dist.all_reduce(d, op=dist.ReduceOp.MAX)
    return d.item()


def replay_checks(hf, parallel, prompts, recompute_too: bool) -> dict:
    """The R3 checks of one layout: off vs r3 agreement and gap, gradient equality, a second model."""
    from megatron.core.transformer.moe.router_replay import RouterReplay

    report = {}
    off = build_actor(hf, parallel, "off")
    completions = rollouts(off, hf, prompts)
    report["off"] = measure(off, completions)
    # a second model in the process (as RLP's EMA teacher), built before the replaying actor
    build_model_chunks(hf, ModelConfig(), parallel, torch.device("cpu"))
    r3 = build_actor(hf, parallel, "r3", source=off)
    report["r3"] = measure(r3, completions)
    report["replay_instances"] = len(RouterReplay.global_router_replay_instances)
    report["local_routers"] = sum(len(v) for v in r3.routing._routers.values())
    # gradients: replaying the routes native routing would choose gives native gradients; replaying
    # the rollout's (different) routes does not
    rows = rows_of(completions, with_routes=False)
    native = native_training_routes(off, hf, rows, 96)
    replayed = [TokenSequence(r.tokens, r.loss_mask, index=r.index, routes=n) for r, n in zip(rows, native)]
    report["rows_with_native_routes"] = sum(n is not None for n in native)
    report["schedule_loss_diff"] = schedule_loss_diff(build_actor(hf, parallel, "off", source=off), rows, 96)
    g_off = grads_after_step(build_actor(hf, parallel, "off", source=off), rows, 96)
    report["grad_diff_native_routes"] = max_diff(grads_after_step(build_actor(hf, parallel, "r3", source=off),
                                                                  replayed, 96), g_off)
    g_rollout = grads_after_step(build_actor(hf, parallel, "r3", source=off), rows_of(completions), 96)
    report["grad_diff_rollout_routes"] = max_diff(g_rollout, g_off)
    if recompute_too:  # the recompute in backward pops the same routes (REPLAY_BACKWARD, in forward order)
        r3_rc = build_actor(hf, parallel, "r3", recompute="full", source=off)
        report["grad_diff_native_routes_recompute"] = max_diff(grads_after_step(r3_rc, replayed, 96), g_off)
        r3_rc = build_actor(hf, parallel, "r3", recompute="full", source=off)
        report["grad_diff_rollout_routes_recompute"] = max_diff(
            grads_after_step(r3_rc, rows_of(completions), 96), g_rollout)
    return report


def dense_gap(parallel, prompts) -> dict:
    hf = moe_config(dense=True)
    actor = build_actor(hf, parallel)
    return measure(actor, rollouts(actor, hf, prompts, record=False))


def scorer_checks(hf, parallel, prompts) -> dict:
    """RLP's policy pass on prompt + thought + appended tokens: rollout routes replayed, the rest native."""
    from megatron_pz.train.scorer import MegatronScorer

    out = {}
    off = build_actor(hf, parallel, "off")
    completions = rollouts(off, hf, prompts)
    r3 = build_actor(hf, parallel, "r3", source=off)
    appended = [10, 11, 12]  # e.g. </think> and the target token
    sequences = [c.prompt_ids + c.token_ids + appended for c in completions]
    for name, actor in (("off", off), ("r3", r3)):
        lps = MegatronScorer(actor, max_tokens_per_micro_batch=96).token_logprobs(
            sequences, routes=[c.routes for c in completions])
        gaps = [(torch.tensor(lp[len(c.prompt_ids) - 1:len(c.prompt_ids) - 1 + len(c.token_ids)])
                 - torch.tensor(c.logprobs)).abs() for lp, c in zip(lps, completions)]
        out[name] = world_stats(gaps)
    return out


def save_near_tie_checkpoint(out: Path, overrides: list[str]) -> None:
    from megatron_pz.checkpoint import save_checkpoint
    from megatron_pz.run_config import load_run_config
    from megatron_pz.model.provider import resolve_hf_config

    cfg = load_run_config(Path(__file__).resolve().parents[2] / "examples" / "tiny_cpu.yaml", overrides)
    initialize(cfg.parallel, RuntimeConfig(device="cpu", seed=7))
    hf = resolve_hf_config(cfg)
    actor = Actor(hf, cfg.model, cfg.parallel, OptimizerConfig(), torch.device("cpu"), total_steps=1)
    for chunk in actor.chunks:
        near_tie_routers(chunk)
    save_checkpoint(out, 0, actor.chunks, hf_config=hf)


def main():
    mode, out = sys.argv[1], Path(sys.argv[2])
    report = {}
    if mode == "checkpoint":
        save_near_tie_checkpoint(out, sys.argv[3:])
        return
    if mode == "single":
        initialize(ParallelConfig(), RuntimeConfig(device="cpu", seed=7))
        hf = moe_config()
        report["dense"] = dense_gap(ParallelConfig(), PROMPTS)
        report["replay"] = replay_checks(hf, ParallelConfig(), PROMPTS, recompute_too=True)
        report["scorer"] = scorer_checks(hf, ParallelConfig(), PROMPTS[:3])
    elif mode == "layouts":
        rank = dist.get_rank() if dist.is_initialized() else int(__import__("os").environ["RANK"])
        layouts = {
            "ep2": (ParallelConfig(ep=2), 2, PROMPTS if rank == 0 else PROMPTS[:2]),  # rank 1 gets fillers
            "pp2": (ParallelConfig(pp=2), 2, PROMPTS),
            "pp2_vpp2": (ParallelConfig(pp=2, virtual_pp=2), 4, PROMPTS),
            "tp2_sp": (ParallelConfig(tp=2, sequence_parallel=True), 2, PROMPTS),
        }
        for name, (parallel, layers, prompts) in layouts.items():
            initialize(parallel, RuntimeConfig(device="cpu", seed=7))
            report[name] = replay_checks(moe_config(layers), parallel, prompts, recompute_too=name == "pp2")
        report["tp2_sp_parity"] = sp_parity(out)
    if dist.get_rank() == 0:
        (out / f"{mode}.json").write_text(json.dumps(report, indent=1))


def sp_parity(out: Path) -> dict:
    """TP=2 with sequence parallelism (local spec, SequenceParallelRMSNorm) trains like TP=1."""
    from parity_worker import train_losses

    hf = moe_config()
    rows = [TokenSequence(list(range(3 * i, 3 * i + 10 + 2 * i)), [1.0] * (10 + 2 * i), index=i) for i in range(4)]
    opt = OptimizerConfig(lr=1e-2, clip_grad=1.0, use_distributed_optimizer=False)
    ref, _ = train_losses(hf, ParallelConfig(), None, save_to=out / "sp_w", rows=rows, opt_cfg=opt)
    got, _ = train_losses(hf, ParallelConfig(tp=2, sequence_parallel=True), out / "sp_w", rows=rows, opt_cfg=opt)
    return {"ref": ref, "got": got}


if __name__ == "__main__":
    main()
