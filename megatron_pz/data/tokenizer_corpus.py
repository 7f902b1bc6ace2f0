"""Clean article text from any supported input, for training a tokenizer on the same data."""

from __future__ import annotations

import os
from typing import Iterator, Optional, Sequence

from .clean import clean_page
from .sources import expand_inputs, iter_pages


def article_texts(
    inputs: Sequence[str | os.PathLike], max_pages: Optional[int] = None, skipped: Optional[dict] = None
) -> Iterator[str]:
    """Cleaned text of every article in ``inputs`` (same cleaning as preprocess); skips are counted."""
    read = 0
    for path in expand_inputs(inputs):
        for page in iter_pages(path):
            if max_pages is not None and read >= max_pages:
                return
            read += 1
            result = clean_page(page)
            if result.skip is not None:
                if skipped is not None:
                    skipped[result.skip] = skipped.get(result.skip, 0) + 1
                continue
            yield result.text
