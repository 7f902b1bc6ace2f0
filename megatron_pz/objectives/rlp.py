r"""RLP (arXiv 2510.01265): reward a sampled thought by the information it adds about the next token.

Per document x: one position t (uniform over [rlp_min_context_tokens, len-1]); G thoughts
c_1..c_G ~ pi_theta(. | x_<t, <think>) at temperature 0.7; then, by teacher forcing on the single
next token and without gradient,

    r(c_i) = log p_theta(x_t | x_<t, <think> c_i </think>) - log p_EMA(x_t | x_<t)
    A_i    = G / (G - 1) * (r(c_i) - mean_j r(c_j))          (leave-one-out baseline, no std scaling)

The loss is GRPO's clipped surrogate over the thought tokens only (no next-token loss term): the
experiences carry the thought as the response, and ``Experience.advantage`` is set here.
The EMA teacher (:class:`megatron_pz.rl.ema.EmaTeacher`) is the trainer's: initialised to theta
on the first batch and updated after every optimizer step; the scorer reads it via model="ema".

With rollouts on their own ranks (``rollout.placement: disaggregated``) the step is cut in two:
:meth:`RLPObjective.generate` samples the thoughts on a rollout rank, :meth:`RLPObjective.score` takes the
policy and EMA log-probs on the training ranks. At ``rollout.max_staleness: 1`` the thoughts of step k come
from the weights v_{k-1} while the reward scores them under v_k and the teacher of step k (ours; the papers
are on-policy): the thought tokens' importance ratio against their rollout log-probs (TIS) corrects the lag.

Paper-silent choices: a thought that hits the token limit without ``</think>`` is closed with
``</think>`` for scoring (the appended tokens are not trained on); t is drawn from
(seed, step, document index).
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_pz.objectives.base import encode, mean, passage_rng, role_metrics, sample, to_experiences, token_list
from megatron_pz.objectives.config import ObjectiveConfig
from megatron_pz.objectives.prompts import RLP_THINK_CLOSE, RLP_THINK_OPEN
from megatron_pz.rl.types import Experience


def rlp_advantages(rewards: list[float]) -> list[float]:
    """A_i = G/(G-1) * (r_i - mean r): the REINFORCE leave-one-out baseline, unscaled."""
    g = len(rewards)
    if g < 2:
        raise ValueError("RLP advantages need a group of at least 2 thoughts")
    m = sum(rewards) / g
    return [g / (g - 1) * (r - m) for r in rewards]


def scoring_sequence(prompt_ids: list[int], thought: list[int], thought_closed: bool, close_ids: list[int],
                     target_id: int) -> list[int]:
    """x_<t <think> c </think> x_t: the sequence whose last log-prob is log p_theta(x_t | x_<t, c).

    ``thought_closed``: the sampled text already ends with ``</think>`` (the engine keeps stop
    text); otherwise ``close_ids`` are appended for scoring only.
    """
    closed = list(thought) if thought_closed else list(thought) + list(close_ids)
    return list(prompt_ids) + closed + [target_id]


@dataclass
class RLPThoughts:
    """What the rollout half hands to the scoring half: per chosen document (index, x_<t, x_t, t), its
    prompt ``x_<t <think>``, the G sampled thoughts, and how many documents were too short."""

    chosen: list[tuple[int, list[int], int, int]]
    prompts: list[list[int]]
    outputs: list[list]
    skipped: int


class RLPObjective:
    def __init__(self, cfg: ObjectiveConfig, tokenizer):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.open_ids = encode(tokenizer, RLP_THINK_OPEN)
        self.close_ids = encode(tokenizer, RLP_THINK_CLOSE)

    def collect(self, passages: list, engine, scorer, step: int) -> tuple[list[Experience], dict[str, float]]:
        return self.score(self.generate(passages, engine, step), scorer, step)

    def generate(self, passages: list, engine, step: int) -> "RLPThoughts":
        """The rollout half: a position t per document and G thoughts after ``x_<t <think>``."""
        cfg = self.cfg
        chosen, skipped = [], 0
        for p in passages:
            ids = token_list(p)
            if len(ids) <= cfg.rlp_min_context_tokens:
                skipped += 1
                continue
            t = passage_rng(cfg, step, p.index).randrange(cfg.rlp_min_context_tokens, len(ids))
            chosen.append((p.index, ids[:t], ids[t], t))
        prompts = [context + self.open_ids for _, context, _, _ in chosen]
        outputs = sample(engine, prompts, cfg.rlp_group, cfg.rlp_thought_max_tokens, cfg.rlp_temperature,
                         cfg.top_p, [RLP_THINK_CLOSE], seed=cfg.seed + step)
        return RLPThoughts(chosen, prompts, outputs, skipped)

    def score(self, thoughts: "RLPThoughts", scorer, step: int) -> tuple[list[Experience], dict[str, float]]:
        """The scoring half: information-gain rewards under the current policy and the EMA teacher."""
        cfg = self.cfg
        chosen, prompts, outputs = thoughts.chosen, thoughts.prompts, thoughts.outputs
        # two scorer calls for the whole batch: G thoughts per position, and one no-think sequence
        sequences = [scoring_sequence(prompt, c.token_ids, c.text.rstrip().endswith(RLP_THINK_CLOSE),
                                      self.close_ids, target)
                     for (_, _, target, _), prompt, completions in zip(chosen, prompts, outputs)
                     for c in completions]
        # R3: the policy's pass replays each thought's rollout routes (its prompt and thought tokens); the
        # appended </think> and target route natively, and so does the EMA teacher
        routes = [c.routes for completions in outputs for c in completions]
        policy_lps = [lp[-1] for lp in scorer.token_logprobs(sequences, model="policy", routes=routes)] \
            if sequences else []
        ema_lps = [lp[-1] for lp in scorer.token_logprobs(
            [context + [target] for _, context, target, _ in chosen], model="ema")] if chosen else []

        experiences, closed = [], []
        for k, ((index, context, target, t), prompt, completions) in enumerate(zip(chosen, prompts, outputs)):
            pol = policy_lps[k * cfg.rlp_group:(k + 1) * cfg.rlp_group]
            rewards = [lp - ema_lps[k] for lp in pol]
            closed += [c.text.rstrip().endswith(RLP_THINK_CLOSE) for c in completions]
            infos = [{"position": t, "target": target, "policy_logprob": lp, "ema_logprob": ema_lps[k],
                      "passage_index": index} for lp in pol]
            exps = to_experiences(prompt, completions, rewards, f"rlp/{step}/{k}/{index}", "rlp", infos,
                                  cfg.rlp_temperature)
            for e, a in zip(exps, rlp_advantages(rewards)):
                e.advantage = a
            experiences += exps
        metrics = {
            "rlp/info_gain_mean": mean(e.reward for e in experiences),
            "rlp/policy_logprob_mean": mean(policy_lps),
            "rlp/ema_logprob_mean": mean(ema_lps),
            "rlp/positive_gain_fraction": mean(e.reward > 0 for e in experiences),
            "rlp/thought_closed_rate": mean(closed),
            "rlp/skipped_too_short": float(thoughts.skipped),
            **role_metrics(experiences, "rlp"),
        }
        return experiences, metrics
