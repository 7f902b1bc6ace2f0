r"""Held-out figures that can see a change, per item, so that every figure gets a 95 % interval.

:mod:`megatron_pz.eval.heldout` scores the PretrainZero tasks greedily (predictor accuracy on masked
span candidates and on single words, generator valid-mask rate). This module adds what a run needs to
tell whether the method changed the model, and what it did not train:

* ``nll``: next-token negative log-likelihood of held-out passages, no thought, teacher forced (every
  objective: is language modelling intact?). Per passage: summed NLL and token count; the figure is
  NLL per token (ratio of sums), perplexity its exponential.
* ``info_gain`` (RLP's training signal, RLP eq. 5 with the evaluated model as its own no-think
  reference): at a fixed held-out position t of each passage, G thoughts sampled by the policy after
  ``x_<t <think>`` at RLP's temperature, closed with ``</think>`` when they hit their budget, then
  log p(x_t | x_<t, <think> c </think>) - log p(x_t | x_<t), averaged over the G thoughts. Also the
  share of thoughts that close by themselves.
* ``generator_reward`` (PretrainZero eq. 9 on held-out passages): the greedy generator mask of each
  passage (from the greedy evaluation) gets G sampled predictions; reward 1 - acc, 0 at acc 0, and
  ``invalid_mask_reward`` for an invalid mask.

Each is a list of JSON records (one per item, ``{"eval": kind, "passage": index, ...}``) appended to the
run's ``eval_samples.jsonl`` beside the greedy task records; :func:`item_values` reads any of those
records back as per-item values keyed by item, which :mod:`megatron_pz.eval.intervals` turns into
intervals and paired before/after differences. The items are fixed by the held-out split and
``eval.seed`` (and the sampled thoughts and predictions by the seed too), so two evaluations of two
models see the same items and the same random streams.

Everything goes through two interfaces: an engine (``generate``, a
:class:`~megatron_pz.rollout.base.RolloutEngine`) and a scorer (``token_logprobs``, a
:class:`~megatron_pz.objectives.base.Scorer`): the run's rollout engine and Megatron actor during
training, :class:`~megatron_pz.eval.transformers_backend.TransformersBackend` for an exported folder.
"""

from __future__ import annotations

import random
from typing import Optional

from megatron_pz.eval.intervals import bootstrap, paired_difference
from megatron_pz.objectives.answers import extract_boxed
from megatron_pz.objectives.base import encode, sample, token_list
from megatron_pz.objectives.config import ObjectiveConfig
from megatron_pz.objectives.pretrainzero import (
    build_predictor_prompt,
    generator_reward,
    mask_passage,
    parse_mask,
    predictor_reward,
)
from megatron_pz.objectives.prompts import RLP_THINK_CLOSE, RLP_THINK_OPEN
from megatron_pz.objectives.rlp import scoring_sequence


# ------------------------------------------------------------------ next-token NLL (no thought)


def nll_records(scorer, passages) -> list[dict]:
    """Per passage: summed next-token NLL of tokens 1..n-1 given their prefix, and how many tokens."""
    if not passages:
        return []
    logps = scorer.token_logprobs([token_list(p) for p in passages])
    return [{"eval": "nll", "passage": p.index, "nll": -float(sum(lp)), "tokens": len(lp)}
            for p, lp in zip(passages, logps)]


# ------------------------------------------------------------------ RLP information gain


def info_gain_positions(passages, objective: ObjectiveConfig, seed: int) -> list[tuple[int, list[int], int, int]]:
    """(passage index, x_<t, x_t, t) per passage long enough: t drawn from (seed, passage) only."""
    rlp = objective.rlp_settings()
    out = []
    for p in passages:
        ids = token_list(p)
        if len(ids) <= rlp.rlp_min_context_tokens:
            continue
        t = random.Random(f"eval/{seed}/{p.index}").randrange(rlp.rlp_min_context_tokens, len(ids))
        out.append((p.index, ids[:t], ids[t], t))
    return out


def info_gain_records(engine, scorer, tokenizer, positions, objective: ObjectiveConfig, cfg: HeldoutEvalConfig
                      ) -> list[dict]:
    """One record per position: the mean over policy-sampled thoughts of log p(x_t | x_<t, thought) -
    log p(x_t | x_<t), both under the evaluated model."""
    if not positions:
        return []
    rlp = objective.rlp_settings()
    open_ids, close_ids = encode(tokenizer, RLP_THINK_OPEN), encode(tokenizer, RLP_THINK_CLOSE)
    prompts = [context + open_ids for _, context, _, _ in positions]
    budget = cfg.info_gain_thought_tokens or rlp.rlp_thought_max_tokens
    outputs = sample(engine, prompts, cfg.info_gain_thoughts, budget, rlp.rlp_temperature, rlp.top_p,
                     [RLP_THINK_CLOSE], seed=cfg.seed)
    sequences, closed = [], []
    for (_, _, target, _), prompt, completions in zip(positions, prompts, outputs):
        for c in completions:
            shut = c.text.rstrip().endswith(RLP_THINK_CLOSE)
            closed.append(shut)
            sequences.append(scoring_sequence(prompt, c.token_ids, shut, close_ids, target))
    with_thought = [lp[-1] for lp in scorer.token_logprobs(sequences)]
    without = [lp[-1] for lp in scorer.token_logprobs([context + [target] for _, context, target, _ in positions])]
    g = cfg.info_gain_thoughts
    records = []
    for k, (index, _, target, t) in enumerate(positions):
        mine = with_thought[k * g:(k + 1) * g]
        records.append({"eval": "info_gain", "passage": index, "position": t, "target": target,
                        "gain": sum(mine) / g - without[k], "no_thought_logprob": without[k],
                        "thought_logprobs": mine, "closed": sum(closed[k * g:(k + 1) * g]) / g,
                        "thought_tokens": sum(len(c.token_ids) for c in outputs[k]) / g,
                        "thought": outputs[k][0].text})
    return records


# ------------------------------------------------------------------ PretrainZero generator reward


def generator_reward_records(engine, tokenizer, passages, spans: list[Optional[str]], valid: list[bool],
                             objective: ObjectiveConfig, cfg: HeldoutEvalConfig) -> list[dict]:
    """PretrainZero eq. 9 for each passage's greedy mask ``spans[i]`` (``valid[i]``: it passed validation):
    ``cfg.generator_reward_samples`` predictions at the predictor's temperature and budget."""
    masked = [(i, mask_passage(p.text, spans[i], objective.replace_all, objective.whole_words_only))
              for i, p in enumerate(passages) if valid[i]]
    prompts = [encode(tokenizer, build_predictor_prompt(text, objective.prompt_style), objective.chat_template)
               for _, text in masked]
    outputs = sample(engine, prompts, cfg.generator_reward_samples, objective.predictor_max_tokens,
                     objective.predictor_temperature, objective.top_p, objective.predictor_stop, seed=cfg.seed)
    predicted = {i: [predictor_reward(c.text, spans[i], objective.normalize_answer) for c in completions]
                 for (i, _), completions in zip(masked, outputs)}
    records = []
    for i, p in enumerate(passages):
        rewards = predicted.get(i)
        reward = generator_reward(rewards) if rewards is not None else objective.invalid_mask_reward
        records.append({"eval": "generator_reward", "passage": p.index, "span": spans[i], "reward": reward,
                        "predictor_acc": sum(rewards) / len(rewards) if rewards else None})
    return records


# ------------------------------------------------------------------ records -> per-item values


METRICS = {
    # name: (record kind(s), value of a record, weight of a record or None)
    "mask_accuracy": (("candidates",), lambda r: r["reward"], None),
    "word_mask_accuracy": (("words",), lambda r: r["reward"], None),
    "predictor_answer_rate": (("candidates", "words"), lambda r: float(extract_boxed(r["response"]) is not None), None),
    "generator_valid_mask_rate": (("generator",), lambda r: float(r["verdict"] == "ok"), None),
    "generator_reward": (("generator_reward",), lambda r: r["reward"], None),
    "info_gain": (("info_gain",), lambda r: r["gain"], None),
    "thought_closed_rate": (("info_gain",), lambda r: r["closed"], None),
    "nll_per_token": (("nll",), lambda r: r["nll"], lambda r: r["tokens"]),
}


def item_key(record: dict) -> tuple:
    return (record["eval"], record.get("passage"), record.get("span"), record.get("position"))


def item_values(records: list[dict]) -> dict[str, dict[tuple, tuple[float, Optional[float]]]]:
    """metric -> {item key: (value, weight)} from eval records (one evaluation's)."""
    out: dict[str, dict] = {}
    for name, (kinds, value, weight) in METRICS.items():
        mine = {item_key(r): (float(value(r)), float(weight(r)) if weight else None)
                for r in records if r.get("eval") in kinds}
        if mine:
            out[name] = mine
    return out


# ------------------------------------------------------------------ one evaluation, and its summary


def heldout_records(engine, scorer, tokenizer, heldout, cfg, greedy_records: list[dict], dp_rank: int = 0,
                    dp_size: int = 1) -> list[dict]:
    """This data-parallel slice's records of every figure ``cfg.eval`` turns on (``cfg``: the RunConfig).
    ``greedy_records``: this slice's greedy task records (their generator masks get the generator reward)."""
    e, o = cfg.eval, cfg.objective
    if scorer is None and (e.nll_passages or e.info_gain_positions):
        raise ValueError("eval.nll_passages / eval.info_gain_positions need a scorer (the actor, or a folder's model)")
    first = lambda n: [heldout[i] for i in range(min(n, len(heldout)))][dp_rank::dp_size]  # noqa: E731
    records: list[dict] = []
    if e.nll_passages:
        records += nll_records(scorer, first(e.nll_passages))
    if e.info_gain_positions:
        positions = info_gain_positions(first(e.info_gain_positions), o, e.seed)
        records += info_gain_records(engine, scorer, tokenizer, positions, o, e)
    if e.generator_reward_samples:
        generated = [r for r in greedy_records if r["eval"] == "generator"]
        by_index = {heldout[i].index: i for i in range(min(cfg.train.eval_passages, len(heldout)))}
        passages = [heldout[by_index[r["passage"]]] for r in generated]
        spans = [parse_mask(r["response"], o.mask_pick) for r in generated]
        records += generator_reward_records(engine, tokenizer, passages, spans, [r["verdict"] == "ok" for r in generated],
                                            o, e)
    return records


def summary_metrics(records: list[dict], prefix: str = "eval/") -> dict[str, float]:
    """Each figure of ``records`` (every item of one evaluation) with its 95 % interval:
    ``eval/<name>``, ``eval/<name>_low``, ``eval/<name>_high`` (perplexity beside NLL per token)."""
    import math

    out: dict[str, float] = {}
    for name, items in item_values(records).items():
        values = [v for v, _ in items.values()]
        weights = [w for _, w in items.values()] if name == "nll_per_token" else None
        ci = bootstrap(values, weights)
        out.update({f"{prefix}{name}": ci.value, f"{prefix}{name}_low": ci.low, f"{prefix}{name}_high": ci.high})
        if name == "nll_per_token":
            out[f"{prefix}perplexity"] = math.exp(ci.value)
    return out


def compare(before: list[dict], after: list[dict]) -> dict[str, dict]:
    """Per figure measured in both: before and after with their intervals, and after - before on the items
    both evaluated (paired bootstrap). Items are matched by key, so the same item sets give exact pairs."""
    b_items, a_items = item_values(before), item_values(after)
    table = {}
    for name in b_items.keys() & a_items.keys():
        keys = sorted(b_items[name].keys() & a_items[name].keys(), key=repr)
        if not keys:
            continue
        ratio = name == "nll_per_token"
        bv = [b_items[name][k][0] for k in keys]
        av = [a_items[name][k][0] for k in keys]
        bw = [b_items[name][k][1] for k in keys] if ratio else None
        aw = [a_items[name][k][1] for k in keys] if ratio else None
        table[name] = {"before": bootstrap(bv, bw), "after": bootstrap(av, aw),
                       "difference": paired_difference(bv, av, bw, aw), "items": len(keys)}
    return table
