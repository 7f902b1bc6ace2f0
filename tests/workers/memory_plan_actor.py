"""What a built Actor holds vs what megatron_pz.memory_plan predicts (run under torchrun, gloo, CPU).

usage: memory_plan_actor.py state ARCH_JSON CASES_JSON OUT_DIR
       memory_plan_actor.py activations ARCH_JSON CASES_JSON OUT_DIR

``state``: for each case {"tp", "pp", "ep", "dtype", "distributed_optimizer", "overlap_grad_reduce"} (one
layout per launch) build the Actor,
run one training step (Adam creates its moments then), and write per rank the bytes of every storage
its parameters, gradient buffers and optimizer state live in, beside the plan's prediction for this
rank. ``activations``: for each case {"rows", "seq", "tp"} the allocator's peak during one micro-batch's
forward + backward (torch.profiler memory events: every CPU allocation and free, summed in time
order) beside the plan's training activation terms.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_pz.config import ModelConfig, OptimizerConfig, ParallelConfig, RuntimeConfig
from megatron_pz.memory_plan import Layout, Shapes, rank_model_state, training_activation_terms
from megatron_pz.model import load_hf_config
from megatron_pz.runtime import initialize
from megatron_pz.train.actor import Actor
from megatron_pz.train.batching import TokenSequence, make_micro_batches
from megatron_pz.run_config import GrpoConfig
from megatron_pz.train.update import make_grpo_loss_fn


def rows(vocab, n, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    half = length // 2
    return [TokenSequence(torch.randint(0, vocab, (length,), generator=g).tolist(),
                          [0.0] * half + [1.0] * (length - half), {"advantages": [0.5] * length}, index=i)
            for i in range(n)]


def storages(tensors) -> dict[int, int]:
    out = {}
    for t in tensors:
        if t is not None and t.numel():
            st = t.untyped_storage()
            out[st.data_ptr()] = st.nbytes()
    return out


def measured_state(actor: Actor) -> dict[str, int]:
    params = [p for c in actor.chunks for p in c.module.parameters()]
    weights = storages(params)
    grads = storages([getattr(p, "main_grad", None) for p in params])
    main, moments = {}, {}
    for opt in getattr(actor.optimizer, "chained_optimizers", [actor.optimizer]):
        inner = opt.optimizer
        for group in inner.param_groups:
            for p in group["params"]:
                for k, v in storages([p]).items():
                    if k not in weights:  # fp32 masters of 16-bit params (views of fp32 weights are not)
                        main[k] = v
                state = inner.state.get(p, {})
                moments.update(storages([state.get("exp_avg"), state.get("exp_avg_sq")]))
    return {"weights": sum(weights.values()), "grads": sum(grads.values()),
            "main_params": sum(main.values()), "moments": sum(moments.values())}


def state_mode(arch, cases, out_dir):
    from megatron.core import parallel_state as ps

    world = int(__import__("os").environ["WORLD_SIZE"])
    results = []
    sizes = {(c.get("tp", 1), c.get("pp", 1), c.get("ep", 1)) for c in cases}
    assert len(sizes) == 1, "one parallel layout per launch"
    tp, pp, ep = sizes.pop()
    par = ParallelConfig(tp=tp, pp=pp, ep=ep)
    info = initialize(par, RuntimeConfig(device="cpu"))
    hf = load_hf_config(arch)
    for case in cases:
        opt = OptimizerConfig(use_distributed_optimizer=case["distributed_optimizer"],
                              overlap_grad_reduce=case.get("overlap_grad_reduce", False))
        model_cfg = ModelConfig(init_weights=False, params_dtype=case.get("dtype", "float32"))
        actor = Actor(hf, model_cfg, par, opt, info.device, total_steps=1, max_sequence_length=64)
        batch = make_micro_batches(rows(arch["vocab_size"], 2, 12, seed=dist.get_rank()), 64)
        actor.train_step(batch, make_grpo_loss_fn(GrpoConfig()))
        got = measured_state(actor)
        lay = Layout(world=world, tp=tp, pp=pp, ep=ep, cp=1, etp=tp, vp=None, sequence_parallel=False)
        p = {"float32": 4, "bfloat16": 2}[case.get("dtype", "float32")]
        pred = rank_model_state(Shapes.from_hf(hf), lay, ps.get_pipeline_model_parallel_rank(), "local", False, p,
                                opt.use_distributed_optimizer,
                                opt.overlap_grad_reduce, dp_rank=ps.get_data_parallel_rank(),
                                expert_dp_rank=ps.get_expert_data_parallel_rank())
        predicted = {"weights": pred.weights, "grads": pred.grads, "main_params": pred.main_params,
                     "moments": pred.moments}
        results.append({"case": case, "rank": dist.get_rank(), "measured": got, "predicted": predicted})
        del actor
    Path(out_dir, f"state_rank{dist.get_rank()}.json").write_text(json.dumps(results))


def activations_mode(arch, cases, out_dir):
    from torch.profiler import ProfilerActivity, profile

    tp = cases[0].get("tp", 1)
    par = ParallelConfig(tp=tp)
    info = initialize(par, RuntimeConfig(device="cpu"))
    hf = load_hf_config(arch)
    loss_fn = make_grpo_loss_fn(GrpoConfig())
    results = []
    longest = max(c["seq"] for c in cases)
    actor = Actor(hf, ModelConfig(), par, OptimizerConfig(), info.device, total_steps=2,
                  max_sequence_length=longest + 8)
    # the plan counts logits at every position (a warm start row trains them all); an RL row's logits window
    # (Actor.logits_window: the output layer from the first trained position on) only lowers the peak
    actor.use_logits_window = False
    for case in cases:
        mbs = make_micro_batches(rows(arch["vocab_size"], case["rows"], case["seq"]), case["rows"] * case["seq"])
        assert len(mbs) == 1
        actor.train_step(mbs, loss_fn)  # optimizer state and every lazily built buffer exist from here on
        for chunk in actor.chunks:
            chunk.zero_grad_buffer()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            actor._run_schedule(mbs, loss_fn, forward_only=False)
        events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                        key=lambda e: e.start_ns())
        current = peak = 0
        for e in events:
            current += e.nbytes()
            peak = max(peak, current)
        lay = Layout(world=tp, tp=tp, pp=1, ep=1, cp=1, etp=tp, vp=None, sequence_parallel=False)
        tokens = case["rows"] * case["seq"]
        terms = training_activation_terms(Shapes.from_hf(hf), lay, 0, tokens, case["seq"], "local", 4, False, None)
        results.append({"case": case, "rank": dist.get_rank(), "measured_peak": peak,
                        "predicted": sum(t.bytes for t in terms), "terms": {t.name: t.bytes for t in terms}})
    Path(out_dir, f"activations_rank{dist.get_rank()}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    mode, arch, cases, out = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4]
    {"state": state_mode, "activations": activations_mode}[mode](arch, cases, out)
    dist.barrier()
    dist.destroy_process_group()
