"""Checkpoint save/resume on 2 ranks: distributed optimizer at DP=2, an extra (teacher) model, RNG and
per-rank state, an interrupted save, then resharding the weights to TP=2.

argv: workdir
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

CFG = dict(model_type="qwen3", vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64)


class SimulatedCrash(RuntimeError):
    pass


def make_actor(hf_config, seed):
    from megatron_pz.config import ModelConfig, OptimizerConfig, ParallelConfig, RuntimeConfig
    from megatron_pz.runtime import initialize
    from megatron_pz.train.actor import Actor

    info = initialize(ParallelConfig(), RuntimeConfig(device="cpu", seed=seed))
    return Actor(hf_config, ModelConfig(params_dtype="float32"), ParallelConfig(),
                 OptimizerConfig(lr=1e-2, use_distributed_optimizer=True, clip_grad=0.0), info.device,
                 total_steps=10)


def batch(step):
    from megatron_pz.train.batching import MicroBatch

    g = torch.Generator().manual_seed(100 * step + dist.get_rank())  # different data per DP rank
    ids = torch.randint(0, 128, (2, 8), generator=g)
    return [MicroBatch(ids, torch.arange(8).expand(2, 8), torch.ones(2, 8), {}, [8, 8], [0, 1])]


def loss_fn(mb, logits):
    logp = F.log_softmax(logits.float(), dim=-1)[:, :-1]
    nll = -logp.gather(-1, mb.input_ids[:, 1:, None]).squeeze(-1)
    return nll.sum(), torch.tensor(nll.numel(), dtype=torch.int), {}


def params_of(chunks):
    from megatron_pz.convert.weights import unwrap

    return {n: p.detach().clone() for n, p in unwrap(chunks[0]).named_parameters()}


def assert_same(a, b, what):
    assert a.keys() == b.keys(), what
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k} differs: {a[k].flatten()[:4]} vs {b[k].flatten()[:4]}"


def opt_state(actor):
    """The torch optimizer's per-parameter state (Adam moments, step) in param-group order."""
    out = {}
    for j, opt in enumerate(getattr(actor.optimizer, "chained_optimizers", [actor.optimizer])):
        inner = opt.optimizer
        for g, group in enumerate(inner.param_groups):
            for i, p in enumerate(group["params"]):
                for key, value in inner.state[p].items():
                    out[f"{j}.{g}.{i}.{key}"] = torch.as_tensor(value).detach().clone()
                out[f"{j}.{g}.{i}.param"] = p.detach().clone()
    return out


def main():
    from megatron_pz import checkpoint as ckpt
    from megatron_pz.config import ParallelConfig, RuntimeConfig
    from megatron_pz.convert.weights import megatron_to_hf_tensors
    from megatron_pz.model.provider import build_model, load_hf_config
    from megatron_pz.runtime import initialize

    root = Path(sys.argv[1]) / "ckpt"
    rank = dist.get_rank() if dist.is_initialized() else None
    hf = load_hf_config(dict(CFG))

    actor = make_actor(hf, seed=1)
    teacher = [build_model(hf)]  # an EMA-teacher-like extra model of the same architecture
    with torch.no_grad():
        for p in teacher[0].parameters():
            p.mul_(0.5)
    for step in (1, 2):
        actor.train_step(batch(step), loss_fn)
    rank = dist.get_rank()
    saved_params, saved_teacher = params_of(actor.chunks), params_of(teacher)
    saved_opt = opt_state(actor)
    path = ckpt.save_checkpoint(root, 2, actor.chunks, actor.optimizer, actor.scheduler,
                                extra_models={"teacher": teacher},
                                extra_state={"consumed_samples": 64, "per_rank": {"rank": rank, "cursor": 10 + rank}},
                                hf_config=hf)
    assert path == root / "iter_0000002" and ckpt.latest_checkpoint(root) == path
    rng_after_save = torch.rand(3)
    full_tp1 = {k: v.clone() for k, v in megatron_to_hf_tensors(actor.chunks, hf)}  # may alias params
    # the trajectory we must reproduce after resuming: one more step from the saved state
    actor.train_step(batch(3), loss_fn)
    after_step3 = params_of(actor.chunks)
    lr3 = actor.optimizer.param_groups[0]["lr"]

    # -- interrupted save: step 3 dies after writing its files, before the rename into place
    real_publish = ckpt._publish

    def crash(*a, **k):
        raise SimulatedCrash("killed before rename")

    ckpt._publish = crash
    try:
        ckpt.save_checkpoint(root, 3, actor.chunks, actor.optimizer, actor.scheduler,
                             extra_models={"teacher": teacher}, hf_config=hf)
        assert rank != 0, "rank 0 should have crashed"
    except SimulatedCrash:
        dist.barrier()  # release the other rank waiting after the (never done) publish
    ckpt._publish = real_publish
    dist.barrier()
    assert ckpt.latest_checkpoint(root) == root / "iter_0000002"
    assert (root / ".tmp_iter_0000003").is_dir() and not (root / "iter_0000003").exists()
    try:
        ckpt.resolve_checkpoint_dir(root / ".tmp_iter_0000003")
        raise AssertionError("a partial save must not load")
    except ckpt.CheckpointError as exc:
        assert "temporary directory" in str(exc), exc

    # -- resume into a freshly built (differently seeded) actor
    fresh = make_actor(hf, seed=999)
    fresh_teacher = [build_model(hf)]
    assert not torch.equal(next(iter(params_of(fresh.chunks).values())), next(iter(saved_params.values())))
    state = ckpt.load_checkpoint(root, fresh.chunks, fresh.optimizer, fresh.scheduler,
                                 extra_models={"teacher": fresh_teacher})
    assert state["step"] == 2 and state["consumed_samples"] == 64, state
    assert state["per_rank"] == {"rank": rank, "cursor": 10 + rank} and state["per_rank_restored"], state
    assert torch.equal(torch.rand(3), rng_after_save), "RNG state not restored"
    assert_same(params_of(fresh.chunks), saved_params, "model after resume")
    assert_same(params_of(fresh_teacher), saved_teacher, "teacher after resume")
    assert_same(opt_state(fresh), saved_opt, "optimizer state after resume")
    fresh.train_step(batch(3), loss_fn)
    assert fresh.optimizer.param_groups[0]["lr"] == lr3
    # equal only if the Adam moments, step counts and the scheduler were restored too
    assert_same(params_of(fresh.chunks), after_step3, "model one step after resume")

    # -- a new save at the same step replaces the old one; latest moves
    ckpt.save_checkpoint(root, 3, fresh.chunks, fresh.optimizer, fresh.scheduler, hf_config=hf)
    assert ckpt.latest_checkpoint(root) == root / "iter_0000003"
    assert not (root / ".tmp_iter_0000003").exists()

    # -- reshard: the TP=1 (DP=2) step-2 checkpoint loaded at TP=2
    info = initialize(ParallelConfig(tp=2), RuntimeConfig(device="cpu"))
    model_tp2 = build_model(hf, parallel=ParallelConfig(tp=2))
    teacher_tp2 = build_model(hf, parallel=ParallelConfig(tp=2))
    state = ckpt.load_checkpoint(root / "iter_0000002", [model_tp2], extra_models={"teacher": [teacher_tp2]})
    assert state["step"] == 2
    full_tp2 = dict(megatron_to_hf_tensors([model_tp2], hf))
    assert_same(full_tp2, full_tp1, "TP=1 -> TP=2 reshard")
    meta = ckpt.read_metadata(root / "iter_0000002")
    assert meta["parallel"]["tp"] == 1 and meta["parallel"]["dp"] == 2, meta
    if info.rank == 0:
        print("CKPT OK", flush=True)


if __name__ == "__main__":
    main()
