"""Layout transforms and names of the HF <-> Megatron mapping, checked by hand (no Megatron world)."""

from __future__ import annotations

import torch

from megatron_pz.convert.mapping import (
    COLUMN, GATE_UP, ROW, combine_hf, expected_hf_tensors, local_name_from_te, param_spec, split_megatron,
    te_name_from_local,
)
from megatron_pz.convert.sharding import shard, unshard
from megatron_pz.model.provider import load_hf_config


def _cfg(**kw):
    base = dict(model_type="qwen3", vocab_size=16, hidden_size=8, intermediate_size=6, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=1)
    base.update(kw)
    return load_hf_config(base)


def test_qkv_is_interleaved_per_query_group():
    cfg = _cfg()  # 4 query heads, 2 groups, head_dim 1: rows are labelled by value
    q = torch.tensor([[10.0], [11.0], [12.0], [13.0]])
    k = torch.tensor([[20.0], [21.0]])
    v = torch.tensor([[30.0], [31.0]])
    spec = param_spec(cfg, "decoder.layers.0.self_attention.linear_qkv.weight")
    fused = combine_hf(spec, [q, k, v], cfg)
    assert fused.flatten().tolist() == [10, 11, 20, 30, 12, 13, 21, 31]
    assert [t.flatten().tolist() for t in split_megatron(spec, fused, cfg)] == [[10, 11, 12, 13], [20, 21], [30, 31]]
    # TP=2 keeps whole groups: rank 1 holds group 1
    assert shard(fused, spec.tp_split, 1, 2).flatten().tolist() == [12, 13, 21, 31]


def test_swiglu_fc1_shards_gate_and_up_separately():
    full = torch.arange(8.0)[:, None]  # gate rows 0-3, up rows 4-7
    assert shard(full, GATE_UP, 0, 2).flatten().tolist() == [0, 1, 4, 5]
    assert shard(full, GATE_UP, 1, 2).flatten().tolist() == [2, 3, 6, 7]
    assert torch.equal(unshard([shard(full, GATE_UP, r, 2) for r in range(2)], GATE_UP), full)
    m = torch.arange(12.0).reshape(3, 4)
    assert shard(m, ROW, 1, 2).tolist() == [[2, 3], [6, 7], [10, 11]]
    assert torch.equal(unshard([shard(m, COLUMN, r, 3) for r in range(3)], COLUMN), m)


def test_expert_index_is_global_over_ep_ranks():
    cfg = load_hf_config(dict(model_type="qwen3_moe", vocab_size=16, hidden_size=8, intermediate_size=6,
                              moe_intermediate_size=4, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=2, num_experts=8, num_experts_per_tok=2))
    spec = param_spec(cfg, "decoder.layers.0.mlp.experts.local_experts.1.linear_fc1.weight", layer=1,
                      num_local_experts=4, ep_rank=1)
    assert spec.expert == 5
    assert spec.hf_names == ("model.layers.1.mlp.experts.5.gate_proj.weight", "model.layers.1.mlp.experts.5.up_proj.weight")
    assert param_spec(cfg, "decoder.layers.1.mlp.router.weight").hf_names == ("model.layers.1.mlp.gate.weight",)
    assert len([n for n in expected_hf_tensors(cfg) if ".experts." in n]) == 2 * 8 * 3


def test_te_names_round_trip():
    cases = {
        ("decoder.layers.3.input_layernorm.weight", False): "decoder.layers.3.self_attention.linear_qkv.layer_norm_weight",
        ("decoder.layers.3.pre_mlp_layernorm.weight", False): "decoder.layers.3.mlp.linear_fc1.layer_norm_weight",
        ("decoder.layers.3.pre_mlp_layernorm.weight", True): "decoder.layers.3.pre_mlp_layernorm.weight",
        ("decoder.layers.0.mlp.experts.local_experts.7.linear_fc2.weight", True): "decoder.layers.0.mlp.experts.linear_fc2.weight7",
        ("module.decoder.layers.1.self_attention.q_layernorm.weight", False): "module.decoder.layers.1.self_attention.q_layernorm.weight",
        ("embedding.word_embeddings.weight", False): "embedding.word_embeddings.weight",
    }
    for (local, moe), te in cases.items():
        assert te_name_from_local(local, moe_layer=moe) == te
        assert local_name_from_te(te) == local


def test_llama_tied_has_no_lm_head_and_qwen3_has_qk_norm():
    tied = load_hf_config(dict(model_type="llama", vocab_size=16, hidden_size=8, intermediate_size=6,
                               num_hidden_layers=1, num_attention_heads=2, tie_word_embeddings=True))
    names = expected_hf_tensors(tied)
    assert "lm_head.weight" not in names and "model.layers.0.self_attn.q_norm.weight" not in names
    assert "model.layers.0.self_attn.q_norm.weight" in expected_hf_tensors(_cfg())


def test_smollm3_has_the_tensors_of_a_tied_llama():
    """SmolLM3 (transformers 5.24 modeling_smollm3) is a tied Llama by tensor names and shapes: its NoPE
    layers hold no tensor of their own. 4 layers x 9 tensors + embedding + final norm, no lm_head."""
    shapes = dict(vocab_size=16, hidden_size=8, intermediate_size=6, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=True)
    smol = load_hf_config(dict(model_type="smollm3", bos_token_id=None, eos_token_id=None, pad_token_id=None,
                               **shapes))
    names = expected_hf_tensors(smol)
    assert names == expected_hf_tensors(load_hf_config(dict(model_type="llama", **shapes)))
    assert len(names) == 4 * 9 + 2 and "lm_head.weight" not in names
    assert names["model.layers.3.self_attn.k_proj.weight"] == (2 * 2, 8)  # head_dim = 8 / 4 = 2
    assert param_spec(smol, "decoder.layers.1.self_attention.linear_qkv.weight", layer=3).hf_names == tuple(
        f"model.layers.3.self_attn.{p}_proj.weight" for p in "qkv")
