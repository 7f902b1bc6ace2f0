"""Tiny random Hugging Face models (Qwen3, Qwen3-MoE, Llama, SmolLM3) shared by the conversion tests and workers."""

from __future__ import annotations

from pathlib import Path

import torch

BASE = dict(vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=128, rms_norm_eps=1e-6)

CASES = {
    "qwen3": dict(model_type="qwen3", **BASE),
    # norm_topk_prob both ways; the second also mixes a dense layer in (mlp_only_layers).
    "qwen3_moe": dict(model_type="qwen3_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      norm_topk_prob=True, **BASE),
    "qwen3_moe_nonorm": dict(model_type="qwen3_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                             norm_topk_prob=False, mlp_only_layers=[0], **BASE),
    "llama_tied": dict(model_type="llama", tie_word_embeddings=True, **BASE),
    "llama": dict(model_type="llama", tie_word_embeddings=False, **BASE),
    # SmolLM3-3B's own NoPE pattern (every 4th layer skips RoPE; transformers derives no_rope_layers =
    # [1, 1, 1, 0] from the interval) on 4 layers: at PP=2 the NoPE layer sits on the second stage only,
    # so a per-stage (local) layer index would rotate it and the logits would differ. Tied, no head_dim
    # field (SmolLM3Config has none: hidden / heads = 16), no token ids outside the tiny vocab.
    "smollm3": dict(model_type="smollm3", tie_word_embeddings=True, no_rope_layer_interval=4,
                    rope_parameters={"rope_type": "default", "rope_theta": 5e6}, bos_token_id=None,
                    eos_token_id=None, pad_token_id=None,
                    **{k: v for k, v in BASE.items() if k not in ("head_dim", "num_hidden_layers")},
                    num_hidden_layers=4),
}
MOE_CASES = ("qwen3_moe", "qwen3_moe_nonorm")


def make_hf_model(case: str, seed: int = 0):
    """A float32 transformers model with every weight random (norms too, so a swapped norm shows)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    data = dict(CASES[case])
    cfg = AutoConfig.for_model(data.pop("model_type"), **data)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.05 * torch.randn_like(p))
    return model


def save_tokenizer(folder: Path) -> None:
    """A byte-level tokenizer with 256 byte tokens + <|endoftext|> (ids < 260), built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<|endoftext|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.save_pretrained(str(folder))


def write_hf_folder(case: str, folder: Path, seed: int = 0, max_shard_size: str = "60KB", tokenizer: bool = True):
    """Save the model sharded (index + several files) like the hub does; returns the model."""
    model = make_hf_model(case, seed)
    model.save_pretrained(str(folder), max_shard_size=max_shard_size)
    if tokenizer:
        save_tokenizer(folder)
    return model


def sample_ids(batch: int = 2, seq: int = 9, vocab: int = 256, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)
