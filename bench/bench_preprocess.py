"""Throughput of ``preprocess`` on the gensim Wikipedia excerpt vs a bare tokenize-and-write pass.

The bare pass is the cost floor of Megatron's own ``preprocess_data.py``-style pipeline: the same
cleaned article text, tokenized with the same tokenizer (one core) and written to an IndexedDataset.
Reports pages/s and tokens/s per worker for both, their ratio, and the same ratio with the one-off
Punkt/IDF fit left out (it is bounded, so it vanishes on a full dump), with the mwparserfromhell
markup cleaning left out (the bare pass starts from already-clean text), and with both left out.
The tokenizer is loaded once before any timing, so no figure carries the one-off library imports.
``added_cost_*`` is what the issue's target is about: the cost of cleaning, sentence splitting and span
extraction (pipeline minus the bare pass minus reading the XML, which both pipelines need) in units of
the bare pass. ``--copies N`` feeds the excerpt N times as one dump (pages repeated verbatim), so the
bounded fit (Punkt on <= 1 MB, IDF over the first 1000 pages) is amortised as on a real dump.

    python bench/bench_preprocess.py [--tokenizer DIR] [--vocab-size 4096] [--workers 1] [--repeats 3] [--copies 1]

Each figure is the best of ``--repeats`` runs; with one worker everything runs in this process and is
timed in CPU seconds (``time.process_time``), which other jobs on a shared machine disturb far less
than wall time. With several workers the pipeline is timed in wall seconds.
"""

from __future__ import annotations

import argparse
import bz2
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def repeated_dump(src: Path, copies: int, dst: Path) -> Path:
    """``src``'s pages ``copies`` times in one ``.xml.bz2`` (same header and footer)."""
    with bz2.open(src, "rt", encoding="utf-8") as fh:
        raw = fh.read()
    start, end = raw.index("<page>"), raw.rindex("</page>") + len("</page>")
    with bz2.open(dst, "wt", encoding="utf-8") as fh:
        fh.write(raw[:start])
        for _ in range(copies):
            fh.write(raw[start:end])
        fh.write(raw[end:])
    return dst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: train a BPE on the dump)")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--passage-tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--copies", type=int, default=1, help="feed the excerpt this many times as one dump")
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

    clock = time.process_time if args.workers == 1 else time.perf_counter

    def best_of(fn):
        times, result = [], None
        for _ in range(args.repeats):
            t0 = clock()
            result = fn()
            times.append(clock() - t0)
        return min(times), result

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        dump = gensim_wiki_sample()
        if args.copies > 1:
            dump = repeated_dump(dump, args.copies, tmp / f"excerpt-x{args.copies}.xml.bz2")
        if args.tokenizer is None:
            t0 = time.perf_counter()
            tokenizer_dir = train_bpe_tokenizer(article_texts([gensim_wiki_sample()]), args.vocab_size, tmp / "tok")
            print(f"tokenizer: BPE {args.vocab_size} trained on the dump in {time.perf_counter() - t0:.1f} s")
        else:
            tokenizer_dir = Path(args.tokenizer)

        load_tokenizer(tokenizer_dir)  # the one-off imports (transformers) out of every timing

        # 1) the full pipeline (fresh output folder per repeat)
        runs = iter(range(args.repeats))
        full_s, manifest = best_of(lambda: preprocess(
            [dump], tmp / f"out{next(runs)}", tokenizer_dir, workers=args.workers, progress=False,
            passage_tokens=args.passage_tokens,
        ))
        counts = manifest["counts"]

        # 2) reading and cleaning alone (mwparserfromhell), also giving the text for the bare pass
        read_s, pages = best_of(lambda: list(iter_pages(dump)))
        clean_s, cleaned = best_of(lambda: list(map(clean_page, pages)))
        texts = [r.text for r in cleaned if r.skip is None]

        # 2b) the one-off fit stage (Punkt training on <= 1 MB + document frequencies), amortised on a full dump
        options = manifest["options"]
        fit_texts = [r.text for r in cleaned[:options["fit_pages"]] if r.skip is None]
        fit_s, _ = best_of(lambda: (train_punkt(fit_texts, options["punkt_chars"]), document_frequencies(fit_texts)))

        # 3) bare tokenize-and-write of the same cleaned text
        backend = load_tokenizer(tokenizer_dir).backend_tokenizer

        def bare() -> int:
            builder = IndexedDatasetBuilder(str(tmp / "bare.bin"), dtype=np.uint16)
            n = 0
            for text in texts:
                ids = backend.encode(text, add_special_tokens=False).ids
                builder.add_document(ids, [len(ids)])
                n += len(ids)
            builder.finalize(str(tmp / "bare.idx"))
            return n

        bare_s, bare_tokens = best_of(bare)

    pages_n = counts["pages_read"]
    per_worker = args.workers
    report = {
        "dump": dump.name,
        "copies": args.copies,
        "workers": args.workers,
        "clock": "cpu" if args.workers == 1 else "wall",
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
        "ratio_without_fit": round((full_s * per_worker - fit_s) / bare_s, 2),
        "ratio_without_markup_cleaning": round((full_s * per_worker - clean_s) / bare_s, 2),
        "ratio_steady_state_without_cleaning_and_fit": round((full_s * per_worker - clean_s - fit_s) / bare_s, 2),
        "added_cost_vs_bare": round((full_s * per_worker - read_s - bare_s) / bare_s, 2),
        "added_cost_vs_bare_without_fit": round((full_s * per_worker - read_s - bare_s - fit_s) / bare_s, 2),
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
