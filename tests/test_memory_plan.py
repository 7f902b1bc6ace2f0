"""The memory plan: exact model-state bytes against built Actors, activations against a measured peak,
every shipped config fits an 80 GiB GPU, and an unfit plan is refused before any work."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from megatron_pz.memory_plan import (GIB, Layout, ParamSpec, Shapes, check_at_startup, chunk_params, ddp_buffer,
                                     max_sequence_length, owned_elements, plan_rollout_ranks, plan_run,
                                     render)
from megatron_pz.model import load_hf_config
from megatron_pz.memory_plan.cli import plan_config
from megatron_pz.config import ConfigError
from megatron_pz.run_config import load_run_config
from multiproc import run_torchrun

ROOT = Path(__file__).resolve().parents[1]

TINY = dict(model_type="qwen3", vocab_size=4096, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True)
# Qwen3-0.6B-like body with a 32k vocabulary: 0.44B parameters (bench/bench_convert_memory.py's "mid")
MID = dict(model_type="qwen3", vocab_size=32000, hidden_size=1024, intermediate_size=3072, num_hidden_layers=24,
           num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False)
MOE = dict(model_type="qwen3_moe", vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
           num_experts=4, num_experts_per_tok=2, norm_topk_prob=True, router_aux_loss_coef=0.0, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False)


def test_buffer_padding_and_shards_by_hand():
    # walked in reverse: b (30) at [0, 30), a starts at the next multiple of 64: [64, 164); the bucket
    # ends at a multiple of lcm(2, 128) = 128: 256 elements, 128 per DP rank
    params = [ParamSpec("a", 100), ParamSpec("b", 30)]
    buf = ddp_buffer(params, dp=2, distributed_optimizer=True, bucket_size=None)
    assert buf.numel == 256 and buf.ranges == [(0, 30), (64, 164)] and buf.buckets == [(0, 256)]
    assert owned_elements(buf, 0) == 30 + 64 and owned_elements(buf, 1) == 164 - 128
    assert ddp_buffer(params, dp=2, distributed_optimizer=False, bucket_size=None).numel == 130
    # a bucket closes once it holds bucket_size elements; the next starts after the padded end
    buf = ddp_buffer(params, dp=1, distributed_optimizer=True, bucket_size=20)
    assert buf.buckets == [(0, 128), (128, 256)] and buf.ranges == [(0, 30), (128, 228)]
    # a shared embedding (tied, PP > 1) gets a bucket of its own
    shared = [ParamSpec("emb", 10, shared_embedding=True), ParamSpec("w", 10)]
    assert ddp_buffer(shared, dp=1, distributed_optimizer=True, bucket_size=None).buckets == [(0, 128), (128, 256)]


def _run_state(arch, cases, nproc, tmp_path, timeout=300):
    run_torchrun("memory_plan_actor.py", "state", json.dumps(arch), json.dumps(cases), str(tmp_path), nproc=nproc,
                 timeout=timeout)
    results = [r for f in sorted(tmp_path.glob("state_rank*.json")) for r in json.loads(f.read_text())]
    assert len(results) == nproc * len(cases)
    for r in results:
        assert r["measured"] == r["predicted"], r
    return results


FULL_MATRIX = [{"distributed_optimizer": True}, {"distributed_optimizer": False},
               {"distributed_optimizer": True, "dtype": "bfloat16"},
               {"distributed_optimizer": False, "dtype": "bfloat16"}]


@pytest.mark.slow
def test_state_bytes_equal_a_built_actor_dp1(tmp_path):
    _run_state(TINY, FULL_MATRIX, 1, tmp_path)


@pytest.mark.slow
def test_state_bytes_equal_a_built_actor_dp2(tmp_path):
    results = _run_state(TINY, FULL_MATRIX[:3] + [{"distributed_optimizer": True, "overlap_grad_reduce": True}],
                         2, tmp_path)
    # the distributed optimizer halves the moments; padding makes the two ranks' shards differ
    by_rank = {r["rank"]: r["measured"]["moments"] for r in results if r["case"] == {"distributed_optimizer": True}}
    assert by_rank[0] != by_rank[1] and by_rank[0] + by_rank[1] == sum(
        r["measured"]["moments"] for r in results if r["case"] == {"distributed_optimizer": False}) // 2


@pytest.mark.slow
def test_state_bytes_equal_a_built_actor_moe_ep2(tmp_path):
    # world 2, EP 2: dense parameters over DP 2, expert parameters over expert-DP 1
    _run_state(MOE, [dict(c, ep=2) for c in FULL_MATRIX[:3]], 2, tmp_path)


@pytest.mark.slow
def test_state_bytes_equal_a_built_actor_0p4b_buckets(tmp_path):
    # 0.44B parameters: overlap_grad_reduce cuts the buffers into 40M-element buckets, each padded
    _run_state(MID, [{"distributed_optimizer": True, "overlap_grad_reduce": True, "dtype": "bfloat16"}], 1,
               tmp_path, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_state_bytes_equal_a_built_actor_tp2_pp2(layout, tmp_path):
    # TP 2: every GEMM weight and the vocabulary split; PP 2: the tied embedding's second copy on the
    # last stage (a bucket of its own), one bucket on stage 1
    size = {layout[:2]: 2}
    _run_state(TINY, [dict(c, **size) for c in FULL_MATRIX[:3]] + [
        dict(size, distributed_optimizer=True, overlap_grad_reduce=True, dtype="bfloat16")], 2, tmp_path)


MOE_ACT = dict(MOE, vocab_size=2048, hidden_size=128, moe_intermediate_size=64, num_experts=8, head_dim=32)


@pytest.mark.slow
@pytest.mark.parametrize("arch,tp", [(TINY, 1), (MOE_ACT, 1), (TINY, 2)], ids=["dense", "moe", "dense-tp2"])
def test_activation_estimate_within_25_percent_of_measured_peak(arch, tp, tmp_path):
    cases = [{"rows": 4, "seq": 128, "tp": tp}, {"rows": 2, "seq": 512, "tp": tp}]
    run_torchrun("memory_plan_actor.py", "activations", json.dumps(arch), json.dumps(cases), str(tmp_path),
                 nproc=tp)
    results = [r for f in sorted(tmp_path.glob("activations_rank*.json")) for r in json.loads(f.read_text())]
    assert len(results) == tp * len(cases)
    for r in results:
        error = r["predicted"] / r["measured_peak"] - 1
        print(f"{r['case']} rank {r['rank']}: measured {r['measured_peak']} predicted {r['predicted']:.0f} "
              f"({100 * error:+.1f} %)")
        assert abs(error) < 0.25, r


def _slurm_worlds() -> dict[str, int]:
    worlds = {}
    for script in (ROOT / "slurm").glob("pretrainzero_*.sh"):
        text = script.read_text()
        nodes = int(re.search(r"#SBATCH --nodes=(\d+)", text).group(1))
        gpus = int(re.search(r"#SBATCH --gpus-per-node=(\d+)", text).group(1))
        worlds[re.search(r"CONFIG:-(examples/[\w.]+\.yaml)", text).group(1)] = nodes * gpus
    return worlds


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_config_fits_80gib_with_10_percent_margin(path):
    world = _slurm_worlds().get(f"examples/{path.name}")
    plan = plan_config(str(path), [], gpu_memory_gib=80.0, nodes=world // 8 if world else None, min_margin=0.10)
    assert plan.fits, plan.verdict()
    assert plan.margin >= 0.10 * 80 * GIB


def test_plan_cli_prints_table_and_exit_code(capsys):
    from megatron_pz.cli import main

    path = str(ROOT / "examples" / "pretrainzero_qwen3_30b_a3b.yaml")
    assert main(["plan", path]) == 0
    out = capsys.readouterr().out
    assert "FITS" in out and "gradient buffer" in out and "vLLM weights (TP 2)" in out
    assert main(["plan", path, "train.max_tokens_per_micro_batch=16384", "model.recompute=null"]) == 1
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and "train.max_tokens_per_micro_batch" in out


def test_plan_terms_follow_their_knobs():
    cfg = load_run_config(ROOT / "examples" / "tiny_cpu.yaml")
    hf = load_hf_config(dict(cfg.model.architecture))
    base = plan_run(cfg, hf, 1, 80 * GIB, "cpu")
    training = {t.name: t.bytes for t in base.phases[2].terms}
    logits = 4096 * 4096 * 4  # tokens x vocab x fp32
    assert training["logits (model output)"] == logits
    assert training["loss: fp32 softmax kept for backward"] == logits
    assert training["entropy: 3 fp32 copies of the logits (transient)"] == 3 * logits
    s = Shapes.from_hf(hf)
    # Adam moments of an fp32 model without sharding padding: 8 bytes per parameter (+ distributed
    # optimizer padding of at most 127 elements)
    n = sum(p.numel for p in chunk_params(s, Layout(1, 1, 1, 1, 1, 1, None, False), 0))
    moments = {t.name: t.bytes for t in base.phases[0].terms}["optimizer: Adam moments (1/DP shard)"]
    assert 8 * n <= moments < 8 * (n + 128)
    # the tiny default's hf engine: a full fp32 copy (the tied head counted once) and a KV cache of
    # every layer for max_batch_size sequences, awake in the rollout phase only
    rollout = {t.name: t.bytes for t in base.phases[0].terms}
    seq = max_sequence_length(cfg)
    assert rollout["hf engine weights (full copy)"] == 4 * n
    kv = 2 * hf.num_hidden_layers * hf.num_key_value_heads * hf.head_dim * 4 * cfg.rollout.max_batch_size * seq
    assert rollout[f"hf engine KV cache ({cfg.rollout.max_batch_size} sequences x {seq})"] == kv
    assert not any(t.name.startswith("hf engine") for t in base.phases[2].terms)


def test_train_refuses_an_unfit_plan_before_any_work(monkeypatch):
    import torch.distributed as dist

    from megatron_pz.train.run import Run

    monkeypatch.setenv("WORLD_SIZE", "1")
    cfg = load_run_config(ROOT / "examples" / "tiny_cpu.yaml", ["train.max_tokens_per_micro_batch=100000000"])
    with pytest.raises(ConfigError, match="train.max_tokens_per_micro_batch"):
        Run(cfg)
    assert not dist.is_initialized()  # refused before the runtime (and any model) was set up
    hf = load_hf_config(dict(cfg.model.architecture))
    cfg.runtime.memory_plan = "warn"
    assert not check_at_startup(cfg, hf, 1, "cpu", device_bytes=8 * GIB).fits  # printed, not refused
    cfg.runtime.memory_plan = "off"
    assert check_at_startup(cfg, hf, 1, "cpu", device_bytes=8 * GIB) is None


FREED_TENSORS = r"""
import sys, torch, psutil
from megatron_pz.runtime.host_memory import return_freed_tensors_to_the_system
if sys.argv[1] == "fixed":
    assert return_freed_tensors_to_the_system()
rss = lambda: psutil.Process().memory_info().rss
big = torch.ones(4 * 2**20)  # 16 MiB, mmapped and freed: glibc raises its mmap threshold to 16 MiB
del big
before = rss()
held, kept = [], []
for _ in range(128):
    held.append(torch.ones(2**20))  # a 4 MiB activation ...
    kept.append(torch.ones(2**10))  # ... and a small tensor that outlives it (a heap hole cannot be trimmed)
del held
print((rss() - before) / 2**20)
"""


@pytest.mark.parametrize("mode", ["default", "fixed"])
def test_freed_activations_leave_the_process_on_cpu(mode):
    """glibc keeps freed blocks below its (rising) mmap threshold in its heaps: a training step's activations
    stayed resident after the step (SmolLM2: 6 GiB kept, the peak 4 GiB over the plan). With the threshold
    fixed at 128 KiB (what ``initialize`` does on CPU) they go back to the system when freed."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", FREED_TENSORS, mode], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    kept_mib = float(out.stdout.split()[-1])
    if mode == "default":
        assert kept_mib > 400  # most of the 512 MiB stays in the process
    else:
        assert kept_mib < 32


def test_cpu_plan_counts_the_host_process_and_vllm_runtime():
    """On CPU the budget is the process's resident set: the plan adds what a GPU plan leaves to the host
    (the measured interpreter + libraries + data baseline) and vLLM's CPU runtime beyond weights and KV."""
    from megatron_pz.memory_plan.plan import CPU_HOST_PROCESS_BYTES, CPU_VLLM_RUNTIME_BYTES

    cfg = load_run_config(ROOT / "examples" / "tiny_cpu.yaml", ["rollout.engine=vllm"])
    hf = load_hf_config(dict(cfg.model.architecture))
    cpu, gpu = plan_run(cfg, hf, 1, 24 * GIB, "cpu"), plan_run(cfg, hf, 1, 80 * GIB, "cuda")
    for phase in cpu.phases:  # no sleep mode on CPU: the engine counts in every phase
        names = {t.name: t.bytes for t in phase.terms}
        assert names["host process: Python, torch, Megatron-Core, transformers, data (measured)"] == CPU_HOST_PROCESS_BYTES
        assert names["vLLM CPU runtime beyond weights and KV cache (measured)"] == CPU_VLLM_RUNTIME_BYTES
    assert not any(t.name.startswith(("host process", "vLLM CPU")) for ph in gpu.phases for t in ph.terms)
    assert any("no sleep mode" in note for note in cpu.notes)


def _rollout_rank_plan(*overrides: str, staleness: int, window: int, device: str = "cpu"):
    cfg = load_run_config(ROOT / "examples" / "tiny_cpu.yaml",
                          ["rollout.placement=disaggregated", "rollout.ranks=2", "runtime.world_size=3", *overrides])
    # set on the object: rollout.max_staleness > 1 and rollout.partial_rollout_tokens (issue 30) are checked by
    # the config's own validation where they are defined
    cfg.rollout.max_staleness, cfg.rollout.partial_rollout_tokens = staleness, window
    hf = load_hf_config(dict(cfg.model.architecture))
    return plan_rollout_ranks(cfg, hf, 24 * GIB, device)


def test_rollout_rank_counts_the_rows_in_flight():
    """Issue 30 item 4: a rollout rank holds max_staleness + 1 steps of its rows at once (their KV at full length
    inside the engine's cache, their token ids / log-probs / versions on the host), by hand for the tiny default
    (PretrainZero 4 x (1 + 4) = 20 samples per passage, 8 passages over 2 rollout ranks: 80 rows a step; prompt 512
    + response 16 + 8 = 536 tokens; K and V of 4 layers x 2 KV heads x 32 dims in fp32 = 2,048 bytes a token)."""
    import sys

    from megatron_pz.memory_plan.plan import ROW_PROMPT_TOKEN_BYTES, ROW_RESPONSE_TOKEN_BYTES

    # the row's Python lists: a slot + an int id (28 bytes above the small-int cache) / a float log-prob (24)
    assert ROW_PROMPT_TOKEN_BYTES == 8 + sys.getsizeof(2**20) == 36
    assert ROW_RESPONSE_TOKEN_BYTES == 3 * 8 + 2 * sys.getsizeof(2**20) + sys.getsizeof(0.5) == 104
    # vLLM on CPU, max_staleness 3 (4 steps), 16-token windows: 320 rows of 640 tokens (5 blocks of 128)
    plan = _rollout_rank_plan("rollout.engine=vllm", staleness=3, window=16)
    terms = {t.name: t.bytes for t in plan.phases[0].terms}
    cache = 64 * 640 * 2048  # the engine's cache: rollout.max_batch_size=64 sequences of 640 tokens
    assert 4 * 80 * 640 * 2048 == 419_430_400 > cache == 83_886_080  # more than the cache: it holds 64 at once
    assert terms["KV of the rows in flight (4 steps x 80 rows x 536 tokens)"] == cache
    assert terms["vLLM KV cache (64 sequences x 536 tokens): the rest"] == 0
    assert not any(name.startswith("vLLM KV cache") and "the rest" not in name for name in terms)
    assert any("need 0.39 GiB of KV at full length (320 rows" in n and "holds 64 of them at once" in n
               for n in plan.notes), plan.notes
    (host,) = plan.host_terms
    assert host.name == ("rows in flight (320): prompt + token ids, log-probs, versions (partial rows kept between "
                         "16-token windows)")
    assert host.bytes == 320 * (512 * 36 + 16 * 104) == 6_430_720
    # on-policy (one step) with a cache of 128 sequences: the 80 rows fit, the rest of the cache is shown apart
    plan = _rollout_rank_plan("rollout.engine=vllm", "rollout.max_batch_size=128", staleness=0, window=0)
    terms = {t.name: t.bytes for t in plan.phases[0].terms}
    assert terms["KV of the rows in flight (1 steps x 80 rows x 536 tokens)"] == 80 * 640 * 2048 == 104_857_600
    assert terms["vLLM KV cache (128 sequences x 536 tokens): the rest"] == 48 * 640 * 2048
    assert not any("of KV at full length" in n for n in plan.notes)
    assert plan.host_terms[0].bytes == 80 * (512 * 36 + 16 * 104)
    assert "(rows kept until delivered)" in plan.host_terms[0].name
    # the hf engine (no blocks): max_staleness 1, 160 rows of 536 tokens against its 64-sequence cache
    plan = _rollout_rank_plan("rollout.engine=hf", staleness=1, window=0)
    terms = {t.name: t.bytes for t in plan.phases[0].terms}
    assert terms["KV of the rows in flight (2 steps x 80 rows x 536 tokens)"] == 64 * 536 * 2048
    assert terms["hf engine KV cache (64 sequences x 536): the rest"] == 0
    assert any("holds 64 of them at once" in n for n in plan.notes)
    assert "KV of the rows in flight (2 steps x 80 rows x 536 tokens)" in render(plan)
