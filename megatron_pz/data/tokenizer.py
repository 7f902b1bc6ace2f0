"""Train a small byte-level BPE tokenizer on the input, and load any local Hugging Face tokenizer.

The embedded default trains on the gensim Wikipedia excerpt, so a fresh machine needs no download.
Saved as a regular Hugging Face tokenizer folder (``AutoTokenizer.from_pretrained(out_dir)`` works),
with ``<|endoftext|>`` as eos and pad.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Optional, Sequence

EOS_TOKEN = "<|endoftext|>"
# What a tokenizer folder may hold (and a checkpoint or an exported HF folder carries along with the weights)
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
    "tokenizer.model", "added_tokens.json", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
)


def train_bpe_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    out_dir: str | os.PathLike,
    extra_texts: Sequence[str] = (),
) -> Path:
    """Train a byte-level BPE on ``texts`` (+ ``extra_texts``, e.g. the prompt templates) and save it.

    The folder is assembled in a temporary sibling and moved into place file by file, so an
    interrupted run never leaves a half-written tokenizer that later loads.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 300:
        raise ValueError(f"vocab_size={vocab_size}: a byte-level BPE needs at least 256 bytes + 1 special")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )

    def corpus():
        yield from texts
        yield from extra_texts

    tokenizer.train_from_iterator(corpus(), trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN, bos_token=None
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.tmp") as tmp:
        wrapped.save_pretrained(tmp)
        for name in sorted(os.listdir(tmp)):
            os.replace(Path(tmp) / name, out / name)
    return out


def load_tokenizer(path: str | os.PathLike):
    """A *fast* tokenizer from a local folder: the pipeline needs its character offsets."""
    from transformers import AutoTokenizer

    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: tokenizer folder not found")
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"{folder}: tokenizer is not a fast (Rust) tokenizer; character offsets are needed "
            "to align span candidates with tokens (save it with tokenizer.json)"
        )
    return tokenizer


def copy_tokenizer(tokenizer, out_dir: str | os.PathLike) -> Path:
    """Save ``tokenizer`` into ``out_dir`` atomically (so a dataset folder is self-contained)."""
    out = Path(out_dir)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp"))
    try:
        tokenizer.save_pretrained(str(tmp))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def copy_tokenizer_files(src: Optional[str | Path], dst: str | Path) -> list[str]:
    """Copy the tokenizer/generation files that exist in ``src`` (any of :data:`TOKENIZER_FILES`)."""
    if src is None or not Path(src).is_dir():
        return []
    copied = []
    Path(dst).mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied
