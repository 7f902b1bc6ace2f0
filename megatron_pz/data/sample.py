"""The genuine English Wikipedia dump excerpt that ships inside the ``gensim`` wheel.

It is real ``enwiki`` XML (articles, redirects, disambiguation pages, one non-article namespace), so
tests and the embedded CPU default run on true Wikipedia without downloading anything.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
from pathlib import Path

GENSIM_WIKI_SAMPLE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def gensim_wiki_sample() -> Path:
    if importlib.util.find_spec("gensim") is None:
        raise ModuleNotFoundError(
            "the Wikipedia sample ships in the gensim wheel, which is not installed; "
            "install it with `pip install 'megatron-pz[dev]'` (or `pip install gensim==4.4.0`)"
        )
    path = Path(str(importlib.resources.files("gensim") / "test" / "test_data" / GENSIM_WIKI_SAMPLE))
    if not path.is_file():
        raise FileNotFoundError(f"{path}: gensim is installed but its test data lacks {GENSIM_WIKI_SAMPLE}")
    return path
