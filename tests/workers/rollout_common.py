"""Shared pieces of the rollout worker scripts: a byte-level tokenizer and tiny Qwen3 configs.

head_dim 32 and hidden 64: the smallest shapes vLLM's CPU build runs (its CPU attention kernels take head
sizes 32, 48, 64, ... 512, and its CPU MoE experts need hidden % 32 == 0), so the same configs serve the
real vLLM tests and the Megatron / hf engine tests.
"""

from __future__ import annotations

import torch

SPECIALS = ["<eos>", "<pad>", "<x1>", "<x2>"]  # ids 256..259
VOCAB = 256 + len(SPECIALS)
EOS = 256


def byte_tokenizer():
    """A real ``tokenizers`` byte-level tokenizer: one token per byte (ids 0..255) plus specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    alphabet = ByteLevel.alphabet()
    byte_to_char = {b: c for b, c in zip(range(256), _bytes_to_unicode())}
    assert set(byte_to_char.values()) == set(alphabet)
    vocab = {byte_to_char[b]: b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")
    assert fast.convert_tokens_to_ids("<eos>") == EOS
    return fast


def _bytes_to_unicode():
    """GPT-2's byte -> printable character table (the order ByteLevel uses)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs))
    return [chr(table[b]) for b in range(256)]


def tiny_hf_config(moe: bool = False, layers: int = 2, tied: bool = False, model_type: str = "qwen3"):
    from megatron_pz.model.provider import load_hf_config

    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, head_dim=32, eos_token_id=EOS,
                max_position_embeddings=512, tie_word_embeddings=tied)
    if model_type == "llama":  # SmolLM-shaped: Llama blocks (no q/k norms), tied embeddings
        base.update(model_type="llama", rms_norm_eps=1e-5)
    elif moe:
        base.update(model_type="qwen3_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                    norm_topk_prob=True, router_aux_loss_coef=0.0, decoder_sparse_step=1, mlp_only_layers=[])
    else:
        base.update(model_type="qwen3")
    return load_hf_config(base)


def sharpen(model, scale: float = 8.0) -> None:
    """Spread the output logits (a random-init model is near uniform), so greedy has clear winners
    and sampling frequencies are informative."""
    with torch.no_grad():
        if getattr(model, "post_process", False):
            if model.output_layer.weight is not None:
                model.output_layer.weight.mul_(scale)
            elif getattr(model, "pre_process", False):  # tied head: the embedding is the output weight
                model.embedding.word_embeddings.weight.mul_(scale)
