"""Wikipedia data pipeline: dumps -> cleaned passages (Megatron IndexedDataset) + span candidates.

Modules, one job each: ``sources`` (stream pages from XML/parquet/JSONL), ``clean`` (wiki markup ->
prose), ``sentences`` (Punkt), ``passages`` (token-budget packing), ``spans`` (words, candidates,
IDF), ``tokenizer`` (BPE training/loading), ``preprocess`` (parallel, resumable driver + CLI),
``dataset`` (``PassageDataset`` reader), ``sample`` (the gensim enwiki excerpt), ``default`` (the
embedded CPU default dataset), ``config`` (``DataConfig``). Import the submodules directly; this
package import stays light.
"""
