"""The ``data`` section of a run config: which preprocessed folder the trainer reads, and how."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron_pz.errors import ConfigError


@dataclass
class DataConfig:
    path: Optional[str] = None  # preprocess output folder; None: build the embedded gensim default
    heldout_fraction: float = 0.02  # articles (by title hash) kept out of training
    # articles (the next share by title hash) kept out of training too, to choose settings on without
    # looking at the held-out ones; eval_split picks which of the two a run evaluates on
    validation_fraction: float = 0.0
    eval_split: str = "heldout"  # heldout | validation
    max_passage_tokens: int = 1024  # passages longer than this are skipped by the sampler
    max_span_words: Optional[int] = None  # None: what the folder was built with
    # span candidates of at most this many tokens (None: any), e.g. 1 to give a small model only words
    # its tokenizer spells as one piece (tried on the tiny default: held-out accuracy did not rise)
    max_span_tokens: Optional[int] = None
    # embedded default (path=None): tokenizer trained on the gensim Wikipedia excerpt, then preprocessed
    default_cache_dir: Optional[str] = None  # None: ~/.cache/megatron-pz
    default_vocab_size: int = 4096
    default_passage_tokens: int = 256

    def validate(self) -> None:
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise ConfigError(f"data.heldout_fraction must be in [0, 1), got {self.heldout_fraction}")
        for name in ("max_passage_tokens", "default_passage_tokens", "max_span_words", "max_span_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"data.{name} must be >= 1, got {value}")
        if self.default_vocab_size < 300:
            raise ConfigError(f"data.default_vocab_size must be >= 300 (256 bytes + specials + merges), "
                              f"got {self.default_vocab_size}")
