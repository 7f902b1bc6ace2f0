"""MoE routing replay (R3, arXiv 2510.11370): the route format, its checks and conversions, the config
rules, and (slow) the real Megatron record/replay paths in one process, at EP=2, PP=2, PP=2 x VPP=2 and
TP=2 + SP, and through the trainer."""

import json
import subprocess
import sys

import numpy as np
from pathlib import Path
import pytest
import torch

from megatron_pz.config import ConfigError
from megatron_pz.model.provider import load_hf_config
from megatron_pz.rollout.config import RolloutConfig, resolve_routing_replay
from megatron_pz.train.metrics import read_metrics
from megatron_pz.model.routes import NATIVE, RouteShape, check_routes, route_dtype, routes_from_vllm
from multiproc import REPO_ROOT, run_torchrun

MOE = dict(model_type="qwen3_moe", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
           num_attention_heads=2, num_key_value_heads=2, head_dim=32, moe_intermediate_size=64, num_experts=8,
           num_experts_per_tok=2, norm_topk_prob=True)


def moe(**overrides):
    return load_hf_config({**MOE, **overrides})


def dense():
    return load_hf_config(dict(MOE, model_type="qwen3"))


# ------------------------------------------------------------------ the format


def test_route_shape_keeps_only_moe_layers_and_the_dtype_follows_vllm():
    shape = RouteShape.from_hf(moe(mlp_only_layers=[1]))
    assert shape.moe_layers == (0, 2, 3) and shape.num_layers == 4 and shape.topk == 2
    assert [shape.column_of_layer_number(n) for n in (1, 3, 4)] == [0, 1, 2]  # Megatron's 1-based numbers
    with pytest.raises(ValueError, match="layer 2 is not an MoE layer"):
        shape.column_of_layer_number(2)
    assert RouteShape.from_hf(dense()) is None
    assert route_dtype(256) == np.uint8 and route_dtype(257) == np.uint16 and shape.dtype == np.uint8
    assert shape.bytes_per_token() == 3 * 2


def good_routes(tokens, shape, seed=0):
    rng = np.random.default_rng(seed)
    return np.stack([np.stack([rng.choice(shape.num_experts, shape.topk, replace=False)
                               for _ in shape.moe_layers]) for _ in range(tokens)]).astype(shape.dtype)


def test_check_routes_refuses_what_would_break_the_all_to_all_or_train_on_wrong_experts():
    shape = RouteShape.from_hf(moe())
    routes = good_routes(5, shape)
    assert check_routes(routes.astype(np.int64), shape, 5, "x").dtype == np.uint8
    where = "experience 3 (role predictor, group g)"
    with pytest.raises(ValueError, match=r"experience 3 .*shape \(5, 4, 2\), expected \(6, 4, 2\)"):
        check_routes(routes, shape, 6, where)
    bad = routes.astype(np.int64)
    bad[2, 1, 0] = 8
    with pytest.raises(ValueError, match=r"experience 3.*expert ids in \[0, 8\], expected \[0, 8\)"):
        check_routes(bad, shape, 5, where)
    bad = routes.copy()
    bad[:, 2, :] = 0
    with pytest.raises(ValueError, match="experience 3.*MoE layer 2 .*all zeros"):
        check_routes(bad, shape, 5, where)
    bad = routes.copy()
    bad[4, 3] = [5, 5]
    with pytest.raises(ValueError, match=r"experience 3.*token 4, MoE layer 3 .*repeats an expert id: \[5, 5\]"):
        check_routes(bad, shape, 5, where)
    with pytest.raises(ValueError, match="integer"):
        check_routes(routes.astype(np.float32), shape, 5, where)


def test_vllm_routed_experts_become_our_routes():
    """vLLM 0.32.0 returns [prompt + generated - 1, num_hidden_layers, topk] (uint8 <= 256 experts), dense
    layers' columns never written; we keep the MoE layers' columns."""
    shape = RouteShape.from_hf(moe(mlp_only_layers=[1]))
    prompt, generated = 7, 5
    ours = good_routes(prompt + generated - 1, shape, seed=1)
    recorded = np.zeros((prompt + generated - 1, 4, 2), dtype=np.uint8)  # as vLLM's capturer leaves it
    recorded[:, [0, 2, 3]] = ours
    out = routes_from_vllm(recorded, prompt, generated, shape, "vLLM completion 0 of prompt 2")
    assert out.dtype == np.uint8 and np.array_equal(out, ours)
    with pytest.raises(ValueError, match=r"vLLM completion 0 of prompt 2: routes have shape \(11, 3, 2\), "
                                         r"expected \(12, 3, 2\)"):
        routes_from_vllm(recorded, prompt, generated + 1, shape, "vLLM completion 0 of prompt 2")
    with pytest.raises(ValueError, match="no routed_experts"):
        routes_from_vllm(None, prompt, generated, shape, "c")
    with pytest.raises(ValueError, match="4 layers"):
        routes_from_vllm(recorded[:, :3], prompt, generated, shape, "c")
    wide = RouteShape.from_hf(moe(num_experts=512))
    big = good_routes(prompt + generated - 1, wide, seed=2).astype(np.uint16)
    big[0, 0] = [300, 511]
    assert routes_from_vllm(big, prompt, generated, wide, "c").dtype == np.uint16


def test_router_token_order_is_sequence_first_and_split_by_sequence_parallelism():
    from megatron_pz.model.moe_routers import router_token_order

    b, s = 2, 4
    ids = torch.arange(b * s).reshape(b, s)  # token (row r, position j) = r * s + j
    assert router_token_order(ids).tolist() == [0, 4, 1, 5, 2, 6, 3, 7]  # [s, b] flattened
    assert router_token_order(ids, 2, 0).tolist() == [0, 4, 1, 5]  # TP rank 0: positions 0-1
    assert router_token_order(ids, 2, 1).tolist() == [2, 6, 3, 7]
    with pytest.raises(ValueError, match="multiple of the sequence-parallel size"):
        router_token_order(ids[:, :3], 2, 0)


def test_micro_batches_carry_routes_with_native_where_a_token_has_none():
    from megatron_pz.train.actor import pad_micro_batch
    from megatron_pz.train.batching import TokenSequence, make_micro_batches

    shape = RouteShape.from_hf(moe())
    rows = [TokenSequence([1] * 6, [1.0] * 6, index=0, routes=good_routes(5, shape)),  # last token: native
            TokenSequence([1] * 4, [1.0] * 4, index=1)]  # no routes at all
    (mb,) = make_micro_batches(rows, 1000)
    assert mb.routes.shape == (2, 6, 4, 2) and mb.routes.dtype == torch.int16
    r0 = mb.indices.index(0)
    assert torch.equal(mb.routes[r0, :5], torch.from_numpy(rows[0].routes.astype(np.int16)))
    assert (mb.routes[r0, 5] == NATIVE).all() and (mb.routes[1 - r0] == NATIVE).all()
    assert mb.to(torch.device("cpu")).routes is mb.routes  # stays on the host
    grown = pad_micro_batch(mb, 3, 8, 0)
    assert grown.routes.shape == (3, 8, 4, 2) and torch.equal(grown.routes[:2, :6], mb.routes)
    assert (grown.routes[2] == NATIVE).all() and (grown.routes[:, 6:] == NATIVE).all()
    assert make_micro_batches([TokenSequence([1, 2], [1.0, 1.0])], 100)[0].routes is None
    with pytest.raises(ValueError, match="row 7: routes of shape"):
        make_micro_batches([TokenSequence([1] * 3, [1.0] * 3, index=7, routes=good_routes(4, shape))], 100)


def test_experiences_carry_checked_routes_into_the_update():
    from megatron_pz.rl.types import Experience
    from megatron_pz.train.update import experiences_to_sequences

    shape = RouteShape.from_hf(moe())
    ok = Experience([1, 2, 3], [4, 5], 1.0, "g", "generator", routes=good_routes(4, shape))
    (row,) = experiences_to_sequences([ok], route_shape=shape, require_routes=True)
    assert row.routes.shape == (4, 4, 2)
    short = Experience([1, 2, 3], [4, 5], 1.0, "g7", "predictor", routes=good_routes(3, shape))
    with pytest.raises(ValueError, match=r"experience 1 \(role predictor, group g7\): routes have shape"):
        experiences_to_sequences([ok, short], route_shape=shape)
    bare = Experience([1, 2, 3], [4, 5], 1.0, "g8", "rlp")
    with pytest.raises(ValueError, match=r"experience 0 \(role rlp, group g8\): routing replay is on"):
        experiences_to_sequences([bare], route_shape=shape, require_routes=True)
    assert experiences_to_sequences([bare], route_shape=shape)[0].routes is None  # replay off: native
    with pytest.raises(ValueError, match="model is dense"):
        experiences_to_sequences([ok])


# ------------------------------------------------------------------ config


def test_routing_replay_resolves_per_model_engine_and_device():
    assert resolve_routing_replay(RolloutConfig(), moe(), "cpu") == "r3"  # auto: r3 for MoE
    assert resolve_routing_replay(RolloutConfig(), dense(), "cpu") == "off"
    assert resolve_routing_replay(RolloutConfig(engine="vllm"), moe(), "cuda") == "r3"
    assert resolve_routing_replay(RolloutConfig(engine="vllm"), moe(), "cpu") == "off"  # cannot capture
    assert resolve_routing_replay(RolloutConfig(routing_replay="off"), moe(), "cpu") == "off"
    with pytest.raises(ConfigError, match="r3 replays MoE routes, but the model .*has no experts"):
        resolve_routing_replay(RolloutConfig(routing_replay="r3"), dense(), "cpu")
    with pytest.raises(ConfigError, match="engine=vllm on cpu: vLLM's CPU build runs the V1 model runner"):
        resolve_routing_replay(RolloutConfig(engine="vllm", routing_replay="r3"), moe(), "cpu")
    with pytest.raises(ConfigError, match="enable_prefix_caching"):
        resolve_routing_replay(RolloutConfig(engine="vllm", routing_replay="r3", enable_prefix_caching=False),
                               moe(), "cuda")
    with pytest.raises(ConfigError, match="rollout.routing_replay must be one of auto|off|r3"):
        RolloutConfig(routing_replay="r2").validate()


def test_the_30b_moe_run_replays_routes_on_gpu(monkeypatch, tmp_path):
    from megatron_pz.run_config import load_run_config

    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "model"))
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "data"))
    cfg = load_run_config(REPO_ROOT / "examples" / "pretrainzero_qwen3_30b_a3b.yaml")
    hf = load_hf_config(dict(cfg.model.architecture))
    assert resolve_routing_replay(cfg.rollout, hf, "cuda") == "r3"
    assert RouteShape.from_hf(hf).dtype == np.uint8 and RouteShape.from_hf(hf).bytes_per_token() == 48 * 8


def test_yaml_off_reads_as_off():
    from megatron_pz.run_config import load_run_config

    cfg = load_run_config(REPO_ROOT / "examples" / "tiny_cpu.yaml", ["rollout.routing_replay=off"])
    assert cfg.rollout.routing_replay == "off"  # YAML 1.1 reads a bare off as false


def test_router_settings_replay_cannot_honour_are_refused():
    from megatron_pz.model.moe_routers import check_replay_supported
    from megatron_pz.model.provider import transformer_config_from_hf

    config = transformer_config_from_hf(moe())
    assert config.moe_enable_routing_replay  # every MoE router gets its RouterReplay
    check_replay_supported(config)
    for field, value, message in (("moe_router_fusion", True, "moe_router_fusion"),
                                  ("moe_router_load_balancing_type", "sinkhorn", "sinkhorn"),
                                  ("moe_expert_capacity_factor", 1.0, "capacity"),
                                  ("moe_input_jitter_eps", 0.01, "jitter"),
                                  ("moe_router_force_load_balancing", True, "force_load_balancing")):
        config = transformer_config_from_hf(moe())
        setattr(config, field, value)
        with pytest.raises(ConfigError, match=f"routing_replay=r3 cannot replay routes with .*{message}"):
            check_replay_supported(config)


def test_memory_plan_counts_the_stored_routes_and_the_replay_targets():
    from megatron_pz.memory_plan import GIB, max_sequence_length, plan_run
    from megatron_pz.run_config import load_run_config

    overrides = ["model.architecture.model_type=qwen3_moe", "model.architecture.num_experts=8",
                 "model.architecture.num_experts_per_tok=2", "model.architecture.moe_intermediate_size=64",
                 "model.architecture.mlp_only_layers=[1]", "rollout.engine=megatron", "train.passages_per_step=6"]
    cfg = load_run_config(REPO_ROOT / "examples" / "tiny_cpu.yaml", overrides)
    hf = load_hf_config(dict(cfg.model.architecture))
    plan = plan_run(cfg, hf, 2, 80 * GIB, "cpu")  # DP 2: 3 passages per rank
    samples = 3 * 4 * (1 + 4)  # PretrainZero: 4 generations, each predicted 4 times
    seq = max_sequence_length(cfg)
    host = {t.name: t.bytes for t in plan.host_terms}
    # 3 MoE layers x top-2 x 1 byte a token: the format's own size (RouteShape.bytes_per_token)
    assert host[f"MoE routes of one step's experiences ({samples} samples x {seq} tokens, worst case)"] == \
        samples * seq * RouteShape.from_hf(hf).bytes_per_token() == samples * seq * 3 * 2
    targets = "routing replay targets (int64 expert ids, micro-batches in flight)"
    training = {t.name: t.bytes for t in plan.phases[2].terms}
    assert training[targets] == cfg.train.max_tokens_per_micro_batch * 3 * 2 * 8
    dense_plan = plan_run(load_run_config(REPO_ROOT / "examples" / "tiny_cpu.yaml"),
                          load_hf_config(dict(cfg.model.architecture, model_type="qwen3")), 1, 80 * GIB, "cpu")
    assert not any("routes" in t.name for t in dense_plan.host_terms)
    assert targets not in {t.name for t in dense_plan.phases[2].terms}


# ------------------------------------------------------------------ real Megatron paths (slow)


@pytest.mark.slow
def test_replay_in_one_process(tmp_path):
    """Near-tie routers: native training routing disagrees with the decode; replay restores it."""
    run_torchrun("routing_replay.py", "single", tmp_path, nproc=1, timeout=600)
    report = json.loads((tmp_path / "single.json").read_text())
    dense_gap, rep = report["dense"], report["replay"]
    # the decode and the training forward really route differently (near ties), visibly in log-probs
    assert rep["off"]["agreement"] < 0.97 and rep["off"]["gap_max"] > 1e-2
    assert rep["off"]["gap_mean"] > 100 * dense_gap["gap_mean"]
    # replay: every choice agrees, and the gap is the dense model's (fp32 rounding only)
    assert rep["r3"]["agreement"] == 1.0 and rep["r3"]["tokens"] == rep["off"]["tokens"] > 100
    assert rep["r3"]["gap_max"] < 5e-6 and rep["r3"]["gap_mean"] < 3 * dense_gap["gap_mean"] + 1e-7
    # a second model built before the replaying actor: its routers sit first in Megatron's global list
    assert rep["replay_instances"] > rep["local_routers"] == 2
    # replaying native routes gives native gradients, with and without full recompute; the rollout's
    # routes (which differ) give other gradients, and recompute replays them too
    assert rep["rows_with_native_routes"] == 10
    assert rep["grad_diff_native_routes"] == 0.0 and rep["grad_diff_native_routes_recompute"] == 0.0
    assert rep["grad_diff_rollout_routes"] > 1e-4 and rep["grad_diff_rollout_routes_recompute"] == 0.0
    assert rep["schedule_loss_diff"] < 1e-3
    # RLP's policy pass over prompt + thought + appended tokens: replayed, the appended ones native
    assert report["scorer"]["off"]["gap_max"] > 1e-2 and report["scorer"]["r3"]["gap_max"] < 5e-6


@pytest.mark.slow
def test_replay_under_parallel_layouts(tmp_path):
    run_torchrun("routing_replay.py", "layouts", tmp_path, nproc=2, timeout=600)
    report = json.loads((tmp_path / "layouts.json").read_text())
    for name in ("ep2", "pp2", "pp2_vpp2", "tp2_sp"):
        rep = report[name]
        assert rep["off"]["agreement"] < 0.97 and rep["off"]["gap_max"] > 1e-2, name
        assert rep["r3"]["agreement"] == 1.0 and rep["r3"]["gap_max"] < 5e-6, name
        assert rep["r3"]["tokens"] == rep["off"]["tokens"] > 100, name
        assert rep["grad_diff_native_routes"] == 0.0 and rep["grad_diff_rollout_routes"] > 1e-4, name
        assert rep["replay_instances"] > rep["local_routers"] >= 1, name
        assert rep["schedule_loss_diff"] < 1e-3, name  # train_step pairs micro-batches as forward-only does
    # EP=2: rank 1 has fewer samples, so filler micro-batches (no routes: native) ran through the all-to-all
    assert report["ep2"]["off"]["fillers"] > 0 and report["ep2"]["r3"]["fillers"] > 0
    assert report["pp2"]["grad_diff_native_routes_recompute"] == 0.0
    assert report["pp2"]["grad_diff_rollout_routes_recompute"] == 0.0
    # TP=2 with sequence parallelism on the local spec trains like TP=1
    parity = report["tp2_sp_parity"]
    assert parity["got"] == pytest.approx(parity["ref"], abs=1e-5) and parity["ref"][1] < parity["ref"][0]


@pytest.mark.slow
def test_vllm_engine_refuses_route_capture_on_the_cpu_build(real_vllm):
    from megatron_pz.rollout.vllm_engine import VLLMRolloutEngine

    sys.path.insert(0, str(Path(__file__).resolve().parent / "workers"))
    from rollout_common import byte_tokenizer

    with pytest.raises(ConfigError, match="V1 model runner"):
        VLLMRolloutEngine(RolloutConfig(engine="vllm"), byte_tokenizer(), moe(), capture_routes=True)


@pytest.fixture(scope="module")
def cache(pz_data_cache):
    return pz_data_cache


@pytest.mark.slow
def test_trainer_logs_agreement_and_gap_with_replay_off_and_on(tmp_path, cache):
    """The tiny MoE (near-tie routers) through the real trainer with rollout.engine=megatron and RLP (the
    policy scorer replays, the EMA teacher routes natively): both metrics logged every step."""
    args = [*TRAINER_MOE, f"data.default_cache_dir={cache}"]
    run_worker("routing_replay.py", "checkpoint", tmp_path / "init", *args)  # near-tie routers
    rl = {}
    for mode in ("off", "r3"):
        run_worker("train_cli.py", "train", str(REPO_ROOT / "examples" / "tiny_cpu.yaml"), *args,
                   f"rollout.routing_replay={mode}", f"train.init_checkpoint={tmp_path / 'init'}",
                   f"train.run_dir={tmp_path / mode}")
        rl[mode] = [r for r in read_metrics(tmp_path / mode) if r["phase"] == "rl"]
    for mode in ("off", "r3"):
        assert [r["step"] for r in rl[mode]] == [1, 2]
        assert all("rollout/routing_agreement" in r and "rollout/logp_diff_mean" in r for r in rl[mode])
    first_off, first_r3 = rl["off"][0], rl["r3"][0]  # the same rollouts: same weights and seeds
    assert first_off["rlp/response_length_mean"] == first_r3["rlp/response_length_mean"]
    assert first_off["rollout/routing_agreement"] < 0.99 and first_off["rollout/logp_diff_mean"] > 1e-4
    assert all(r["rollout/routing_agreement"] == 1.0 for r in rl["r3"])
    assert first_r3["rollout/logp_diff_mean"] < 1e-6


def run_worker(script, *args):
    result = subprocess.run([sys.executable, str(REPO_ROOT / "tests" / "workers" / script), *map(str, args)],
                            capture_output=True, text=True, timeout=600, cwd=REPO_ROOT,
                            env={**__import__("os").environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    return result.stdout


TRAINER_MOE = [
    "model.architecture.model_type=qwen3_moe", "model.architecture.num_experts=8",
    "model.architecture.num_experts_per_tok=2", "model.architecture.moe_intermediate_size=64",
    "model.architecture.norm_topk_prob=true", "model.architecture.router_aux_loss_coef=0.0",
    "model.architecture.vocab_size=1024", "model.architecture.hidden_size=64",
    "model.architecture.intermediate_size=128", "model.architecture.num_hidden_layers=2",
    "model.architecture.num_attention_heads=2", "model.architecture.head_dim=32",
    "data.default_vocab_size=1024", "data.default_passage_tokens=64", "rollout.engine=megatron",
    "objective.name=rlp", "objective.rlp_group=4", "objective.rlp_thought_max_tokens=8",
    "train.steps=2", "train.save_interval=2", "train.passages_per_step=4", "train.eval_passages=2",
    "train.eval_max_new_tokens=4", "train.max_prompt_tokens=400", "train.tensorboard=false",
    "warm_start.enabled=false", "optimizer.lr=1e-4", "runtime.memory_plan=warn",
]
