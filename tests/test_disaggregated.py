"""Rollouts on their own ranks (rollout.placement: disaggregated): on-policy, one step off-policy (max_staleness: 1),
N steps with in-flight weight updates and partial rollouts (max_staleness: 2, partial_rollout_tokens).

Multi-process tests run real torchrun jobs on CPU (gloo), the `hf` engine on the rollout rank, the real
trainer (tests/workers/train_recorded.py records what each update trained on). The fast ones check the
config refusals, the division of a step's work and the objective split.
"""

import json
import math
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from multiproc import REPO_ROOT, kill_tree, run_torchrun, start_torchrun
from test_objectives_support import ScriptedEngine, make_passage, tiny_qwen3, tiny_tokenizer
from test_trainer import CONFIG, TINY, rl_records

from megatron_pz.config import ConfigError
from megatron_pz.objectives import split
from megatron_pz.objectives.composite import build_training_objective
from megatron_pz.objectives.config import ObjectiveComponent, ObjectiveConfig
from megatron_pz.objectives.hf_scorer import HFScorer
from megatron_pz.rollout.config import RolloutConfig
from megatron_pz.disagg.protocol import WorkSplit

RLP = ["objective.name=rlp", "objective.rlp_group=2", "objective.rlp_thought_max_tokens=4"]
MIXTURE = ("objective.mixture=[{weight: 0.5}, {weight: 0.5, overrides: {name: rlp, rlp_group: 2, "
           "rlp_thought_max_tokens: 4}}]")
BASE = ["warm_start.enabled=false", "rollout.engine=hf", "train.keep_last=0"]
SPLIT = ["rollout.placement=disaggregated", "rollout.ranks=1", "rollout.heartbeat_timeout_s=5"]


def train_args(run_dir, cache, *overrides):
    return ["train", CONFIG, *TINY, f"data.default_cache_dir={cache}", f"train.run_dir={run_dir}", *BASE, *overrides]


def train(run_dir, cache, *overrides, nproc=1):
    args = train_args(run_dir, cache, *overrides)
    if nproc > 1:
        return run_torchrun("train_recorded.py", *args, nproc=nproc, timeout=600)
    result = subprocess.run([sys.executable, str(REPO_ROOT / "tests" / "workers" / "train_recorded.py"), *args],
                            capture_output=True, text=True, timeout=600, cwd=REPO_ROOT,
                            env={**__import__("os").environ, "PYTHONPATH": str(REPO_ROOT)})
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    return result.stdout


def updates(run_dir, rank=0) -> list[list[dict]]:
    """What each update of training rank ``rank`` trained on, in order."""
    return [json.loads(line) for line in (Path(run_dir) / f"experiences_rank{rank}.jsonl").read_text().splitlines()]


def wait_for_step(run_dir: Path, step: int, proc, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    path = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline and proc.poll() is None:
        if path.is_file() and step in rl_records(run_dir)[1]:
            return
        time.sleep(0.2)
    kill_tree(proc.pid)
    raise AssertionError(f"step {step} was not logged in time:\n{proc.communicate()[0][-6000:]}")


# ====================================================================== fast checks


def test_config_refusals_name_the_field():
    cases = [
        (dict(placement="sideways"), "rollout.placement must be one of colocated|disaggregated"),
        (dict(placement="disaggregated", engine="megatron", ranks=1), "rollout.engine=megatron decodes on the actor"),
        (dict(placement="disaggregated", engine="hf"), "rollout.ranks must be >= 1"),
        (dict(max_staleness=1), "rollout.max_staleness=1 needs rollout.placement=disaggregated"),
        (dict(ranks=2), "rollout.ranks=2 needs rollout.placement=disaggregated"),
        (dict(placement="disaggregated", engine="hf", ranks=1, max_staleness=-1),
         "rollout.max_staleness must be an integer >= 0, got -1"),
        (dict(partial_rollout_tokens=8), "rollout.partial_rollout_tokens needs rollout.placement=disaggregated"),
        (dict(placement="disaggregated", engine="hf", ranks=1, partial_rollout_tokens=8),
         "rollout.partial_rollout_tokens needs rollout.max_staleness >= 1"),
        (dict(placement="disaggregated", engine="hf", ranks=1, max_staleness=2, partial_rollout_tokens=-3),
         "rollout.partial_rollout_tokens must be an integer >= 0"),
        (dict(placement="disaggregated", engine="hf", ranks=1, max_staleness=2, stale_samples="keep"),
         "rollout.stale_samples must be one of drop|mask, got 'keep'"),
        (dict(placement="disaggregated", engine="vllm", ranks=3, tensor_parallel_size=2),
         "rollout.ranks=3 must be a multiple of rollout.tensor_parallel_size=2"),
        (dict(placement="disaggregated", engine="hf", ranks=1, heartbeat_timeout_s=0), "rollout.heartbeat_timeout_s"),
    ]
    for fields, message in cases:
        with pytest.raises(ConfigError, match=message.replace("|", r"\|").replace("(", r"\(")):
            RolloutConfig(**fields).validate()
    RolloutConfig(placement="disaggregated", engine="vllm", ranks=4, tensor_parallel_size=2).validate()
    RolloutConfig(placement="disaggregated", engine="hf", ranks=1, max_staleness=4, partial_rollout_tokens=64,
                  stale_samples="mask").validate()


def test_objectives_that_need_the_model_before_generating_are_refused():
    for cfg, field in ((ObjectiveConfig(name="entropy_ntr"), "objective.name=entropy_ntr"),
                       (ObjectiveConfig(name="rpt"), "objective.name=rpt"),
                       (ObjectiveConfig(mixture=[ObjectiveComponent(overrides={"name": "entropy_ntr"})]),
                        "objective.name=entropy_ntr")):
        with pytest.raises(ConfigError, match=f"{field} draws its cut .* entropy .* rollout ranks do not hold"):
            split.check_disaggregated(cfg)
    for name in ("pretrainzero", "random_rlpt", "random_ntr", "rlp"):
        split.check_disaggregated(ObjectiveConfig(name=name))
    split.check_disaggregated(ObjectiveConfig(name="rpt", rpt_position="random"))
    with pytest.raises(RuntimeError, match="asked for the trainer's model on a rollout rank"):
        split.NO_SCORER.token_entropies([[1, 2]])


def test_work_split_units():
    same = WorkSplit(passages=8, workers=2, dp=2)  # a unit is exactly a DP rank's colocated share
    assert same.units == 2 and same.unit_slice(1) == slice(4, 8)
    assert list(same.units_of_worker(1)) == list(same.units_of_replica(1)) == [1]
    fan_out = WorkSplit(passages=32, workers=8, dp=4)  # the 30B example: 8 rollout ranks, 4 replicas
    assert fan_out.units == 8 and list(fan_out.units_of_replica(3)) == [6, 7] and list(fan_out.units_of_worker(7)) == [7]
    per_passage = WorkSplit(passages=8, workers=2, dp=4, per_passage=True)  # partial rollouts: a passage a unit
    assert per_passage.units == 8 and list(per_passage.units_of_worker(1)) == [4, 5, 6, 7]
    assert list(per_passage.units_of_replica(1)) == [2, 3] and per_passage.unit_slice(5) == slice(5, 6)
    fan_in = WorkSplit(passages=6, workers=1, dp=3)
    assert list(fan_in.units_of_worker(0)) == [0, 1, 2] and fan_in.unit_slice(2) == slice(4, 6)
    with pytest.raises(ConfigError, match=r"train.passages_per_step=6 must be divisible by lcm\(rollout.ranks=4, "
                                          r"data-parallel size 2\) = 4"):
        WorkSplit(passages=6, workers=4, dp=2)


def test_plan_knows_the_split(capsys, tmp_path):
    """`megatron-pz plan` on the 30B-A3B split: which GPUs train and which generate, one budget per role (vLLM
    only on the rollout ranks, one bucket on each side), and a split that does not add up is refused. The config
    sits under paths of many lengths (a CI checkout's path once wrapped a table's title mid-phrase)."""
    import shutil

    from megatron_pz.cli import main

    for pad in range(0, 100, 7):
        where = tmp_path / f"checkout{'-' * pad}" / "examples"
        where.mkdir(parents=True)
        path = str(shutil.copy(REPO_ROOT / "examples" / "pretrainzero_qwen3_30b_a3b_async.yaml", where))
        assert main(["plan", path, "--nodes", "4"]) == 0
        out = capsys.readouterr().out
        assert out.startswith(f"memory plan of {path}\n") and out.count("rollout ranks (16 GPUs)") == 1, (pad, out)
    assert "split: 16 training ranks (ranks 0-15, nodes 0-1), 16 rollout ranks (ranks 16-31, nodes 2-3)" in out
    training, rollout = out.split("rollout ranks (16 GPUs)")
    assert "weight push" in training and "vLLM" not in training.split("split:")[1].split("FITS")[0]
    assert "vLLM weights (TP 2)" in rollout and "bridge: one weight bucket (received, then loaded)" in rollout
    assert "FITS: training ranks" in out and "FITS: rollout ranks" in out
    assert main(["plan", path, "train.passages_per_step=24", "--nodes", "4"]) == 2
    assert "must be divisible by lcm(rollout.ranks=16, data-parallel size 4) = 16" in capsys.readouterr().err
    assert main(["plan", path, "--nodes", "2"]) == 2
    assert "rollout.ranks=16 leaves no training rank in a job of 16 ranks" in capsys.readouterr().err


def test_split_step_equals_collect():
    """A mixture of PretrainZero (all on the rollout side) and RLP (thoughts there, scoring here): generate,
    a pickle round trip (the bridge), then score gives exactly what one colocated collect gives."""
    tok = tiny_tokenizer()
    cfg = ObjectiveConfig(generator_group=2, predictor_group=2, rlp_group=2, rlp_min_context_tokens=4,
                          mixture=[ObjectiveComponent(weight=0.5), ObjectiveComponent(weight=0.5, overrides={"name": "rlp"})])
    text = "Paris is the capital of France, and Berlin is the capital of Germany."
    passages = [make_passage(tok, i, text, ["Paris", "Berlin"]) for i in range(4)]
    script = lambda prompt, n: ["\\mask{Paris}", "\\boxed{Paris}", " hmm</think>", "x"][:n]  # noqa: E731
    scorer = HFScorer(tiny_qwen3(len(tok), seed=0), tiny_qwen3(len(tok), seed=1))
    objective = build_training_objective(cfg, tok)
    expected = objective.collect(passages, ScriptedEngine(tok, script), scorer, step=3)
    draft = pickle.loads(pickle.dumps(split.generate(objective, passages, ScriptedEngine(tok, script), step=3)))
    got = split.score(objective, draft, scorer, step=3)
    assert got == expected and {e.role for e in got[0]} == {"generator", "predictor", "rlp"}


# ====================================================================== weights over the bridge


@pytest.mark.slow
def test_weights_arrive_bit_exact_from_every_stage(tmp_path):
    """TP=2 and PP=2, fp32 and bf16: per bucket, the sha256 of what each stage head sent equals that of what
    the rollout rank received and of the rollout engine's own parameters afterwards (read back by name)."""
    run_torchrun("bridge_weights.py", str(tmp_path), nproc=3, timeout=300)
    for case in ("tp2_fp32", "tp2_bf16", "pp2_fp32", "pp2_bf16"):
        trainers = sorted((json.loads((tmp_path / f"{case}_trainer{r}.json").read_text()) for r in (0, 1)),
                          key=lambda t: t["stage"])
        received = json.loads((tmp_path / f"{case}_rollout0.json").read_text())
        sent = [b for t in trainers for b in t["buckets"]]
        if case.startswith("pp2"):  # every stage sends its own layers straight to the rollout rank
            assert [t["stage"] for t in trainers] == [0, 1] and all(t["buckets"] for t in trainers)
        else:  # one stage: only its head (TP rank 0) sends; TP rank 1 only takes part in the gathers
            assert [bool(t["buckets"]) for t in trainers] == [True, False]
        assert len(sent) == len(received["buckets"]) > 3 and received["syncs"] == 1
        for s, r in zip(sent, received["buckets"]):
            assert (s["buffer"], s["names"]) == (r["buffer"], r["names"]) and s["tensors"] == r["tensors"], case
        names = [n for b in sent for n in b["names"]]
        assert len(names) == len(set(names))  # every tensor once
        dtype = "torch.bfloat16" if case.endswith("bf16") else "torch.float32"
        assert received["dtypes"] == [dtype] and trainers[0]["dtypes"] == [dtype]


@pytest.mark.slow
def test_a_transfer_that_never_completes_fails_naming_the_peer():
    """rollout.bridge_timeout_s=2: a receive whose sender stays alive but never sends fails after the timeout
    (plus the heartbeat timeout spent looking for a dead peer), naming the rollout rank, instead of hanging."""
    out = run_torchrun("bridge_timeout.py", nproc=2, timeout=120)
    line = next(line for line in out.splitlines() if "BRIDGE_TIMEOUT_OK" in line)
    seconds = float(line.split("BRIDGE_TIMEOUT_OK ")[1].split()[0])
    assert 2 <= seconds < 15, line
    assert "a bridge transfer with rollout rank 0 (job rank 1) failed while all of them still beat" in line
    assert "Timed out waiting 2000ms" in line  # gloo's own timeout: rollout.bridge_timeout_s reached the group


# ====================================================================== the trainer, end to end


@pytest.fixture(scope="module")
def cache(pz_data_cache):
    return pz_data_cache


@pytest.mark.slow
def test_staleness0_equals_colocated_sample_for_sample(tmp_path, cache):
    """PretrainZero + RLP mixture: one process colocated vs one trainer + one rollout rank, on-policy. Same
    experiences (tokens, rewards, advantages, rollout log-probs), same updates, same held-out eval."""
    args = ["train.steps=2", "train.save_interval=2", MIXTURE]
    train(tmp_path / "colocated", cache, *args)
    train(tmp_path / "split", cache, *args, *SPLIT, nproc=2)
    split_rows = updates(tmp_path / "split")
    for k, rows in enumerate(split_rows):  # the rollout rank records each token's version: v_k, lag 0
        for row in rows:
            assert row["versions"] == [k] * len(row["response"]) and row["lag"] == [0] * len(row["response"])
            row["versions"], row["lag"] = None, 0  # as colocated records them (one version, lag 0)
    assert split_rows == updates(tmp_path / "colocated")
    rollout_rank = json.loads((tmp_path / "split" / "rollout_rank0.json").read_text())
    assert rollout_rank == {"megatron_groups": False, "megatron_models": 0,
                            "result": {"role": "rollout", "stopped": None, "reason": "training finished"}}
    assert sum(len(u) for u in updates(tmp_path / "split")) > 0
    records_a, a = rl_records(tmp_path / "colocated")
    records_b, b = rl_records(tmp_path / "split")
    for step in (1, 2):
        for key in ("loss", "grad_norm", "pretrainzero/generator/reward_mean", "rlp/rlp/reward_mean", "train_tokens"):
            assert b[step][key] == a[step][key], (step, key)
        assert b[step]["rollout/staleness"] == 0 and b[step]["rollout/weight_version"] == step - 1
        assert b[step]["bridge/push_gb"] > 0 and b[step]["time/wait_rollout_s"] > 0
        assert a[step]["grad_norm"] > 1e-6
    evals = lambda records: [{k: v for k, v in r.items() if k.startswith("eval/")}  # noqa: E731
                             for r in records if r["phase"] == "eval"]
    assert evals(records_b) == evals(records_a) and len(evals(records_a)) == 2


OFF_POLICY = [*RLP, *SPLIT, "rollout.max_staleness=1", "train.steps=4", "train.save_interval=1"]


def uninterrupted(tmp_path_factory, cache, name: str, overrides: list) -> Path:
    """One uninterrupted 2-rank run (1 trainer + 1 rollout rank) of ``overrides``, shared by a module's tests."""
    run_dir = tmp_path_factory.mktemp(name) / "run"
    train(run_dir, cache, *overrides, nproc=2)
    return run_dir


@pytest.fixture(scope="module")
def off_policy(tmp_path_factory, cache):
    """One uninterrupted run at max_staleness 1, a checkpoint after every step."""
    return uninterrupted(tmp_path_factory, cache, "off_policy", OFF_POLICY)


@pytest.mark.slow
def test_staleness1_samples_from_the_previous_weights(off_policy, tmp_path):
    """Batch k's rollout log-probs equal the saved v_{k-1} actor's (<= 1e-5) and differ from v_k's."""
    _, rl = rl_records(off_policy)
    assert [rl[s]["rollout/staleness"] for s in (1, 2, 3, 4)] == [0, 1, 1, 1]
    assert [rl[s]["rollout/weight_version"] for s in (1, 2, 3, 4)] == [0, 0, 1, 2]
    ckpt = off_policy / "checkpoints"
    out = tmp_path / "logprobs.json"
    subprocess.run([sys.executable, str(REPO_ROOT / "tests" / "workers" / "saved_actor_logprobs.py"),
                    str(off_policy / "experiences_rank0.jsonl"), str(out),
                    *(f"{k}={ckpt / f'iter_{v:07d}'}" for k in (2, 3) for v in (k - 1, k))],
                   check=True, cwd=REPO_ROOT, timeout=300, env={**__import__("os").environ, "PYTHONPATH": str(REPO_ROOT)})
    saved = json.loads(out.read_text())
    recorded = updates(off_policy)
    for k in (2, 3):  # 0-based updates: batch k was sampled from v_{k-1} and trained at v_k
        rollout = [lp for row in recorded[k] for lp in row["rollout_logprobs"]]
        previous = [lp for row in saved[f"{k}@iter_{k - 1:07d}"] for lp in row]
        current = [lp for row in saved[f"{k}@iter_{k:07d}"] for lp in row]
        assert len(rollout) == len(previous) == len(current) > 0
        assert max(abs(a - b) for a, b in zip(rollout, previous)) <= 1e-5
        assert max(abs(a - b) for a, b in zip(rollout, current)) > 1e-3
        # The default rollout correction is the former grpo.tis_cap: 2.0, by hand from the saved v_k actor: one
        # step (ratio 1), RLP's per-sample mean of -A_i min(exp(logp_T - logp_rollout), 2); and the mismatch
        # metrics of lag 1 are k1 = mean(logp_rollout - logp_T), k3 = mean(rho - 1 - log rho), rho = pi_T / pi_b.
        rows = [(row, lp) for row, lp in zip(recorded[k], saved[f"{k}@iter_{k:07d}"]) if row["trainable"] and lp]
        loss = sum(sum(-row["advantage"] * min(math.exp(t - b), 2.0) for t, b in zip(lp, row["rollout_logprobs"]))
                   / len(lp) for row, lp in rows) / len(rows)
        log_rho = [t - b for row, lp in rows for t, b in zip(lp, row["rollout_logprobs"])]
        step = rl[k + 1]
        assert step["loss"] == pytest.approx(loss, rel=1e-4, abs=1e-6), (k, step["loss"], loss)
        assert step["rollout_corr/lag1/tokens"] == len(log_rho) and "rollout_corr/lag0/tokens" not in step
        assert step["rollout_corr/lag1/k1"] == pytest.approx(-sum(log_rho) / len(log_rho), rel=1e-3, abs=1e-7)
        assert step["rollout_corr/lag1/k3"] == pytest.approx(
            sum(math.exp(x) - 1 - x for x in log_rho) / len(log_rho), rel=1e-3, abs=1e-8)
        assert step["rollout_corr/lag1/k3"] > 1e-6 and step["rollout_corr/lag1/ratio_p99"] > 1.0
    assert rl[1]["rollout_corr/lag0/k3"] < 1e-8 and "rollout_corr/lag1/k3" not in rl[1]  # step 1: on-policy


@pytest.mark.slow
def test_resume_under_another_layout_or_placement_trains_the_same_passages(off_policy, tmp_path, cache):
    """The staleness-1 run's checkpoint after step 2 holds batch 3 in flight (sampled from v_1). Resumed with
    2 training ranks (DP 2: its drafts do not fit) the same passages are generated again from v_2; resumed
    colocated they are drawn again by the sampler. Either way update 3 trains on the passages of the
    uninterrupted run's update 3 (same RLP prompts: the position is drawn from (seed, step, passage))."""
    import shutil

    reference = sorted(map(str, (row["prompt"] for row in updates(off_policy)[2])))
    for name, overrides, nproc in (("dp2", OFF_POLICY, 3),
                                   ("colocated", [*RLP, "train.steps=4", "train.save_interval=1"], 1)):
        run_dir = tmp_path / name
        (run_dir / "checkpoints").mkdir(parents=True)
        shutil.copytree(off_policy / "checkpoints" / "iter_0000002", run_dir / "checkpoints" / "iter_0000002")
        (run_dir / "checkpoints" / "latest_checkpointed_iteration.txt").write_text("2")
        out = train(run_dir, cache, *overrides, nproc=nproc)
        assert "resumed from" in out and ("generates their passages again" in out if nproc > 1 else
                                          "is generated again here" in out), out[-3000:]
        first = [row for rank in range(nproc - 1 or 1) for row in updates(run_dir, rank)[0]]
        assert sorted(map(str, (row["prompt"] for row in first))) == reference, name


@pytest.mark.slow
def test_killed_rollout_rank_fails_the_job_naming_it(tmp_path, cache):
    """SIGKILL of the rollout rank mid-run: the trainer stops within the heartbeat timeout (5 s here) with an
    error naming the rank, well before torchrun's 30 s grace period would end it; the job fails. At staleness 2
    with partial rollouts (the rank's one server path serves every staleness) it dies while it holds samples of
    two steps in flight."""
    run_dir = tmp_path / "run"
    proc = start_torchrun("train_recorded.py", "--kill-rollout-at-step", "1",
                          *train_args(run_dir, cache, *IN_FLIGHT), nproc=2)
    try:
        output, _ = proc.communicate(timeout=300)
    finally:
        kill_tree(proc.pid)
    ended = time.time()
    assert proc.returncode != 0
    assert "megatron-pz train: error: rollout rank 0 (job rank 1) stopped answering" in output, output[-6000:]
    assert ended - float((run_dir / "killed_at").read_text()) < 25


# ====================================================================== N steps ahead, in-flight updates, partial rollouts

# thoughts of up to 7 tokens (+ the closing tag) decoded 3 tokens per window: every sample spans windows, so the
# weights change under samples in flight; batches are requested 2 steps ahead
EOS_BIAS = 14.0  # the tiny engine's end-of-text logit raised so thoughts end at random lengths (see below)
IN_FLIGHT = [*RLP[:2], "objective.rlp_thought_max_tokens=7", *SPLIT, "rollout.max_staleness=2",
             "rollout.partial_rollout_tokens=3", "train.steps=5", "train.save_interval=1"]


@pytest.fixture(scope="module")
def in_flight(tmp_path_factory, cache):
    """One uninterrupted run at max_staleness 2 with partial rollouts, a checkpoint after every step."""
    return uninterrupted(tmp_path_factory, cache, "in_flight", IN_FLIGHT)


@pytest.mark.slow
def test_in_flight_tokens_carry_the_version_that_sampled_them(in_flight, tmp_path):
    """Staleness 2 with partial rollouts. Every token of update k was sampled by v_{k-2} .. v_{k-1} (versions
    never decrease along a sample, lag <= 2, nothing dropped), some samples span two versions, and each
    token's rollout log-prob equals the log-prob under the saved actor of ITS version (<= 1e-5, the prefix
    re-encoded under the new weights) -- under the other version it differs."""
    _, rl = rl_records(in_flight)
    recorded = updates(in_flight)
    assert len(recorded) == 5
    mixed = 0
    for k, rows in enumerate(recorded):
        assert rows and all(row["trainable"] for row in rows)
        for row in rows:
            versions = row["versions"]
            assert len(versions) == len(row["response"]) and versions == sorted(versions)
            assert max(k - 2, 0) <= versions[0] and versions[-1] <= max(k - 1, 0), (k, versions)
            assert row["lag"] == [k - v for v in versions]
            mixed += len(set(versions)) > 1
        assert rl[k + 1]["stale/max_staleness"] <= 2 and rl[k + 1]["stale/dropped_samples"] == 0
        assert rl[k + 1]["rollout/windows"] >= 1 or k == 4  # the rank generates during every update
    assert mixed > 0
    assert any(f"rollout_corr/lag2/tokens" in rl[s] for s in rl)
    ckpt = in_flight / "checkpoints"
    out = tmp_path / "logprobs.json"
    subprocess.run([sys.executable, str(REPO_ROOT / "tests" / "workers" / "saved_actor_logprobs.py"),
                    str(in_flight / "experiences_rank0.jsonl"), str(out),
                    *(f"{k}={ckpt / f'iter_{v:07d}'}" for k in (3, 4) for v in (1, 2, 3)
                      if max(k - 2, 0) <= v <= k - 1)],
                   check=True, cwd=REPO_ROOT, timeout=300, env={**__import__("os").environ, "PYTHONPATH": str(REPO_ROOT)})
    saved = json.loads(out.read_text())
    checked = 0
    for k in (3, 4):
        for i, row in enumerate(recorded[k]):
            for t, (v, lp) in enumerate(zip(row["versions"], row["rollout_logprobs"])):
                assert abs(saved[f"{k}@iter_{v:07d}"][i][t] - lp) <= 1e-5, (k, i, t, v)
                other = v + 1 if v + 1 <= k - 1 else v - 1
                assert abs(saved[f"{k}@iter_{other:07d}"][i][t] - lp) > 1e-7, (k, i, t, v)
                checked += 1
    assert checked > 20


@pytest.mark.slow
def test_stop_with_partial_samples_in_flight_resumes_bit_exact(in_flight, tmp_path, cache):
    """SIGTERM to every rank (as SLURM sends it) after step 1 of the staleness-2 run: the trainers finish their step,
    receive the next batch, save it with the rollout rank's partial samples (rows cut mid-thought, versions per
    token), stop the rollout rank, and the job exits 75 (stopped, resubmit: megatron_pz.runtime.preemption)
    through the launcher. The resumed run hands the samples back and trains exactly what the uninterrupted run
    did, the saved batch first. (The rollout rank has one server path for every staleness; staleness 1 resumes
    through the same code with nothing requested ahead.)"""
    import torch

    from megatron_pz.runtime.preemption import EXIT_STOPPED

    run_dir = tmp_path / "run"
    proc = start_torchrun("train_recorded.py", *train_args(run_dir, cache, *IN_FLIGHT), nproc=2, launcher=True)
    try:
        wait_for_step(run_dir, 1, proc)
        for worker in psutil.Process(proc.pid).children():
            worker.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=300)
    finally:
        kill_tree(proc.pid)
    assert proc.returncode == EXIT_STOPPED, output[-6000:]
    assert "(the batch in flight saved, with the partial samples): checkpoint of step" in output
    assert json.loads((run_dir / "stop.json").read_text())["signal"] == "SIGTERM"
    stopped = int((run_dir / "checkpoints" / "latest_checkpointed_iteration.txt").read_text())
    assert 1 <= stopped < 4
    folder = run_dir / "checkpoints" / f"iter_{stopped:07d}"
    common = torch.load(folder / "common.pt", weights_only=False)
    meta = common["pz_common"]["extra_state"]["rollout_batch"]
    assert meta["step"] == stopped and sorted(meta["requested"]) == [stopped + 1]
    assert meta["version"] == max(stopped - 2, 0)  # requested two steps ahead
    out = train(run_dir, cache, *IN_FLIGHT, nproc=2)
    assert f"resumed from {folder}" in out
    handed = re.search(rf"resume: steps {stopped + 2} in flight handed back to the rollout ranks: (\d+) samples, "
                       r"(\d+) of them partial \((\d+) tokens kept\)", out)
    assert handed and int(handed[1]) == 8 and int(handed[2]) > 0 and int(handed[3]) > 0, out[-3000:]
    assert updates(run_dir) == updates(in_flight)
    _, resumed = rl_records(run_dir)
    _, reference = rl_records(in_flight)
    for step in (1, 2, 3, 4, 5):
        for key in ("loss", "grad_norm", "rlp/reward_mean", "stale/max_staleness"):
            assert resumed[step][key] == reference[step][key], (step, key)


def test_driver_defers_unfinished_units_and_delivers_them_later():
    """The rollout rank's lockstep with partial rollouts, on the real hf engine whose end-of-text logit is raised
    so thoughts end at random lengths (a long tail in miniature): after each window the oldest step is delivered
    with the units done; unfinished ones are deferred and arrive in a later batch; nothing is lost or doubled, and
    every token of a delivered unit carries the version of its window; no unit is deferred past max_staleness."""
    from test_stream import draft_rows, objective_of, passages_of, tiny_engine, tiny_tokenizer

    from megatron_pz.disagg.protocol import Generate, Generated
    from megatron_pz.disagg.server import Driver
    from megatron_pz.disagg.stream import Stream

    import torch

    tok = tiny_tokenizer()
    engine = tiny_engine(tok)
    head = engine.model.lm_head
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.zero_()
        biased.bias[sorted(engine.eos_ids)[0]] = EOS_BIAS
    engine.model.lm_head = biased
    objective, passages = objective_of(tok), passages_of(tok, 16)

    class Rank:  # the transport only: what the Driver sends is kept
        index, version, last_push = 0, 0, None

        def __init__(self):
            self.sent = []

        def send(self, message):
            self.sent.append(message)

    me = Rank()
    driver = Driver(me, Stream(engine, objective, tok, passages, window_tokens=2), WorkSplit(4, 1, 1, per_passage=True),
                    max_staleness=2)
    delivered, deferred_seen, late = [], 0, 0
    for step in range(2):  # the trainers' schedule at N = 2: two steps requested ahead, then one per delivery
        driver.request(Generate(step, me.version, list(range(4 * step, 4 * step + 4))))
    for step in range(4):
        driver.resume()
        while driver.running:
            driver.advance()
        message = me.sent[-1]
        assert isinstance(message, Generated) and message.step == step
        deferred_seen += message.stats["rollout/deferred_units"] > 0
        late += message.stats["rollout/late_units"]
        delivered += list(message.drafts)
        for (s, _), draft in message.drafts.items():
            for _, _, versions in draft_rows(draft):
                assert set(versions) <= set(range(me.version + 1))
                assert step - min(versions) <= 2  # deferred only within max_staleness: never dropped for it
        me.version = step  # batch `step` received: the trainers push v_step and request step + 2 from it
        if step + 2 < 4:
            driver.request(Generate(step + 2, me.version, list(range(4 * step + 8, 4 * step + 12))))
    assert len(delivered) == len(set(delivered))  # nothing doubled
    assert sorted(delivered + driver.deferred) == [(s, u) for s in range(4) for u in range(4)]  # nothing lost
    assert deferred_seen >= 1 and late >= 1
