"""In-run evaluation on held-out passages, with the run's own rollout engine (greedy).

- mask accuracy: the predictor task on fixed (seeded) random span candidates, and on fixed random
  single words (any valid mask), the same items at every evaluation, so before and after RL compare;
- generator valid-mask rate: does the generator's ``\\mask{}`` parse and pass validation.
Each data-parallel rank evaluates its slice; the counts are summed over ranks.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from megatron_pz.eval.records import heldout_records, summary_metrics
from megatron_pz.eval.mask_accuracy import build_mask_items, mask_prediction_accuracy
from megatron_pz.objectives.base import encode
from megatron_pz.objectives.pretrainzero import build_generator_prompt, parse_mask, validate_mask
from megatron_pz.rollout.base import SamplingParams


def _greedy(engine, tokenizer, max_new_tokens: int, stop: list, chat_template: bool = False):
    def generate(prompts: list[str]) -> list[str]:
        ids = [encode(tokenizer, p, chat_template) for p in prompts]
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, stop=list(stop), n=1, seed=0)
        return [group[0].text for group in engine.generate(ids, params)]

    return generate


def build_eval_items(heldout, cfg) -> dict[str, list]:
    """The fixed, seeded held-out mask items of each kind (``cfg``: the RunConfig); built once per run."""
    t, o = cfg.train, cfg.objective
    return {source: build_mask_items(heldout, spans_per_passage=1, max_passages=t.eval_passages, seed=o.seed,
                                     spans=source, rules=o)[0]
            for source in ("candidates", "words")}


def _rollout_phase(rollout):
    """One rollout phase of a :class:`~megatron_pz.rollout.phase.RolloutPhases` (wake, sync, ..., sleep);
    a bare engine (tests) is used as it is."""
    if hasattr(rollout, "generating"):
        return rollout.generating()
    return contextlib.nullcontext(rollout)


def evaluate(rollout, tokenizer, heldout, items: dict[str, list], cfg, dp_rank: int, dp_size: int, scorer=None
             ) -> tuple[dict[str, float], list[dict]]:
    """``rollout``: the run's :class:`~megatron_pz.rollout.phase.RolloutPhases` (or a bare engine);
    ``cfg`` is the RunConfig, ``items`` from :func:`build_eval_items`; returns (eval/* metrics
    identical on every rank, this rank's samples). All generation happens in one rollout phase, which
    ends before the counts are summed over ranks.

    ``eval/mask_accuracy`` masks the preprocessor's span candidates (content words: the hard task);
    ``eval/word_mask_accuracy`` masks any single word the run's validity rules accept (function
    words included unless ``content_words_only``: what the generator may legally pick).
    """
    with _rollout_phase(rollout) as engine:
        totals, samples = generate_eval(engine, tokenizer, heldout, items, cfg, dp_rank, dp_size)
        # the figures of the `eval:` section (NLL, RLP information gain, generator reward), per item
        records = heldout_records(engine, scorer, tokenizer, heldout, cfg, samples, dp_rank, dp_size)
    totals = torch.tensor(totals, dtype=torch.float64)
    if dist.is_initialized():
        from megatron.core import parallel_state as ps

        totals /= ps.get_tensor_model_parallel_world_size() * ps.get_pipeline_model_parallel_world_size() \
            * ps.get_context_parallel_world_size()
        dist.all_reduce(totals)
        if ps.get_data_parallel_world_size() > 1:  # every item's record, for the intervals
            gathered: list = [None] * ps.get_data_parallel_world_size()
            dist.all_gather_object(gathered, records, group=ps.get_data_parallel_group())
            records = [r for part in gathered for r in part]
    return {**eval_metrics(totals.tolist()), **summary_metrics(records)}, samples + records


def eval_metrics(totals: list[float]) -> dict[str, float]:
    """eval/* metrics from the counts of :func:`generate_eval` summed over every slice of the items."""
    # a rate over no items is not 0: it is left out (the CLI prints n/a), the counts are kept
    metrics = {"eval/num_spans": totals[1], "eval/num_words": totals[3]}
    for name, (hits, count) in {"eval/mask_accuracy": totals[0:2], "eval/word_mask_accuracy": totals[2:4],
                                "eval/generator_valid_mask_rate": totals[4:6]}.items():
        if count > 0:
            metrics[name] = hits / count
    return metrics


def generate_eval(engine, tokenizer, heldout, items, cfg, dp_rank: int, dp_size: int) -> tuple[list[float], list[dict]]:
    """Greedy answers of slice ``dp_rank`` of ``dp_size`` of the eval items: (counts, samples); the counts
    are [span hits, spans, word hits, words, valid masks, generator passages]."""
    t, o = cfg.train, cfg.objective
    generate_answer = _greedy(engine, tokenizer, t.eval_max_new_tokens, o.predictor_stop, o.chat_template)
    totals, samples = [], []
    for source in ("candidates", "words"):
        mine = items[source][dp_rank::dp_size]
        correct = 0.0
        if mine:
            result = mask_prediction_accuracy(mine, generate_answer, normalize=o.normalize_answer,
                                              batch=max(1, len(mine)))
            correct = result["accuracy"] * result["num_spans"]
            samples += [{"eval": source, **sample} for sample in result["samples"]]
        totals += [correct, float(len(mine))]
    passages = [heldout[i] for i in range(min(t.eval_passages, len(heldout)))][dp_rank::dp_size]
    valid = 0.0
    if passages:
        texts = _greedy(engine, tokenizer, t.eval_max_new_tokens, o.generator_stop, o.chat_template)(
            [build_generator_prompt(p.text, o.prompt_style) for p in passages])
        verdicts = [validate_mask(p.text, parse_mask(x, o.mask_pick), o)[1] for p, x in zip(passages, texts)]
        valid = float(sum(v == "ok" for v in verdicts))
        samples += [{"eval": "generator", "passage": p.index, "response": x, "verdict": v}
                    for p, x, v in zip(passages, texts, verdicts)]
    return totals + [valid, float(len(passages))], samples
