"""Throughput of ``preprocess`` on the gensim Wikipedia excerpt vs a bare tokenize-and-write pass.

The bare pass is the cost floor of Megatron's own ``preprocess_data.py``-style pipeline: the same
cleaned article text, tokenized with the same tokenizer (one core) and written to an IndexedDataset.
Reports pages/s and tokens/s per worker for both, their ratio, and the same ratio with the
mwparserfromhell markup cleaning left out (the bare pass starts from already-clean text), and with the
one-off Punkt/IDF fit left out too (it is bounded, so it vanishes on a full dump).

    python bench/bench_preprocess.py [--tokenizer DIR] [--vocab-size 4096] [--workers 1]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: train a BPE on the dump)")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--passage-tokens", type=int, default=512)
    args = parser.parse_args()
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker in both passes

    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from megatron_pz.data.clean import clean_page
    from megatron_pz.data.preprocess import preprocess
    from megatron_pz.data.sample import gensim_wiki_sample
    from megatron_pz.data.sentences import train_punkt
    from megatron_pz.data.spans import document_frequencies
    from megatron_pz.data.sources import iter_pages
    from megatron_pz.data.tokenizer import load_tokenizer, train_bpe_tokenizer
    from megatron_pz.data.tokenizer_corpus import article_texts

    dump = gensim_wiki_sample()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.tokenizer is None:
            t0 = time.perf_counter()
            tokenizer_dir = train_bpe_tokenizer(article_texts([dump]), args.vocab_size, tmp / "tok")
            print(f"tokenizer: BPE {args.vocab_size} trained on the dump in {time.perf_counter() - t0:.1f} s")
        else:
            tokenizer_dir = Path(args.tokenizer)

        # 1) the full pipeline
        t0 = time.perf_counter()
        manifest = preprocess(
            [dump], tmp / "out", tokenizer_dir, workers=args.workers, progress=False,
            passage_tokens=args.passage_tokens,
        )
        full_s = time.perf_counter() - t0
        counts = manifest["counts"]

        # 2) cleaning alone (mwparserfromhell), also producing the text for the bare pass
        t0 = time.perf_counter()
        pages = list(iter_pages(dump))
        read_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        texts = [r.text for r in map(clean_page, pages) if r.skip is None]
        clean_s = time.perf_counter() - t0

        # 2b) the one-off fit stage (Punkt training on <= 1 MB + document frequencies), amortised on a full dump
        t0 = time.perf_counter()
        train_punkt(texts, manifest["options"]["punkt_chars"])
        document_frequencies(texts)
        fit_s = time.perf_counter() - t0

        # 3) bare tokenize-and-write of the same cleaned text
        backend = load_tokenizer(tokenizer_dir).backend_tokenizer
        t0 = time.perf_counter()
        builder = IndexedDatasetBuilder(str(tmp / "bare.bin"), dtype=np.uint16)
        bare_tokens = 0
        for text in texts:
            ids = backend.encode(text, add_special_tokens=False).ids
            builder.add_document(ids, [len(ids)])
            bare_tokens += len(ids)
        builder.finalize(str(tmp / "bare.idx"))
        bare_s = time.perf_counter() - t0

    pages_n = counts["pages_read"]
    per_worker = args.workers
    report = {
        "dump": dump.name,
        "workers": args.workers,
        "pages": pages_n,
        "articles": counts["articles"],
        "passages": counts["passages"],
        "passage_tokens": counts["tokens"],
        "candidates": counts["candidates"],
        "pipeline_s": round(full_s, 2),
        "pipeline_pages_per_s_per_worker": round(pages_n / full_s / per_worker, 1),
        "pipeline_tokens_per_s_per_worker": round(counts["tokens"] / full_s / per_worker),
        "xml_read_s": round(read_s, 2),
        "markup_cleaning_s": round(clean_s, 2),
        "fit_punkt_idf_s": round(fit_s, 2),
        "bare_tokenize_write_s": round(bare_s, 2),
        "bare_pages_per_s": round(pages_n / bare_s, 1),
        "bare_tokens_per_s": round(bare_tokens / bare_s),
        "ratio_pipeline_vs_bare": round(full_s * per_worker / bare_s, 2),
        "ratio_without_markup_cleaning": round((full_s * per_worker - clean_s) / bare_s, 2),
        "ratio_steady_state_without_cleaning_and_fit": round((full_s * per_worker - clean_s - fit_s) / bare_s, 2),
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
