"""The embedded default dataset: the gensim Wikipedia excerpt, a BPE trained on it, preprocessed.

Built once into a cache folder (about 20 s on one CPU core) so a fresh machine can train without any
download; later calls return the cached folder (preprocess resumes or returns its manifest).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from .config import DataConfig
from .dataset import read_manifest
from .preprocess import preprocess
from .sample import gensim_wiki_sample
from .tokenizer import train_bpe_tokenizer
from .tokenizer_corpus import article_texts


def default_cache_dir() -> Path:
    return Path(os.environ.get("MEGATRON_PZ_CACHE", Path.home() / ".cache" / "megatron-pz"))


def default_dataset_dir(cache_dir: Optional[str | os.PathLike], vocab_size: int, passage_tokens: int) -> Path:
    """Where :func:`ensure_default_dataset` keeps (or will build) the embedded default."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / f"gensim-wiki-bpe{vocab_size}-p{passage_tokens}"


def configured_data_dir(cfg: DataConfig) -> Optional[Path]:
    """The folder a run will read, if it exists yet: ``cfg.path``, or the embedded default once built
    (None: the default is built at start-up)."""
    if cfg.path is not None:
        return Path(cfg.path)
    out = default_dataset_dir(cfg.default_cache_dir, cfg.default_vocab_size, cfg.default_passage_tokens)
    return out if (out / "manifest.json").is_file() else None


def ensure_default_dataset(
    cache_dir: Optional[str | os.PathLike] = None,
    vocab_size: int = 4096,
    passage_tokens: int = 256,
    workers: int = 1,
    progress: bool = False,
) -> Path:
    """Folder of the preprocessed gensim excerpt (built on first use); open it with PassageDataset."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    sample = gensim_wiki_sample()
    tokenizer_dir = root / f"gensim-bpe{vocab_size}"
    if not (tokenizer_dir / "tokenizer.json").is_file():
        train_bpe_tokenizer(article_texts([sample]), vocab_size, tokenizer_dir)
    out = default_dataset_dir(cache_dir, vocab_size, passage_tokens)
    preprocess(
        [sample], out, tokenizer_dir, workers=workers, progress=progress,
        passage_tokens=passage_tokens, max_passage_tokens=max(1024, passage_tokens),
        min_passage_tokens=min(32, passage_tokens),
    )
    return out


def resolve_data_path(cfg: DataConfig, workers: int = 1) -> Path:
    """The folder a run reads: ``cfg.path`` when set, else the embedded default (built if needed)."""
    if cfg.path is not None:
        path = Path(cfg.path)
        read_manifest(path)  # a folder without one is refused, naming data.path's folder
        return path
    return ensure_default_dataset(
        cfg.default_cache_dir, cfg.default_vocab_size, cfg.default_passage_tokens, workers=workers
    )
