"""Wikipedia (XML / HF parquet / JSONL) -> passages in a Megatron IndexedDataset + span-candidate shards.

Pipeline: the main process streams pages in input order and cuts them into shards of
``pages_per_shard`` consecutive pages; workers clean, sentence-split, tokenize and cut each shard into
passages and write it atomically (temp files, then ``os.replace``; the shard's ``.json`` marker is
written last). A shard's content depends only on its pages and on the fitted Punkt/IDF tables, so the
output is byte-identical for any number of workers, and a killed run resumes by skipping the shards
whose marker is present and consistent. When every shard is done, shards are concatenated into one
``passages.bin/.idx`` (token ids) and ``words.bin/.idx`` (the per-passage word table from which span
candidates are enumerated), both Megatron ``IndexedDataset``s aligned by document index with the
``text/*.jsonl`` shards (title and text per passage), and ``manifest.json`` is written last.

Before the shards, a *fit* stage cleans the first ``fit_pages`` pages once (they are reused by their
shards, not cleaned twice) to train Punkt and count document frequencies for the IDF feature; both are
saved in the output folder and reloaded on resume.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import itertools
import json
import multiprocessing
import os
import shutil
import signal
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from .clean import CleanResult, clean_page
from .passages import PassageBudget, cut_passages
from megatron_pz.errors import PzError, guarded

from .sources import InputError, RawPage, expand_inputs, iter_pages, sha256_of
from .spans import NUM_WORD_FIELDS, IdfTable, count_candidates, document_frequencies
from .tokenizer import copy_tokenizer, load_tokenizer

FORMAT_VERSION = 1
# Fault injection for the resume test: SIGKILL this process once this many shards are complete.
KILL_AFTER_SHARDS_ENV = "MEGATRON_PZ_PREPROCESS_KILL_AFTER_SHARDS"


@dataclass
class PreprocessConfig:
    """Options that shape the output (all recorded in the manifest; a resume must use the same)."""

    passage_tokens: int = 512  # target passage length; with the prompt instructions it stays < 1536
    max_passage_tokens: int = 1024
    min_passage_tokens: int = 32
    max_span_words: int = 5
    pages_per_shard: int = 1000
    fit_pages: int = 1000  # pages cleaned up front to fit Punkt and the IDF table
    punkt_chars: int = 1_000_000  # Punkt training sample (pure Python, ~1 s per MB)
    punkt_path: Optional[str] = None  # load Punkt parameters (save_punkt JSON) instead of training
    max_pages: Optional[int] = None  # stop after this many input pages (quick runs)

    def budget(self) -> PassageBudget:
        return PassageBudget(self.passage_tokens, self.max_passage_tokens, self.min_passage_tokens)

    def validate(self) -> None:
        if not 0 < self.min_passage_tokens <= self.passage_tokens <= self.max_passage_tokens:
            raise ValueError(
                "need 0 < min_passage_tokens <= passage_tokens <= max_passage_tokens, got "
                f"{self.min_passage_tokens}, {self.passage_tokens}, {self.max_passage_tokens}"
            )
        if self.max_span_words < 1 or self.pages_per_shard < 1 or self.fit_pages < 1:
            raise ValueError("max_span_words, pages_per_shard and fit_pages must be >= 1")


# ----------------------------------------------------------------------------------------- workers

_STATE: dict = {}


def _init_worker(out_dir: str, cfg: PreprocessConfig) -> None:
    """Per-process setup; the heavy state loads on the first shard (after the fit stage wrote it)."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker
    _STATE.clear()
    _STATE.update(out=Path(out_dir), cfg=cfg)


def _ensure_state() -> None:
    """Load what every shard needs once per process (tokenizer, Punkt, IDF)."""
    if "tokenizer" in _STATE:
        return
    from .sentences import SentenceSplitter, load_punkt  # nltk: imported only where sentences are split

    out = _STATE["out"]
    tokenizer = load_tokenizer(out / "tokenizer")
    _STATE.update(
        tokenizer=tokenizer.backend_tokenizer,
        dtype=_token_dtype(len(tokenizer)),
        splitter=SentenceSplitter(load_punkt(out / "punkt.json")),
        idf=IdfTable.from_json(json.loads((out / "idf.json").read_text(encoding="utf-8"))),
    )
    gc.freeze()  # the long-lived tables above need no more collector passes


def _token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 65_500 else np.int32


def _clean_indexed(item: tuple[int, RawPage]) -> tuple[int, CleanResult]:
    return item[0], clean_page(item[1])


def _shard_paths(out: Path, shard: int) -> dict[str, Path]:
    stem = f"shard-{shard:06d}"
    return {
        "tokens_bin": out / "shards" / f"{stem}.bin",
        "tokens_idx": out / "shards" / f"{stem}.idx",
        "words_bin": out / "shards" / f"{stem}.words.bin",
        "words_idx": out / "shards" / f"{stem}.words.idx",
        "text": out / "text" / f"{stem}.jsonl",
        "marker": out / "shards" / f"{stem}.json",
    }


def split_key(title: str) -> float:
    """Position of an article in [0, 1): held out when below ``heldout_fraction`` (by article)."""
    digest = hashlib.blake2b(title.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def process_shard(shard: int, items: list[tuple[int, RawPage, Optional[CleanResult]]]) -> dict:
    """Clean, split, tokenize, cut and write one shard; returns its counts (also in its marker)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    _ensure_state()
    out, cfg = _STATE["out"], _STATE["cfg"]
    paths = _shard_paths(out, shard)
    tmp = {k: p.with_name(p.name + ".tmp") for k, p in paths.items()}
    counts: dict = {"pages_read": 0, "skipped": {}, "articles": 0, "broken_markup_lines": 0}
    tokens_builder = IndexedDatasetBuilder(str(tmp["tokens_bin"]), dtype=_STATE["dtype"])
    words_builder = IndexedDatasetBuilder(str(tmp["words_bin"]), dtype=np.int32)
    split_keys: list[float] = []
    passages = tokens = words_total = candidates = 0
    budget = cfg.budget()
    with open(tmp["text"], "w", encoding="utf-8") as text_out:
        for page_index, page, cleaned in items:
            counts["pages_read"] += 1
            result = cleaned if cleaned is not None else clean_page(page)
            counts["broken_markup_lines"] += result.broken_lines
            if result.skip is not None:
                counts["skipped"][result.skip] = counts["skipped"].get(result.skip, 0) + 1
                continue
            article = result.text
            sentences = _STATE["splitter"].spans(article)
            encoding = _STATE["tokenizer"].encode(article, add_special_tokens=False)
            cut = cut_passages(
                article, sentences, encoding.ids, encoding.offsets, budget, _STATE["idf"], counts
            )
            if not cut:
                counts["skipped"]["no_passage_fits"] = counts["skipped"].get("no_passage_fits", 0) + 1
                continue
            counts["articles"] += 1
            key = split_key(page.title)
            for number, passage in enumerate(cut):
                tokens_builder.add_document(passage.token_ids, [len(passage.token_ids)])
                words_builder.add_document(passage.words.ravel(), [passage.words.size])
                record = {"page": page_index, "title": page.title, "part": number, "text": passage.text}
                text_out.write(json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n")
                split_keys.append(key)
                passages += 1
                tokens += len(passage.token_ids)
                words_total += len(passage.words)
            passage_of_word = np.repeat(np.arange(len(cut)), [len(passage.words) for passage in cut])
            stacked = np.concatenate([passage.words for passage in cut])
            candidates += count_candidates(stacked, cfg.max_span_words, passage_of_word)
    tokens_builder.finalize(str(tmp["tokens_idx"]))
    words_builder.finalize(str(tmp["words_idx"]))
    counts.update(passages=passages, tokens=tokens, words=words_total, candidates=candidates)
    for name in ("tokens_bin", "tokens_idx", "words_bin", "words_idx", "text"):
        os.replace(tmp[name], paths[name])
    marker = {
        "shard": shard,
        "counts": counts,
        "split_keys": split_keys,
        "sizes": {k: paths[k].stat().st_size for k in paths if k != "marker"},
    }
    _write_json(tmp["marker"], marker)
    os.replace(tmp["marker"], paths["marker"])
    return marker


# ------------------------------------------------------------------------------------------- main


def preprocess(
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    tokenizer_dir: str | os.PathLike,
    *,
    workers: int = 1,
    progress: bool = True,
    **options,
) -> dict:
    """Run (or resume) the pipeline; returns the manifest. ``options`` are :class:`PreprocessConfig` fields."""
    cfg = PreprocessConfig(**options)
    cfg.validate()
    out = Path(out_dir)
    files = expand_inputs(inputs)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(tokenizer_dir)
    run = {
        "format_version": FORMAT_VERSION,
        "inputs": [{"name": f.name, "sha256": sha256_of(f), "bytes": f.stat().st_size} for f in files],
        "tokenizer": {
            "source": Path(tokenizer_dir).name,
            "vocab_size": len(tokenizer),
            "sha256": _tokenizer_digest(tokenizer),
        },
        "options": asdict(cfg),
    }
    _check_same_run(out / "run.json", run)
    manifest_path = out / "manifest.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        if {k: manifest.get(k) for k in run} == run:
            return manifest
    for sub in ("shards", "text"):
        (out / sub).mkdir(exist_ok=True)
    if not (out / "tokenizer" / "tokenizer_config.json").is_file():
        copy_tokenizer(tokenizer, out / "tokenizer")
    for stray in itertools.chain((out / "shards").glob("*.tmp"), (out / "text").glob("*.tmp")):
        stray.unlink()

    pages = _numbered_pages(files, cfg.max_pages)
    import megatron.core.datasets.indexed_dataset  # noqa: F401  (once here, inherited by forked workers)

    # Everything loaded so far (torch, transformers, the tokenizer) lives as long as the run: frozen,
    # the collector stops walking it on every pass, Megatron's per-shard gc.collect() included.
    frozen_before = gc.get_freeze_count()
    gc.freeze()
    pool = None
    if workers > 1:  # fork: workers inherit the imports above instead of paying them again
        pool = ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("fork"),
            initializer=_init_worker, initargs=(str(out), cfg),
        )
    try:
        if pool is None:
            _init_worker(str(out), cfg)
        fitted = _fit(out, cfg, pages, pool, progress)
        markers = _run_shards(out, cfg, itertools.chain(fitted, pages), pool, workers, progress)
        manifest = _merge(out, cfg, run, markers, _token_dtype(len(tokenizer)))
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        if not frozen_before:  # let a long-lived caller (tests, the bench) collect this run's garbage
            gc.unfreeze()
    return manifest


def _numbered_pages(files: list[Path], max_pages: Optional[int]) -> Iterator[tuple[int, RawPage]]:
    numbered = enumerate(itertools.chain.from_iterable(iter_pages(f) for f in files))
    return itertools.islice(numbered, max_pages) if max_pages is not None else numbered


def _tokenizer_digest(tokenizer) -> str:
    state = tokenizer.backend_tokenizer.to_str()
    return hashlib.sha256(state.encode("utf-8")).hexdigest()


def _check_same_run(path: Path, run: dict) -> None:
    if path.is_file():
        previous = json.loads(path.read_text(encoding="utf-8"))
        if previous != run:
            differing = sorted(k for k in run if previous.get(k) != run[k])
            raise ValueError(
                f"{path.parent}: holds a run with different {', '.join(differing)}; "
                "use a new output folder (or delete this one) to change inputs, tokenizer or options"
            )
        return
    tmp = path.with_name(path.name + ".tmp")
    _write_json(tmp, run)
    os.replace(tmp, path)


def _fit(out: Path, cfg: PreprocessConfig, pages, pool, progress: bool) -> list[tuple[int, RawPage, Optional[CleanResult]]]:
    """Fit Punkt + IDF on the first ``fit_pages`` pages; returns those pages with their cleaned text."""
    punkt_file, idf_file = out / "punkt.json", out / "idf.json"
    if punkt_file.is_file() and idf_file.is_file():
        return []
    head = list(itertools.islice(pages, cfg.fit_pages))
    if not head:
        raise InputError("inputs hold no pages")
    from tqdm import tqdm

    # nltk (1.3 s of imports) is loaded here, not at module level: a run whose dataset is already built
    # checks the manifest and never splits a sentence
    from .sentences import load_punkt, save_punkt, train_punkt  # nltk: see above

    if pool is None:
        results = map(_clean_indexed, head)
    else:
        results = pool.map(_clean_indexed, head, chunksize=max(1, len(head) // 64))
    bar = tqdm(results, total=len(head), desc="fit Punkt+IDF", unit="page", disable=not progress)
    cleaned = list(bar)
    texts = [result.text for _, result in cleaned if result.skip is None]
    if cfg.punkt_path:
        params = load_punkt(cfg.punkt_path)
    else:
        if not texts:
            raise InputError(f"the first {len(head)} pages hold no article text to fit Punkt on")
        params = train_punkt(texts, cfg.punkt_chars)
    num_docs, df = document_frequencies(texts)
    idf_tmp = idf_file.with_name(idf_file.name + ".tmp")
    _write_json(idf_tmp, IdfTable(num_docs, dict(df)).to_json())
    os.replace(idf_tmp, idf_file)
    save_punkt(params, punkt_file)
    return [(index, page, result) for (index, page), (_, result) in zip(head, cleaned)]


def _shard_done(out: Path, shard: int) -> Optional[dict]:
    paths = _shard_paths(out, shard)
    try:
        marker = json.loads(paths["marker"].read_text(encoding="utf-8"))
        if all(paths[k].stat().st_size == size for k, size in marker["sizes"].items()):
            return marker
    except (OSError, ValueError, KeyError):
        pass
    return None


def _run_shards(out: Path, cfg: PreprocessConfig, items, pool, workers: int, progress: bool) -> list[dict]:
    from tqdm import tqdm

    kill_after = int(os.environ.get(KILL_AFTER_SHARDS_ENV, "0") or 0)
    markers: dict[int, dict] = {}
    pending: list[tuple[int, object]] = []
    completed_now = 0
    bar = tqdm(unit="page", desc="preprocess", disable=not progress, dynamic_ncols=True)

    def finished(shard: int, marker: dict) -> None:
        nonlocal completed_now
        markers[shard] = marker
        completed_now += 1
        if kill_after and completed_now >= kill_after:
            os.kill(os.getpid(), signal.SIGKILL)  # fault injection: an abrupt kill mid-run

    def collect(block: bool) -> None:
        while pending and (block or pending[0][1].done()):
            shard, future = pending.pop(0)
            finished(shard, future.result())

    def dispatch(shard: int, batch: list) -> None:
        done = _shard_done(out, shard)
        if done is not None:  # completed by an earlier, interrupted run
            markers[shard] = done
        elif pool is None:
            finished(shard, process_shard(shard, batch))
        else:
            pending.append((shard, pool.submit(process_shard, shard, batch)))
            while len(pending) >= 2 * workers:  # bounded memory: at most 2 shards per worker in flight
                pending[0][1].result()
                collect(block=False)
        bar.set_postfix(shards=len(markers))

    batch: list = []
    shard = 0
    for item in items:
        index, page = item[0], item[1]
        cleaned = item[2] if len(item) == 3 else None
        if index // cfg.pages_per_shard != shard:
            dispatch(shard, batch)
            batch, shard = [], index // cfg.pages_per_shard
        batch.append((index, page, cleaned))
        bar.update(1)
    if batch:
        dispatch(shard, batch)
    collect(block=True)
    bar.close()
    return [markers[k] for k in sorted(markers)]


def _merge(out: Path, cfg: PreprocessConfig, run: dict, markers: list[dict], dtype) -> dict:
    """Concatenate shards into ``passages``/``words`` IndexedDatasets, write the manifest, tidy up."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    totals: dict = {"pages_read": 0, "skipped": {}, "articles": 0, "broken_markup_lines": 0,
                    "sentences_over_budget": 0, "short_passages_dropped": 0,
                    "passages": 0, "tokens": 0, "words": 0, "candidates": 0}
    for name, builder_dtype in (("passages", dtype), ("words", np.int32)):
        tmp_bin, tmp_idx = out / f"{name}.bin.tmp", out / f"{name}.idx.tmp"
        builder = IndexedDatasetBuilder(str(tmp_bin), dtype=builder_dtype)
        for marker in markers:
            if marker["counts"]["passages"]:
                paths = _shard_paths(out, marker["shard"])
                prefix = str(paths["tokens_bin" if name == "passages" else "words_bin"])[: -len(".bin")]
                builder.add_index(prefix)
        builder.finalize(str(tmp_idx))
        os.replace(tmp_bin, out / f"{name}.bin")
        os.replace(tmp_idx, out / f"{name}.idx")
    shards, first = [], 0
    for marker in markers:
        counts = marker["counts"]
        for key, value in counts.items():
            if key == "skipped":
                for reason, n in value.items():
                    totals["skipped"][reason] = totals["skipped"].get(reason, 0) + n
            else:
                totals[key] = totals.get(key, 0) + value
        path = _shard_paths(out, marker["shard"])["text"]
        shards.append({"file": f"text/{path.name}", "first_passage": first,
                       "passages": counts["passages"], "bytes": marker["sizes"]["text"]})
        first += counts["passages"]
    totals["skipped"] = dict(sorted(totals["skipped"].items()))
    totals["pages_skipped"] = sum(totals["skipped"].values())
    keys = np.asarray([k for m in markers for k in m["split_keys"]], dtype=np.float64)
    with open(out / "split_keys.npy.tmp", "wb") as f:
        np.save(f, keys)
    os.replace(out / "split_keys.npy.tmp", out / "split_keys.npy")
    manifest = {
        **run,
        "counts": totals,
        "files": {
            "passages": "passages",  # IndexedDataset prefix: token ids, one document per passage
            "words": "words",  # IndexedDataset prefix: int32 word table, NUM_WORD_FIELDS per word
            "word_fields": NUM_WORD_FIELDS,
            "split_keys": "split_keys.npy",
            "tokenizer": "tokenizer",
            "punkt": "punkt.json",
            "idf": "idf.json",
        },
        "shards": shards,
    }
    tmp = out / "manifest.json.tmp"
    _write_json(tmp, manifest)
    os.replace(tmp, out / "manifest.json")
    shutil.rmtree(out / "shards", ignore_errors=True)  # merged; the text shards stay
    return manifest


def _write_json(path: Path, payload) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=1, sort_keys=True, ensure_ascii=False)
        f.write("\n")


# -------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = PreprocessConfig()
    parser.add_argument("inputs", nargs="+", help=".xml/.xml.bz2 dumps, HF parquet/arrow files, JSONL, or folders")
    parser.add_argument("--out", required=True, help="output folder (created; rerun to resume)")
    parser.add_argument("--tokenizer", required=True, help="local Hugging Face tokenizer folder")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--passage-tokens", type=int, default=d.passage_tokens)
    parser.add_argument("--max-passage-tokens", type=int, default=d.max_passage_tokens)
    parser.add_argument("--min-passage-tokens", type=int, default=d.min_passage_tokens)
    parser.add_argument("--max-span-words", type=int, default=d.max_span_words)
    parser.add_argument("--pages-per-shard", type=int, default=d.pages_per_shard)
    parser.add_argument("--fit-pages", type=int, default=d.fit_pages)
    parser.add_argument("--punkt-chars", type=int, default=d.punkt_chars)
    parser.add_argument("--punkt", dest="punkt_path", default=None, help="Punkt parameters JSON to load instead of training")
    parser.add_argument("--max-pages", type=int, default=None)
    parser.add_argument("--no-progress", action="store_true")


def run_from_args(args: argparse.Namespace) -> int:
    options = {k: getattr(args, k) for k in PreprocessConfig.__dataclass_fields__}
    try:
        manifest = preprocess(
            args.inputs, args.out, args.tokenizer, workers=args.workers,
            progress=not args.no_progress, **options,
        )
    except (ValueError, FileNotFoundError) as err:  # the inputs, the tokenizer, the output folder
        if isinstance(err, PzError):
            raise
        raise InputError(str(err)) from err
    print(json.dumps(manifest["counts"], indent=1))
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="preprocess_wiki", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return guarded("preprocess", run_from_args, parser.parse_args(argv))
