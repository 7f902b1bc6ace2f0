"""ObjectiveConfig: which reinforcement-pretraining objective to run, and every knob it has.

Defaults follow the papers where they say something (PretrainZero arXiv 2512.03442, RLP arXiv
2510.01265, RPT arXiv 2506.08007); the comment beside each field names the section, equation or
figure. Fields marked *paper-silent* (or *ours*) are choices of this project; each says what was
chosen and why, so a run's config records the full algorithm.

Paper defaults: prompt_style (PretrainZero Fig. 5), group sizes (PZ §4.1; RLP), max_mask_occurrences
and replace_all (PZ §4.4 "PretrainZero"), whole_words_only=False (PZ §4.4: whole-word masks are the
"PretrainZero-Words" ablation), exact-match rewards (PZ eqs. 5, 8), generator reward (PZ eq. 9 and the
acc = 0 rule), dynamic_sampling (PZ §4.1, DAPO), rlp_temperature and loss_agg (RLP Algorithm 1, eq. 8;
PZ §4.1 follows DAPO's token-level loss), max token lengths (PZ §4.1; RLP §9, §10), ema_tau (RLP §2.1),
rlp_group (RLP §9: 16 rollouts).
Ours: the sampling temperatures other than RLP's, mask_pick, invalid_mask_reward, content_words_only,
normalize_answer, the leading-whitespace rule, the minimum context lengths, adv_eps.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

from megatron_pz.config import ConfigError, from_dict
from megatron_pz.objectives.prompts import PROMPT_STYLES

OBJECTIVE_NAMES = ("pretrainzero", "random_rlpt", "random_ntr", "entropy_ntr", "rpt", "rlp")
LOSS_AGGS = ("token_mean", "seq_mean_token_mean")


def paper_loss_agg(name: str) -> str:
    """Each objective's paper aggregation of the clipped surrogate over tokens.

    RLP: a per-thought mean, -(1/BG) sum_i (1/|c_i|) sum_u ... (RLP Algorithm 1, eq. 8).
    PretrainZero and its baselines: DAPO's token-level mean (PZ §4.1 "Following DAPO", clip-higher
    and dynamic sampling; DAPO's token-level policy-gradient loss); RPT (arXiv 2506.08007) likewise
    trains with GRPO as in PZ §2.2 and gets the same rule here.
    """
    return "seq_mean_token_mean" if name == "rlp" else "token_mean"


@dataclass
class ObjectivePhase:
    """One phase of ``objective.schedule`` (ours; PZ §4.1's SmolLM3 recipe is two phases: Random RLPT
    for 100 steps, then PretrainZero). ``overrides``: ObjectiveConfig keys changed from the base
    section (``mixture`` allowed, ``schedule`` not). ``steps``: RL steps of the phase; null only on
    the last phase (it runs until ``train.steps``)."""

    steps: Optional[int] = None
    overrides: dict = field(default_factory=dict)


@dataclass
class ObjectiveComponent:
    """One component of ``objective.mixture`` (ours): its ObjectiveConfig ``overrides`` on the base
    section, and its ``weight`` lambda_k. Each step's passages are split among the components in
    proportion to the weights, and the loss is sum_k lambda_k L_k (weights normalised to sum 1), each
    L_k with the component's own aggregation, groups, rewards and temperatures."""

    weight: float = 1.0
    overrides: dict = field(default_factory=dict)


@dataclass
class ObjectiveConfig:
    """Which objective and every knob it has; the comment beside each field says whether its default
    follows a paper (section / equation / figure named) or is ours (see the module docstring)."""

    name: str = "pretrainzero"  # one of OBJECTIVE_NAMES
    seed: int = 1234  # span / position choices are drawn from (seed, step, passage.index)

    # ---- group sizes (PretrainZero §4.1: 8 generator and 8 predictor rollouts; RLP §9: 16 thoughts)
    generator_group: int = 8
    predictor_group: int = 8
    rlp_group: int = 16
    ntr_group: int = 8  # random/entropy next-token reasoning and RPT (RPT paper: 8)

    # ---- sampling. paper-silent except RLP's 0.7 (§9); 1.0 (ours) is the usual on-policy GRPO choice.
    # Rollout and training log-probs are both taken at the role's temperature (logits / T).
    generator_temperature: float = 1.0
    predictor_temperature: float = 1.0
    ntr_temperature: float = 1.0
    rlp_temperature: float = 0.7
    top_p: float = 1.0
    # PretrainZero §4.1: 4096 response tokens for both roles; RLP §10: 2048-token thoughts.
    generator_max_tokens: int = 4096
    predictor_max_tokens: int = 4096
    ntr_max_tokens: int = 4096
    rlp_thought_max_tokens: int = 2048
    # paper-silent: no stop strings, a role's response ends at EOS or its token limit.
    generator_stop: list = field(default_factory=list)
    predictor_stop: list = field(default_factory=list)
    ntr_stop: list = field(default_factory=list)

    # ---- prompts. paper: PretrainZero Figure 5 word for word; ours: the project's paraphrase
    # (see objectives/prompts.py), a named alternative for small models.
    prompt_style: str = "paper"
    # ours: the papers prompt *base* models with plain text (PZ Figure 5; RLP has no prompt). true: an
    # instruct checkpoint gets each prompt as the user turn of its tokenizer's chat template, the response
    # being the assistant turn, ended by the template's end-of-turn token (SmolLM2-Instruct answers a bare
    # prompt with <|im_end|> as its first token: an empty response). RLP's context is a document, not a
    # request, and stays plain text either way.
    chat_template: bool = False

    # ---- mask validity (PretrainZero §4.4): the span must occur in the passage fewer than 8 times.
    max_mask_occurrences: int = 8  # valid iff 1 <= occurrences < this
    # PZ §4.4: the main recipe masks every occurrence; False is the "PretrainZero-OneMask" ablation,
    # which replaces one occurrence drawn at random (seeded by (seed, step, passage, sample)).
    replace_all: bool = True
    # PZ §4.4: the main recipe accepts spans that cut words ("PretrainZero may produce masks that
    # cover incomplete words"), so occurrences are plain substring matches ("art" inside "party"
    # counts). True is the "PretrainZero-Words" ablation (complete-word spans only), which scored lower.
    whole_words_only: bool = False
    # paper-silent: when a response holds several \mask{...}, take the last one (the final answer
    # after the thinking, like the last \boxed{}). 'first' is the alternative.
    mask_pick: str = "last"  # last | first
    # paper-silent: an invalid or unparseable mask earns this reward, and gets no predictor rollouts.
    invalid_mask_reward: float = 0.0
    # paper-silent: the paper's validity rule is only "occurs, fewer than 8 times". With this on, a
    # mask made only of function words ("the", "of the") is invalid too ('stopwords_only'): the prompt
    # asks for entities, and a weak policy otherwise settles on masking "the" and predicting "the".
    content_words_only: bool = False

    # ---- rewards
    # PZ eq. 8 (mask prediction) and eq. 5 (random / entropy next-token reasoning: exact match of the
    # single masked token) are exact matches; RPT keeps its own prefix reward (rpt_* below).
    normalize_answer: bool = False  # paper: exact match; True (ours): casefold + collapse whitespace
    # paper-silent (RPT, NTR): the ground-truth continuation usually starts with the space that BPE
    # glues to the next word; with this on, leading whitespace of both the answer and the target is
    # ignored (RPT: the token-boundary rule is applied after removing it; NTR: eq. 5's exact match
    # of the target token is taken after removing it).
    rpt_ignore_leading_whitespace: bool = True
    rpt_max_answer_tokens: int = 32  # token boundaries considered for the prefix reward
    rpt_require_think_close: bool = True  # RPT: the \boxed{} answer must come after </think>

    # ---- loss aggregation over tokens: token_mean (DAPO; PZ §4.1) or seq_mean_token_mean (the mean
    # over samples of each sample's token mean; RLP Algorithm 1, eq. 8). "paper": the objective's
    # paper rule (see paper_loss_agg).
    loss_agg: str = "paper"

    # ---- advantages and filtering
    std_scale: bool = True  # GRPO (PZ eq. 10): (r - mean) / (std + eps); RLP (eq. 7) never scales by std
    adv_eps: float = 1e-6
    dynamic_sampling: bool = True  # PZ §4.1 (DAPO): predictor groups with acc exactly 0 or 1 leave the loss
    # paper-silent: generator groups whose rewards are all equal give zero advantage anyway; this
    # option also takes them out of the token count.
    dynamic_sampling_generator: bool = False

    # ---- next-token reasoning baselines
    ntr_min_context_tokens: int = 16  # paper-silent: shortest context a truncation may leave
    entropy_top_fraction: float = 0.2  # entropy NTR: sample among the top-20% entropy positions
    rpt_position: str = "entropy"  # rpt: which position to predict: entropy | random

    # ---- RLP
    rlp_min_context_tokens: int = 16  # paper-silent: the random position t is >= this
    ema_tau: float = 0.999  # RLP §2.1: phi <- tau * phi + (1 - tau) * theta after every optimizer step

    # ---- past the papers (ours): a schedule of phases and a mixture of objectives; see
    # ObjectivePhase / ObjectiveComponent and objectives/composite.py. Empty: the single objective above.
    schedule: list[ObjectivePhase] = field(default_factory=list)
    mixture: list[ObjectiveComponent] = field(default_factory=list)

    def validate(self) -> None:
        if self.name not in OBJECTIVE_NAMES:
            raise ConfigError(f"objective.name must be one of {OBJECTIVE_NAMES}, got {self.name!r}")
        for key in ("generator_group", "predictor_group", "ntr_group"):
            if getattr(self, key) < 1:
                raise ConfigError(f"objective.{key} must be >= 1, got {getattr(self, key)}")
        if self.rlp_group < 2:
            raise ConfigError(f"objective.rlp_group must be >= 2 (advantage uses G/(G-1)), got {self.rlp_group}")
        if self.max_mask_occurrences < 2:
            raise ConfigError(f"objective.max_mask_occurrences must be >= 2, got {self.max_mask_occurrences}")
        if self.prompt_style not in PROMPT_STYLES:
            raise ConfigError(f"objective.prompt_style must be one of {PROMPT_STYLES}, got {self.prompt_style!r}")
        if self.loss_agg != "paper" and self.loss_agg not in LOSS_AGGS:
            raise ConfigError(f"objective.loss_agg must be 'paper' or one of {LOSS_AGGS}, got {self.loss_agg!r}")
        if self.mask_pick not in ("last", "first"):
            raise ConfigError(f"objective.mask_pick must be 'last' or 'first', got {self.mask_pick!r}")
        if self.rpt_position not in ("entropy", "random"):
            raise ConfigError(f"objective.rpt_position must be 'entropy' or 'random', got {self.rpt_position!r}")
        if not 0.0 < self.entropy_top_fraction <= 1.0:
            raise ConfigError(f"objective.entropy_top_fraction must be in (0, 1], got {self.entropy_top_fraction}")
        if not 0.0 <= self.ema_tau <= 1.0:
            raise ConfigError(f"objective.ema_tau must be in [0, 1], got {self.ema_tau}")
        for key in ("ntr_min_context_tokens", "rlp_min_context_tokens", "generator_max_tokens", "predictor_max_tokens",
                    "ntr_max_tokens", "rlp_thought_max_tokens", "rpt_max_answer_tokens"):
            if getattr(self, key) < 1:
                raise ConfigError(f"objective.{key} must be >= 1, got {getattr(self, key)}")
        for key in ("generator_temperature", "predictor_temperature", "ntr_temperature", "rlp_temperature"):
            if not getattr(self, key) > 0.0:
                raise ConfigError(f"objective.{key} must be > 0 (log-probs are taken at it), got {getattr(self, key)}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"objective.top_p must be in (0, 1], got {self.top_p}")
        if not self.adv_eps >= 0.0:
            raise ConfigError(f"objective.adv_eps must be >= 0, got {self.adv_eps}")
        if self.schedule and self.mixture:
            raise ConfigError("objective.schedule and objective.mixture exclude each other at the top level; "
                              "put the mixture in a phase's overrides")
        for i, phase in enumerate(self.schedule):
            last = i == len(self.schedule) - 1
            if phase.steps is None and not last:
                raise ConfigError(f"objective.schedule[{i}].steps must be set (only the last phase may omit it)")
            if phase.steps is not None and phase.steps < 1:
                raise ConfigError(f"objective.schedule[{i}].steps must be >= 1, got {phase.steps}")
        for i, comp in enumerate(self.mixture):
            if not comp.weight > 0.0:
                raise ConfigError(f"objective.mixture[{i}].weight must be > 0, got {comp.weight}")
        if self.schedule or self.mixture:
            self.leaves()  # derives and validates every phase / component

    def derive(self, overrides: dict, where: str, allow_mixture: bool) -> "ObjectiveConfig":
        """This section with ``overrides`` applied (a phase's or a component's config), validated."""
        if not isinstance(overrides, dict):
            raise ConfigError(f"{where} must be a mapping of objective keys, got {overrides!r}")
        forbidden = {"schedule"} | (set() if allow_mixture else {"mixture"})
        bad = sorted(forbidden & set(overrides))
        if bad:
            raise ConfigError(f"{where} may not set {', '.join(bad)} (no nesting)")
        data = {k: v for k, v in asdict(self).items() if k not in ("schedule", "mixture")}
        data.update(overrides)
        derived = from_dict(ObjectiveConfig, data, where)
        derived.validate()
        return derived

    def leaves(self) -> list["ObjectiveConfig"]:
        """Every single-objective config this section runs (phases, then their mixture components)."""
        if self.schedule:
            return [leaf for i, ph in enumerate(self.schedule)
                    for leaf in self.derive(ph.overrides, f"objective.schedule[{i}].overrides", True).leaves()]
        if self.mixture:
            return [self.derive(c.overrides, f"objective.mixture[{i}].overrides", False)
                    for i, c in enumerate(self.mixture)]
        return [self]

    def response_budget(self) -> int:
        """Longest response this single objective samples or scores in training (in tokens): both
        PretrainZero roles, Random RLPT's predictor, RLP's thought plus the ``</think>`` and target token
        its scoring appends, the next-token baselines' response. (The held-out evaluation's own budgets:
        :func:`megatron_pz.rollout.budget.eval_response_budget`.)"""
        if self.name == "pretrainzero":
            return max(self.generator_max_tokens, self.predictor_max_tokens)
        if self.name == "random_rlpt":
            return self.predictor_max_tokens
        if self.name == "rlp":
            return self.rlp_thought_max_tokens + 2
        return self.ntr_max_tokens

    def longest_response(self) -> int:
        """:meth:`response_budget` over every phase and mixture component this section runs."""
        return max(leaf.response_budget() for leaf in self.leaves())

    def rlp_settings(self) -> "ObjectiveConfig":
        """The RLP leaf of this objective (its temperature, thought budget, minimum context), or RLP's
        defaults when no phase or component is RLP (what the held-out information gain samples with)."""
        return next((leaf for leaf in self.leaves() if leaf.name == "rlp"), None) or ObjectiveConfig(name="rlp")

    def uses_rlp(self) -> bool:
        """True iff some phase or component is RLP (the EMA teacher is built only then)."""
        return any(leaf.name == "rlp" for leaf in self.leaves())

    def resolved_loss_agg(self) -> str:
        """The aggregation this objective trains with ('paper' resolved by :func:`paper_loss_agg`)."""
        return paper_loss_agg(self.name) if self.loss_agg == "paper" else self.loss_agg
