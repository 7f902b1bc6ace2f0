"""Punkt without nltk's regex timeout wrapper learns and splits exactly as stock nltk does."""

from __future__ import annotations

from data_fixtures import wiki_dump  # noqa: F401
from nltk.tokenize.punkt import PunktSentenceTokenizer, PunktTrainer

from megatron_pz.data import sentences
from megatron_pz.data.clean import clean_page
from megatron_pz.data.sources import iter_pages


def _params_key(params):
    return (sorted(params.abbrev_types), sorted(params.collocations), sorted(params.sent_starters),
            sorted(params.ortho_context.items()))


def test_same_parameters_and_spans_as_stock_nltk(wiki_dump, monkeypatch):
    texts = [r.text for r in map(clean_page, iter_pages(wiki_dump)) if r.skip is None][:40]
    params = sentences.train_punkt(texts, 300_000)
    stock = PunktTrainer()
    seen = 0
    for text in texts:
        chunk = text[: 300_000 - seen]
        if not chunk:
            break
        stock.train(chunk, finalize=False)
        seen += len(chunk)
    stock.finalize_training()
    assert _params_key(params) == _params_key(stock.get_params())

    splitter = sentences.SentenceSplitter(params)
    got = [splitter.spans(text) for text in texts]
    splitter._punkt = PunktSentenceTokenizer(params)  # stock tokenizer, same line handling
    assert got == [splitter.spans(text) for text in texts]
    monkeypatch.setattr(sentences, "UNTIMED_MAX_CHARS", 10)  # every line through the timed path
    assert got == [sentences.SentenceSplitter(params).spans(text) for text in texts]
