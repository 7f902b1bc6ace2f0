"""Session fixtures for the data-pipeline tests: a small BPE and one preprocessed copy of the gensim
Wikipedia excerpt, built once and shared (import these names into a test module to use them)."""

from __future__ import annotations

import pytest

from megatron_pz.data.preprocess import preprocess
from megatron_pz.data.sample import gensim_wiki_sample
from megatron_pz.data.tokenizer import train_bpe_tokenizer
from megatron_pz.data.tokenizer_corpus import article_texts

# Options used by every run compared against ``wiki_out``: 4 shards of 60 pages over 206 pages; Punkt
# and IDF fitted on the first shard only (keeps the test runs short).
WIKI_OPTIONS = dict(
    pages_per_shard=60, fit_pages=60, passage_tokens=384, max_passage_tokens=1024, min_passage_tokens=32
)


@pytest.fixture(scope="session")
def wiki_dump():
    return gensim_wiki_sample()


@pytest.fixture(scope="session")
def wiki_tokenizer(tmp_path_factory, wiki_dump):
    """Byte-level BPE (vocab 2048) trained on the cleaned articles of the excerpt's first 120 pages."""
    texts = article_texts([wiki_dump], max_pages=120)
    return train_bpe_tokenizer(texts, 2048, tmp_path_factory.mktemp("tok") / "bpe2048")


@pytest.fixture(scope="session")
def wiki_out(tmp_path_factory, wiki_dump, wiki_tokenizer):
    """The whole excerpt preprocessed with one worker."""
    out = tmp_path_factory.mktemp("wiki") / "out"
    manifest = preprocess([wiki_dump], out, wiki_tokenizer, workers=1, progress=False, **WIKI_OPTIONS)
    return out, manifest
