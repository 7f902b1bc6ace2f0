"""Bad and alternative inputs of the Wikipedia pipeline, plus hand-checked units (cleaning, spans)."""

from __future__ import annotations

import bz2
import json

import numpy as np
import pytest
from data_fixtures import wiki_dump, wiki_tokenizer  # noqa: F401

from megatron_pz.data.clean import clean_page, drop_reference_sections
from megatron_pz.data.dataset import PassageDataset
from megatron_pz.data.preprocess import preprocess
from megatron_pz.data.sample import GENSIM_WIKI_SAMPLE, gensim_wiki_sample
from megatron_pz.data.sources import InputError, RawPage, iter_pages
from megatron_pz.data.passages import PassageBudget, cut_passages
from megatron_pz.data.spans import (
    NUM_WORD_FIELDS,
    STOPWORDS,
    WORD_RE,
    IdfTable,
    candidate_arrays,
    count_candidates,
    word_keys,
)

HEADER = '<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">\n'


def _page(title: str, text: str, ns: int = 0, redirect: str | None = None) -> str:
    red = f'<redirect title="{redirect}" />' if redirect else ""
    return (
        f"<page><title>{title}</title><ns>{ns}</ns><id>1</id>{red}"
        f"<revision><text>{text}</text></revision></page>\n"
    )


PROSE = (
    "The quick brown fox lives in the forest near the river. It hunts small animals at night. "
    "Foxes are found on every continent except Antarctica. The red fox is the largest of the true "
    "foxes. Its diet includes rodents, rabbits and birds. "
)


def test_gensim_sample_located():
    path = gensim_wiki_sample()
    assert path.name == GENSIM_WIKI_SAMPLE and path.stat().st_size > 1_000_000


def test_truncated_bz2_names_file_and_position(tmp_path, wiki_dump):
    broken = tmp_path / "truncated.xml.bz2"
    broken.write_bytes(wiki_dump.read_bytes()[:400_000])
    with pytest.raises(InputError, match=r"truncated\.xml\.bz2: compressed stream is truncated .*after \d+ complete pages"):
        for _ in iter_pages(broken):
            pass


def test_multistream_bz2_reads_every_stream(tmp_path):
    one = HEADER + _page("A", PROSE)
    two = _page("B", PROSE) + "</mediawiki>\n"
    path = tmp_path / "multi.xml.bz2"
    path.write_bytes(bz2.compress(one.encode()) + bz2.compress(two.encode()))
    assert [p.title for p in iter_pages(path)] == ["A", "B"]


def test_malformed_xml_names_line_and_column(tmp_path):
    path = tmp_path / "bad.xml"
    path.write_text(HEADER + _page("A", PROSE) + "<page><title>B</titel></page>\n</mediawiki>\n")
    with pytest.raises(InputError, match=r"bad\.xml: malformed XML at line 3, column \d+ \(after 1 complete pages\)"):
        list(iter_pages(path))


def test_non_utf8_byte_names_line(tmp_path):
    path = tmp_path / "latin1.xml"
    body = (HEADER + _page("A", PROSE)).encode() + b"<page><title>Caf\xe9</title></page>\n</mediawiki>\n"
    path.write_bytes(body)
    with pytest.raises(InputError, match=r"latin1\.xml: malformed XML at line 3, column"):
        list(iter_pages(path))


def test_empty_dumps(tmp_path):
    empty = tmp_path / "empty.xml"
    empty.write_bytes(b"")
    with pytest.raises(InputError, match=r"empty\.xml: malformed XML at line 1, column 0"):
        list(iter_pages(empty))
    no_pages = tmp_path / "nopages.xml.bz2"
    no_pages.write_bytes(bz2.compress((HEADER + "</mediawiki>\n").encode()))
    with pytest.raises(InputError, match=r"nopages\.xml\.bz2: XML dump holds no <page> elements"):
        list(iter_pages(no_pages))
    not_wiki = tmp_path / "other.xml"
    not_wiki.write_text("<html><body/></html>")
    with pytest.raises(InputError, match=r"other\.xml: root element is <html>"):
        list(iter_pages(not_wiki))


def test_jsonl_errors_name_the_line(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_bytes(b'{"text": "fine"}\n{"text": 3}\n')
    with pytest.raises(InputError, match=r"docs\.jsonl:line 2: expected an object with a string field 'text'"):
        list(iter_pages(path))
    path.write_bytes(b'{"text": "fine"}\n\n{"text": "caf\xe9"}\n')
    with pytest.raises(InputError, match=r"docs\.jsonl:line 3: not valid UTF-8"):
        list(iter_pages(path))
    path.write_bytes(b'{"text": "fine"}\n{"text": \n')
    with pytest.raises(InputError, match=r"docs\.jsonl:line 2, column \d+: not valid JSON"):
        list(iter_pages(path))


def test_cleaning_by_hand():
    wikitext = (
        "'''Foo''' is a [[bar (thing)|bar]] in [[Baz]].<ref>{{cite web|title=Hidden}}</ref> "
        "{{Infobox thing|name=Foo}}It has a {{convert|3|km}} tail.<!-- note -->\n"
        "[[File:Foo.jpg|thumb|A caption]]\n"
        "{| class=wikitable\n| cell text\n|}\n"
        "== History ==\nFoo was found in 1900.\n"
        "== References ==\n* Smith, ''A book''.\n=== Sub ===\nstill references\n"
        "== Legacy ==\nFoo lives on.\n[[Category:Things]]\n[[de:Foo]]"
    )
    result = clean_page(RawPage("Foo", wikitext))
    assert result.skip is None
    assert result.text == "Foo is a bar in Baz. It has a tail.\nFoo was found in 1900.\nFoo lives on."
    assert drop_reference_sections("a\n==See also==\nx\n==B==\nb") == "a\n==B==\nb"


def test_skip_reasons_by_hand():
    assert clean_page(RawPage("A", "#REDIRECT [[B]]")).skip == "redirect"
    assert clean_page(RawPage("A", PROSE, redirect=True)).skip == "redirect"
    assert clean_page(RawPage("Talk:A", PROSE, ns=1)).skip == "non_article_namespace"
    assert clean_page(RawPage("A (disambiguation)", PROSE)).skip == "disambiguation"
    assert clean_page(RawPage("A", "'''A''' may mean:\n* x\n{{disambiguation}}")).skip == "disambiguation"
    assert clean_page(RawPage("A", "   ")).skip == "empty_page"
    assert clean_page(RawPage("A", "{{Infobox only|x=1}}")).skip == "empty_after_cleaning"


def test_broken_markup_page_is_counted_not_passed_on(tmp_path, wiki_tokenizer):
    broken = "{{Infobox fox |name = Fox [[File:Fox.jpg|thumb| and never closed\n" + PROSE
    dump = tmp_path / "dump.xml"
    dump.write_text(
        HEADER
        + _page("Fox", PROSE * 3)
        + _page("Broken", broken)
        + _page("Only markup", "{{Infobox [[never closed")
        + _page("Talk:Fox", PROSE, ns=1)
        + _page("Fox (disambiguation)", PROSE)
        + _page("Foxes", "", redirect="Fox")
        + "</mediawiki>\n"
    )
    manifest = preprocess([dump], tmp_path / "out", wiki_tokenizer, progress=False, min_passage_tokens=8)
    counts = manifest["counts"]
    assert counts["pages_read"] == 6
    assert counts["skipped"] == {
        "disambiguation": 1, "empty_after_cleaning": 1, "non_article_namespace": 1, "redirect": 1
    }
    assert counts["broken_markup_lines"] == 2
    ds = PassageDataset(tmp_path / "out")
    texts = {ds[i].title: ds[i].text for i in range(len(ds))}
    assert sorted(texts) == ["Broken", "Fox"]
    assert texts["Broken"] == PROSE.strip()  # the unclosed template line is dropped, prose kept


def test_parquet_arrow_and_jsonl_give_the_same_passages(tmp_path, wiki_tokenizer):
    import datasets

    rows = [{"id": str(i), "url": "", "title": f"Fox {i}", "text": PROSE * (i + 1)} for i in range(6)]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "wiki.parquet"))
    with open(tmp_path / "wiki.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps({"title": row["title"], "text": row["text"]}) + "\n")
    opts = dict(progress=False, passage_tokens=200, min_passage_tokens=8)
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    (arrow,) = (tmp_path / "saved").glob("*.arrow")
    a = preprocess([tmp_path / "wiki.parquet"], tmp_path / "a", wiki_tokenizer, **opts)
    b = preprocess([tmp_path / "wiki.jsonl"], tmp_path / "b", wiki_tokenizer, **opts)
    c = preprocess([arrow], tmp_path / "c", wiki_tokenizer, **opts)
    assert a["counts"] == b["counts"] == c["counts"] and a["counts"]["articles"] == 6
    for other in ("b", "c"):
        assert (tmp_path / other / "passages.bin").read_bytes() == (tmp_path / "a" / "passages.bin").read_bytes()
    ds = PassageDataset(tmp_path / "a")
    assert ds[0].title == "Fox 0" and ds[0].text == PROSE.strip()
    assert len(ds) > 6  # the longer articles were cut into several passages


def test_candidates_by_hand():
    # words: "Paris"(content) "is"(stop) "the"(stop) "capital"(content) | "It"(stop) "grew"(content)
    # fields: char_start, char_end, token_start, token_end, sentence, stop, idf_milli
    words = np.array(
        [
            [0, 5, 0, 1, 0, 0, 3000],
            [6, 8, 1, 2, 0, 1, 1000],
            [9, 12, 2, 3, 0, 1, 1000],
            [13, 20, 3, -1, 0, 0, 2000],  # its end is not a token boundary: cannot end a span
            [22, 24, 5, 6, 1, 1, 1500],
            [25, 29, 6, 7, 1, 0, 4000],
        ],
        dtype=np.int32,
    )
    got = candidate_arrays(words, max_span_words=3)
    spans = list(zip(got["first"].tolist(), got["last"].tolist()))
    assert spans == [(0, 0), (0, 1), (0, 2), (4, 5), (5, 5)]
    assert got["num_words"].tolist() == [1, 2, 3, 2, 1]
    assert got["idf"].tolist() == [3.0, 3.0, 3.0, 4.0, 4.0]
    assert count_candidates(words, 3) == 5
    # two passages stacked (one count per article): no span crosses from one to the other
    stacked = np.concatenate([words, words])
    assert count_candidates(stacked, 3, np.repeat([0, 1], len(words))) == 10


def test_word_keys_lower_each_word_alone():
    text = "ΟΔΟΣ ΣΑΣ's İstanbul U.S. don't Pierre-Joseph ΑΣ\u0301Β"
    assert word_keys(text) == [m.group(0).lower() for m in WORD_RE.finditer(text)]
    assert word_keys("... !") == []


def _reference_table(text, p0, p1, sentences, token_ids, idf):
    """A passage's word table by brute force (one token per character: token i covers text[i])."""
    rows = []
    starts = [s - p0 for s, _ in sentences if p0 <= s < p1]
    tokens = [t - p0 for t in token_ids.tolist()]
    for m in WORD_RE.finditer(text[p0:p1]):
        s, e = m.span()
        key = m.group(0).lower()
        token_start = next((i for i, t in enumerate(tokens) if t == s and not text[p0 + t].isspace()), -1)
        token_end = max((i + 1 for i, t in enumerate(tokens) if t + 1 == e), default=-1)
        sentence = sum(1 for start in starts if start <= s) - 1
        rows.append([s, e, token_start, token_end, sentence, key in STOPWORDS, idf.milli(key)])
    return np.array(rows, dtype=np.int32).reshape(-1, NUM_WORD_FIELDS)


@pytest.mark.parametrize("target", [1, 6, 12, 40])
def test_word_tables_match_brute_force(target):
    # sentences cut inside words ("beta.ga|mma") too: then a passage's words are its own text's
    text = "Alpha beta.gamma delta. Epsilon zeta-eta the theta. U.S. don't stop, ok?"
    sentences = [(0, 13), (13, 23), (24, 34), (34, 52), (53, 66), (67, 73)]
    offsets = [(i, i + 1) for i in range(len(text))]
    idf = IdfTable(num_docs=3, df={"alpha": 1, "the": 3, "theta": 2})
    cut = cut_passages(text, sentences, list(range(len(text))), offsets, PassageBudget(target, 100, 1), idf, {})
    assert cut
    for passage in cut:
        p0 = text.index(passage.text)
        expected = _reference_table(text, p0, p0 + len(passage.text), sentences, passage.token_ids, idf)
        np.testing.assert_array_equal(passage.words, expected)


def test_idf_by_hand():
    table = IdfTable(num_docs=3, df={"fox": 1, "the": 3})
    assert table.milli("fox") == round(1000 * (np.log(4 / 2) + 1))
    assert table.milli("the") == 1000
    assert table.milli("unseen") == round(1000 * (np.log(4) + 1))


def test_cli_registers_subcommands():
    from megatron_pz.cli import build_parser
    from megatron_pz.data import preprocess as pre
    from megatron_pz.data import train_tokenizer as tt

    parser = build_parser()
    args = parser.parse_args(["preprocess", "dump.xml.bz2", "--out", "o", "--tokenizer", "t", "--workers", "2"])
    assert args.func is pre.run_from_args and args.workers == 2 and args.max_span_words == 5
    args = parser.parse_args(["train-tokenizer", "dump.xml.bz2", "--out", "t", "--vocab-size", "512"])
    assert args.func is tt.run_from_args and args.vocab_size == 512


def test_punkt_loaded_from_disk(tmp_path, wiki_tokenizer):
    from megatron_pz.data.sentences import SentenceSplitter, load_punkt, save_punkt, train_punkt

    text = "Dr. Smith met Mr. Jones at 5 p.m. in the U.S. capital. They talked. " * 40
    params = train_punkt([text])
    save_punkt(params, tmp_path / "punkt.json")
    loaded = load_punkt(tmp_path / "punkt.json")
    assert loaded.abbrev_types == params.abbrev_types and "dr" in loaded.abbrev_types
    line = "Dr. Smith met Mr. Jones. They talked."
    assert [line[s:e] for s, e in SentenceSplitter(loaded).spans(line)] == [
        "Dr. Smith met Mr. Jones.", "They talked."
    ]
    (tmp_path / "docs.jsonl").write_text(json.dumps({"title": "Fox", "text": PROSE * 2}) + "\n")
    preprocess([tmp_path / "docs.jsonl"], tmp_path / "out", wiki_tokenizer, progress=False,
               punkt_path=str(tmp_path / "punkt.json"), min_passage_tokens=8)
    assert (tmp_path / "out" / "punkt.json").read_bytes() == (tmp_path / "punkt.json").read_bytes()
    with pytest.raises(ValueError, match="not a Punkt parameter file"):
        load_punkt(tmp_path / "docs.jsonl")
