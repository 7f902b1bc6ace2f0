"""The Wikipedia pipeline on real Wikipedia (the enwiki excerpt shipped in the gensim wheel).

Known facts of that excerpt (counted with bzcat | grep): 206 <page> elements, 100 of them redirects
(one of those in namespace 4), 5 titled "... (disambiguation)", hence 101 articles.
"""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from data_fixtures import WIKI_OPTIONS, wiki_dump, wiki_out, wiki_tokenizer  # noqa: F401

from megatron_pz.data.dataset import DatasetFormatError, PassageDataset
from megatron_pz.data.preprocess import KILL_AFTER_SHARDS_ENV, preprocess
from megatron_pz.data.spans import STOPWORDS, WORD_RE
from megatron_pz.data.tokenizer import EOS_TOKEN, load_tokenizer

REPO = Path(__file__).resolve().parents[1]


def _tree_files(root: Path) -> dict[str, Path]:
    return {str(p.relative_to(root)): p for p in sorted(root.rglob("*")) if p.is_file()}


def _assert_identical_trees(a: Path, b: Path) -> None:
    files_a, files_b = _tree_files(a), _tree_files(b)
    assert sorted(files_a) == sorted(files_b)
    different = [name for name in files_a if not filecmp.cmp(files_a[name], files_b[name], shallow=False)]
    assert different == []


def test_counts_and_skips(wiki_out):
    out, manifest = wiki_out
    counts = manifest["counts"]
    assert counts["pages_read"] == 206
    assert counts["skipped"] == {"redirect": 100, "disambiguation": 5}
    assert counts["pages_skipped"] == 105
    assert counts["articles"] == 101
    ds = PassageDataset(out)
    assert len(ds) == counts["passages"] == len(ds.tokens) == len(ds.words)
    assert counts["tokens"] == int(ds.tokens.sequence_lengths.sum())
    assert counts["candidates"] == sum(len(ds.candidate_arrays(d)["idf"]) for d in range(len(ds)))
    titles = {ds.record(d)["title"] for d in range(len(ds))}
    assert len(titles) == 101
    assert "AccessibleComputing" not in titles  # the first page of the dump, a redirect
    assert not any(t.endswith("(disambiguation)") for t in titles)
    assert len(manifest["inputs"]) == 1 and len(manifest["inputs"][0]["sha256"]) == 64
    assert manifest["tokenizer"]["vocab_size"] == 2048


def test_anarchism_is_clean_prose(wiki_out):
    out, _ = wiki_out
    ds = PassageDataset(out)
    anarchism = [ds[i] for i in range(len(ds)) if ds.record(i)["title"] == "Anarchism"]
    assert len(anarchism) > 5
    assert [p.part for p in anarchism] == list(range(len(anarchism)))
    assert anarchism[0].text.startswith(
        "Anarchism is a political philosophy that advocates self-governed societies based on "
        "voluntary institutions. These are often described as stateless societies, although"
    )
    body = "\n".join(p.text for p in anarchism)
    for markup in ("{{", "}}", "[[", "]]", "<ref", "</ref>", "'''", "&nbsp;", "Category:", "thumb|"):
        assert markup not in body
    # the first <ref> body, a "Further reading" entry and an "External links" entry are all gone
    assert "a social philosophy that rejects authoritarian government" not in body
    assert "People Without Government" not in body
    assert "An Anarchist FAQ Webpage" not in body
    assert "Pierre-Joseph Proudhon" in body  # link text kept ([[Pierre-Joseph Proudhon]])


def test_passages_fit_budget_and_decode(wiki_out):
    out, _ = wiki_out
    ds = PassageDataset(out)
    tok = load_tokenizer(ds.tokenizer_dir)
    lengths = ds.tokens.sequence_lengths
    assert lengths.max() <= WIKI_OPTIONS["max_passage_tokens"]
    assert lengths.min() >= WIKI_OPTIONS["min_passage_tokens"]
    assert np.median(lengths) > 0.6 * WIKI_OPTIONS["passage_tokens"]
    for i in range(len(ds)):
        rec = ds.record(i)
        assert tok.decode(np.asarray(ds.tokens[i]).tolist()).strip() == rec["text"]


def test_every_candidate_decodes_to_its_text(wiki_out):
    out, manifest = wiki_out
    ds = PassageDataset(out)
    tok = load_tokenizer(ds.tokenizer_dir)
    k = manifest["options"]["max_span_words"]
    checked = 0
    aligned_words = total_words = 0
    for i in range(0, len(ds), 5):  # every 5th passage, all of its candidates (~1/3 M decodes)
        p = ds[i]
        ids = p.token_ids.tolist()
        table = ds.word_table(p.index)
        total_words += len(table)
        aligned_words += int(((table[:, 2] >= 0) & (table[:, 3] >= 0)).sum())
        seen = set()
        for c in p.candidates:
            assert p.text[c.char_start : c.char_end] == c.text
            assert tok.decode(ids[c.token_start : c.token_end]).lstrip() == c.text
            words = [w.lower() for w in WORD_RE.findall(c.text)]
            assert len(words) == c.num_words and 1 <= c.num_words <= k
            assert not all(w in STOPWORDS for w in words)
            assert c.idf > 0
            seen.add((c.char_start, c.char_end))
            checked += 1
        assert len(seen) == len(p.candidates)
    assert checked > 100_000
    assert aligned_words / total_words > 0.99


def test_span_length_limits_filter_candidates(wiki_out):
    out, _ = wiki_out
    full, short = PassageDataset(out), PassageDataset(out, max_span_words=2, max_span_tokens=1)
    for i in range(0, len(full), 50):
        everything = {(c.char_start, c.char_end): c for c in full[i].candidates}
        kept = short[i].candidates
        # exactly the candidates of <= 2 words spelled by a single token
        assert {(c.char_start, c.char_end) for c in kept} == {
            key for key, c in everything.items() if c.num_words <= 2 and c.token_end - c.token_start == 1}
        assert all(c.token_end - c.token_start == 1 for c in kept)
    assert any(short[i].candidates for i in range(0, len(short), 50))


def test_candidates_do_not_cross_sentences(wiki_out):
    out, _ = wiki_out
    ds = PassageDataset(out)
    p = next(ds[i] for i in range(len(ds)) if ds.record(i)["title"] == "Anarchism")
    # "...voluntary institutions. These are..." : a sentence boundary sits between the two words
    boundary = p.text.index("institutions. These") + len("institutions.")
    crossing = [c for c in p.candidates if c.char_start < boundary < c.char_end]
    assert crossing == []
    assert any(c.text == "voluntary institutions" for c in p.candidates)
    assert any(c.text == "These are often described" for c in p.candidates)
    # all-stopword spans are excluded, mixed ones kept
    assert not any(c.text in ("These are", "is a", "the") for c in p.candidates)


def test_heldout_split_is_by_article(wiki_out):
    out, _ = wiki_out
    train = PassageDataset(out, split="train", heldout_fraction=0.2)
    held = PassageDataset(out, split="heldout", heldout_fraction=0.2)
    everything = PassageDataset(out)
    assert len(train) + len(held) == len(everything)
    assert len(held) > 0 and len(train) > len(held)
    train_titles = {train[i].title for i in range(len(train))}
    held_titles = {held[i].title for i in range(len(held))}
    assert train_titles.isdisjoint(held_titles)
    assert 5 <= len(held_titles) <= 40  # ~20% of 101 articles
    again = PassageDataset(out, split="heldout", heldout_fraction=0.2)
    assert [again.document_index(i) for i in range(len(again))] == [
        held.document_index(i) for i in range(len(held))
    ]


def test_two_workers_byte_identical(tmp_path, wiki_dump, wiki_tokenizer, wiki_out):
    out1, _ = wiki_out
    out2 = tmp_path / "n2"
    preprocess([wiki_dump], out2, wiki_tokenizer, workers=2, progress=False, **WIKI_OPTIONS)
    _assert_identical_trees(out1, out2)


def test_kill_and_resume_equals_one_run(tmp_path, wiki_dump, wiki_tokenizer, wiki_out):
    out1, _ = wiki_out
    out = tmp_path / "resumed"
    args = [
        sys.executable, str(REPO / "tools" / "preprocess_wiki.py"), str(wiki_dump), "--out", str(out),
        "--tokenizer", str(wiki_tokenizer), "--no-progress",
        "--pages-per-shard", str(WIKI_OPTIONS["pages_per_shard"]),
        "--fit-pages", str(WIKI_OPTIONS["fit_pages"]),
        "--passage-tokens", str(WIKI_OPTIONS["passage_tokens"]),
        "--max-passage-tokens", str(WIKI_OPTIONS["max_passage_tokens"]),
        "--min-passage-tokens", str(WIKI_OPTIONS["min_passage_tokens"]),
    ]
    env = dict(os.environ, **{KILL_AFTER_SHARDS_ENV: "2"})
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]  # SIGKILLed after two shards
    assert not (out / "manifest.json").exists()
    markers = sorted(p.name for p in (out / "shards").glob("*.json"))
    assert markers == ["shard-000000.json", "shard-000001.json"]
    with pytest.raises(DatasetFormatError, match="manifest.json"):
        PassageDataset(out)
    kept = (out / "text" / "shard-000000.jsonl").stat().st_mtime_ns
    (out / "text" / "shard-000002.jsonl.tmp").write_text('{"half": ')  # a half-written shard
    preprocess([wiki_dump], out, wiki_tokenizer, workers=1, progress=False, **WIKI_OPTIONS)
    assert (out / "text" / "shard-000000.jsonl").stat().st_mtime_ns == kept  # not redone
    _assert_identical_trees(out1, out)


def test_rerun_with_other_options_is_refused(tmp_path, wiki_dump, wiki_tokenizer, wiki_out):
    out, _ = wiki_out
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    with pytest.raises(ValueError, match="options"):
        preprocess([wiki_dump], copy, wiki_tokenizer, progress=False, **{**WIKI_OPTIONS, "max_span_words": 3})
    # same options: returns the finished manifest without redoing anything
    again = preprocess([wiki_dump], copy, wiki_tokenizer, progress=False, **WIKI_OPTIONS)
    assert again == json.loads((copy / "manifest.json").read_text())


def test_damaged_text_shard_is_refused(tmp_path, wiki_out):
    out, manifest = wiki_out
    copy = tmp_path / "damaged"
    shutil.copytree(out, copy)
    shard = copy / manifest["shards"][1]["file"]
    lines = shard.read_bytes().splitlines(keepends=True)
    shard.write_bytes(b"".join(lines[:-1]))
    with pytest.raises(DatasetFormatError, match=str(shard)):
        PassageDataset(copy)
    # same size, but a line break removed: the line count no longer matches the .idx
    data = b"".join(lines)
    cut = data.index(b"\n")
    shard.write_bytes(data[:cut] + b" " + data[cut + 1 :])
    with pytest.raises(DatasetFormatError, match=rf"{shard}.*{len(lines) - 1} complete lines"):
        PassageDataset(copy)


def test_tokenizer_folder_loads_with_transformers(wiki_tokenizer):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(wiki_tokenizer))
    assert tok.eos_token == EOS_TOKEN and tok.pad_token == EOS_TOKEN
    assert len(tok) == 2048
    text = "Anarchism is a political philosophy."
    assert tok.decode(tok(text)["input_ids"]) == text
