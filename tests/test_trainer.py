"""The trainer end to end on CPU: warm start + PretrainZero RL, resume, multi-rank parity, bad config.

All runs use the real pipeline: gensim Wikipedia -> BPE -> preprocessed passages -> Megatron actor
-> rollouts (the tiny default's `hf` engine, refreshed every step) -> rewards -> GRPO update -> dist
checkpoints.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_pz.train.metrics import read_metrics
from multiproc import REPO_ROOT, run_torchrun

pytestmark = pytest.mark.slow

TINY = [
    "model.architecture.vocab_size=1024", "model.architecture.hidden_size=64",
    "model.architecture.intermediate_size=128", "model.architecture.num_hidden_layers=2",
    "model.architecture.head_dim=32",  # vLLM's CPU attention kernels start at 32 (tests/test_vllm.py)
    "data.default_vocab_size=1024", "data.default_passage_tokens=64",
    "objective.generator_group=2", "objective.predictor_group=2",
    "objective.generator_max_tokens=6", "objective.predictor_max_tokens=6",
    "train.passages_per_step=4", "train.eval_passages=4", "train.eval_max_new_tokens=6",
    "train.max_prompt_tokens=400", "train.tensorboard=false", "warm_start.steps=3", "warm_start.rows_per_step=4",
    "optimizer.lr=1e-3",
]
CONFIG = str(REPO_ROOT / "examples" / "tiny_cpu.yaml")


@pytest.fixture(scope="module")
def cache(pz_data_cache):
    return pz_data_cache


def train(run_dir, cache, *overrides, nproc=1):
    args = ["train", CONFIG, *TINY, f"data.default_cache_dir={cache}", f"train.run_dir={run_dir}", *overrides]
    if nproc == 1:
        result = subprocess.run([sys.executable, str(REPO_ROOT / "tests" / "workers" / "train_cli.py"), *args],
                                capture_output=True, text=True, timeout=900, cwd=REPO_ROOT,
                                env={**__import__("os").environ, "PYTHONPATH": str(REPO_ROOT)})
        assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
        output = result.stdout
    else:
        output = run_torchrun("train_cli.py", *args, nproc=nproc, timeout=900)
    return output


def rl_records(run_dir):
    records = read_metrics(run_dir)  # complete lines only: a live run may be writing the last one
    return records, {r["step"]: r for r in records if r["phase"] == "rl"}


@pytest.fixture(scope="module")
def end_to_end(tmp_path_factory, cache):
    """The tiny default end to end (warm start, 2 PretrainZero steps): its warm start also starts every RLP
    run of this module (:func:`reference`)."""
    full = tmp_path_factory.mktemp("end_to_end") / "full"
    return full, train(full, cache, "train.steps=2", "train.save_interval=1", "train.keep_last=1")


def test_end_to_end_pretrainzero(tmp_path, end_to_end):
    full, out = end_to_end
    records, rl = rl_records(full)
    assert sorted(rl) == [1, 2]
    evals = [r for r in records if r["phase"] == "eval"]
    assert [e["step"] for e in evals] == [0, 2] and evals[0]["eval/num_spans"] > 0
    warm = [r for r in records if r["phase"] == "warm_start" and "loss" in r]
    assert len(warm) == 3 and warm[-1]["loss"] < warm[0]["loss"]  # next-token pretraining learns
    for r in rl.values():  # the generator role ran for every passage and was logged
        assert 0.0 <= r["generator/valid_mask_rate"] <= 1.0 and r["generator/num_samples"] == 8
        assert 0.0 <= r["padding_fraction"] < 0.6 and r["tokens_per_s"] > 0
    assert "held-out mask accuracy (span candidates): before RL" in out and "(any valid word)" in out
    assert evals[0]["eval/num_words"] > 0 and 0.0 <= evals[-1]["eval/word_mask_accuracy"] <= 1.0
    heldout = [json.loads(l) for l in (full / "eval_samples.jsonl").read_text().splitlines()]
    for e in evals:  # every eval item's response is kept, and the logged rates are their means
        mine = [h for h in heldout if h["step"] == e["step"]]
        words = [h["reward"] for h in mine if h["eval"] == "words"]
        gens = [h["verdict"] == "ok" for h in mine if h["eval"] == "generator"]
        assert len(words) == e["eval/num_words"] and sum(words) / len(words) == pytest.approx(e["eval/word_mask_accuracy"])
        assert sum(gens) / len(gens) == pytest.approx(e["eval/generator_valid_mask_rate"])
    samples = [json.loads(l) for l in (full / "samples.jsonl").read_text().splitlines()]
    per_step_role = {(r["step"], r["role"]) for r in samples}
    assert {(1, "generator"), (2, "generator")} <= per_step_role and len(samples) <= 2 * 2 * 2
    assert all(isinstance(r["response"], str) and "valid" in r["info"] for r in samples if r["role"] == "generator")
    assert sorted(p.name for p in (full / "checkpoints").glob("iter_*")) == ["iter_0000002"]  # keep_last=1
    assert (full / "warm_start" / "latest_checkpointed_iteration.txt").is_file()
    png = tmp_path / "curves.png"  # the plot tool renders the run
    subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "plot_run.py"), str(full), "--out", str(png)],
                   check=True, cwd=REPO_ROOT, env={**__import__("os").environ, "PYTHONPATH": str(REPO_ROOT)})
    assert png.stat().st_size > 10_000


def test_resume_is_bit_exact(tmp_path, cache, reference):
    """Stop after step 1, resume to 3: same rollouts, rewards, losses and gradients as one run
    (optimizer, scheduler, RNG, sampler position and the RLP EMA teacher all come back)."""
    init, full = reference
    part = tmp_path / "part"
    args = [*COMMON, f"train.init_checkpoint={init}", "train.save_interval=1"]
    train(part, cache, *args, "train.steps=1")
    out = train(part, cache, *args)
    assert "resumed from" in out
    _, resumed = rl_records(part)
    for step in (1, 2, 3):
        for key in ("loss", "grad_norm", "rlp/reward_mean", "rlp/response_length_mean"):
            assert resumed[step][key] == full[step][key], (step, key)


# RLP's dense reward gives every sample a non-zero advantage, so the updates compared are non-trivial
# (a tiny model's PretrainZero rewards are mostly 0 at the start: zero advantages, zero gradient).
RLP = ["objective.name=rlp", "objective.rlp_group=2", "objective.rlp_thought_max_tokens=4"]
COMMON = ["train.steps=3", "train.save_interval=3", "warm_start.enabled=false", *RLP]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache, end_to_end):
    """The end-to-end run's warm start (its weights start every run below) and a 1-process run from it."""
    root = tmp_path_factory.mktemp("reference")
    init = end_to_end[0] / "warm_start"
    train(root / "ref", cache, *COMMON, f"train.init_checkpoint={init}")
    return init, rl_records(root / "ref")[1]


@pytest.mark.parametrize("layout", ["parallel.tp=2", "parallel.pp=2", "parallel.tp=1"], ids=["tp2", "pp2", "dp2"])
def test_two_ranks_match_one(tmp_path, cache, reference, layout):
    init, a = reference
    train(tmp_path / "two", cache, *COMMON, f"train.init_checkpoint={init}", layout, nproc=2)
    _, b = rl_records(tmp_path / "two")
    for step in (1, 2, 3):
        # same rollouts (sampling is keyed by seed/prompt/sample, not by layout), same update
        assert b[step]["rlp/response_length_mean"] == a[step]["rlp/response_length_mean"]
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], abs=2e-5)
        assert b[step]["grad_norm"] == pytest.approx(a[step]["grad_norm"], rel=1e-4, abs=1e-6)
        assert b[step]["train_tokens"] == a[step]["train_tokens"]
        assert b[step]["rlp/reward_mean"] == pytest.approx(a[step]["rlp/reward_mean"], abs=1e-5)
        assert a[step]["grad_norm"] > 1e-6


def test_virtual_pipeline_matches_one_rank(tmp_path, cache):
    """PP=2 with 2 virtual stages (Megatron's interleaved 1F1B schedule) on a 4-layer model: the same
    3 RLP steps as one process. Its own reference, because the shared one has 2 layers."""
    layers = "model.architecture.num_hidden_layers=4"
    train(tmp_path / "warm", cache, layers, "train.steps=1", "train.save_interval=1")
    args = [layers, *COMMON, f"train.init_checkpoint={tmp_path / 'warm' / 'warm_start'}"]
    train(tmp_path / "one", cache, *args)
    train(tmp_path / "vpp", cache, *args, "parallel.pp=2", "parallel.virtual_pp=2", nproc=2)
    _, a = rl_records(tmp_path / "one")
    _, b = rl_records(tmp_path / "vpp")
    for step in (1, 2, 3):
        assert b[step]["rlp/response_length_mean"] == a[step]["rlp/response_length_mean"]
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], abs=2e-5)
        assert b[step]["grad_norm"] == pytest.approx(a[step]["grad_norm"], rel=1e-4, abs=1e-6)
        assert a[step]["grad_norm"] > 1e-6


def test_bad_config_fails_before_any_work(tmp_path):
    run_dir = tmp_path / "run"
    for override, message in (("train.stepz=3", "unknown config key"),
                              ("parallel.tp=3", "does not divide num_attention_heads"),
                              ("objective.name=magic", "objective.name")):
        result = subprocess.run(
            [sys.executable, "-m", "megatron_pz.cli", "train", CONFIG, f"train.run_dir={run_dir}", override],
            capture_output=True, text=True, timeout=300, cwd=REPO_ROOT,
            env={**__import__("os").environ, "PYTHONPATH": str(REPO_ROOT), "WORLD_SIZE": "3"})
        assert result.returncode != 0 and message in result.stderr, result.stderr[-3000:]
        assert not run_dir.exists()  # nothing was started


def test_schedule_then_mixture(tmp_path, cache):
    """objective.schedule: 1 step of Random RLPT, then a mixture PretrainZero 0.75 + RLP 0.25 (the EMA
    teacher built because a component is RLP), per-objective metrics in the log."""
    schedule = ("objective.schedule=[{steps: 1, overrides: {name: random_rlpt}}, {overrides: {mixture: ["
                "{weight: 0.75}, {weight: 0.25, overrides: {name: rlp, rlp_group: 2, rlp_thought_max_tokens: 4}}]}}]")
    run_dir = tmp_path / "sched"
    train(run_dir, cache, "train.steps=2", "train.save_interval=2", schedule)
    _, rl = rl_records(run_dir)
    assert rl[1]["objective/phase"] == 0 and "random_rlpt/masked_passages" in rl[1]
    assert rl[2]["objective/phase"] == 1
    assert rl[2]["pretrainzero/passages"] == 3 and rl[2]["rlp/passages"] == 1  # 4 passages split 3:1
    assert "pretrainzero/generator/valid_mask_rate" in rl[2] and "rlp/rlp/info_gain_mean" in rl[2]
    assert "random_rlpt/masked_passages" not in rl[2]


def engine_checks(run_dir):
    """rank -> the records tests/workers/train_engine_checks.py wrote."""
    return {int(p.stem.rsplit("rank", 1)[1]): json.loads(p.read_text())
            for p in Path(run_dir).glob("engine_checks_rank*.json")}


def train_checked(run_dir, cache, *overrides, nproc=1):
    """(rank -> engine checks, the run's output), like :func:`train` with the engine observed."""
    args = ["train", CONFIG, *TINY, f"data.default_cache_dir={cache}", f"train.run_dir={run_dir}", *overrides]
    if nproc == 1:
        result = subprocess.run([sys.executable, str(REPO_ROOT / "tests" / "workers" / "train_engine_checks.py"), *args],
                                capture_output=True, text=True, timeout=900, cwd=REPO_ROOT,
                                env={**__import__("os").environ, "PYTHONPATH": str(REPO_ROOT)})
        assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
        output = result.stdout
    else:
        output = run_torchrun("train_engine_checks.py", *args, nproc=nproc, timeout=900)
    return engine_checks(run_dir), output


def test_hf_engine_is_refreshed_after_every_update(tmp_path, cache):
    """rollout.engine=hf holds its own transformers copy: after every update it equals the actor's export
    bit for bit and the rollout-vs-train log-prob drift stays ~0 while the policy moves; with the refresh
    switched off (the diagnostic knob) the copy goes stale and the drift grows."""
    args = [*COMMON, "rollout.engine=hf"]
    on = train_checked(tmp_path / "on", cache, *args)[0][0]  # rank 0's engine checks
    off = train_checked(tmp_path / "off", cache, *args, "rollout.refresh_weights=false")[0][0]
    _, rl_on = rl_records(tmp_path / "on")
    _, rl_off = rl_records(tmp_path / "off")
    # eval before, 3 rollouts, eval after: one sync before the first phase, then one per update
    assert on["stale_tensors"] == [0] * 5 and on["syncs_at_phase"] == [1, 1, 2, 3, 4] and on["syncs"] == 4
    assert on["asleep_in_update"] == [True] * 3
    assert off["syncs"] == 1 and off["stale_tensors"][:2] == [0, 0] and min(off["stale_tensors"][2:]) > 0
    for step in (1, 2, 3):
        assert rl_on[step]["grad_norm"] > 1e-4  # the policy moves
        assert rl_on[step]["rollout/logp_diff_mean"] < 1e-5
        assert rl_on[step]["rollout/weight_syncs"] == step
    assert rl_off[1]["rollout/logp_diff_mean"] < 1e-5  # before any update both are the same weights
    assert rl_off[2]["rollout/logp_diff_mean"] > 1e-3 and rl_off[3]["rollout/logp_diff_mean"] > 1e-3
    # the rollout correction's mismatch metrics (colocated: lag 0) see the same: ~0 refreshed, grown when stale
    assert all(rl_on[step]["rollout_corr/lag0/k3"] < 1e-9 for step in (1, 2, 3))
    assert rl_off[3]["rollout_corr/lag0/k3"] > 1e-7 and rl_off[3]["rollout_corr/k1"] == rl_off[3]["rollout_corr/lag0/k1"]
    assert rl_off[3]["rollout_corr/lag0/ratio_p1"] < 1.0 < rl_off[3]["rollout_corr/lag0/ratio_p99"]
