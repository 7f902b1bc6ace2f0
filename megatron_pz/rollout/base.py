"""The one interface every rollout engine implements, and the records it returns.

Objectives talk only to this interface, so the same PretrainZero/RLP code runs on Megatron's own
KV-cache decoder (CPU, fallback), on the ``hf`` engine's own transformers copy (CPU, vLLM's twin) and on
vLLM (GPU).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol, Sequence


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    stop: list[str] = field(default_factory=list)  # stop strings; the completion keeps the stop text
    n: int = 1  # samples per prompt (a GRPO group)
    seed: Optional[int] = None


@dataclass
class Completion:
    """One sampled continuation of one prompt."""

    prompt_ids: list[int]
    token_ids: list[int]  # generated tokens only (no prompt)
    text: str  # decoded generated text
    logprobs: Optional[list[float]] = None  # per generated token, from the rollout engine
    finish_reason: str = "length"  # stop | eos | length
    # MoE: the experts each prompt + response token but the last went to, [tokens, moe_layers, topk]
    # uint8/uint16 (megatron_pz.model.routes); None for dense models or an engine that cannot capture
    routes: Optional[Any] = None
    # the weight version that sampled each generated token (engines' generate_rows, a disaggregated stream
    # whose rows continue across weight loads); None: one call, one version (the engine's current weights)
    versions: Optional[list[int]] = None


@dataclass
class Row:
    """One sample being generated, possibly over several engine calls (windows, see
    :meth:`RolloutEngine.generate_rows`). An engine appends to ``token_ids``/``logprobs``/``versions`` and sets
    ``finish_reason``; :func:`megatron_pz.rollout.common.row_completion` turns a finished row into a
    :class:`Completion`."""

    prompt_ids: list[int]
    params: SamplingParams  # its temperature / top_p / top_k / stop / max_new_tokens (n ignored: one sample)
    seed: int  # the row's noise stream: row_seed(call seed, prompt, sample index) (rollout.common)
    token_ids: list[int] = field(default_factory=list)  # generated so far (no prompt)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)  # the weight version of each generated token
    finish_reason: Optional[str] = None  # None while unfinished; then eos | stop | length
    routes: Optional[Any] = None  # MoE routes (as Completion.routes), set by an engine that captures them

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


class RolloutEngine(Protocol):
    """Generates ``n`` completions for each prompt. Returns them grouped: result[i] has n items.

    Callers drive an engine through :class:`megatron_pz.rollout.phase.RolloutPhases` (wake -> sync the
    new weights -> generate -> finish_phase -> sleep), never through these methods one by one.
    """

    owns_weights: bool  # True: holds its own copy of the weights, which update_weights refreshes

    def generate(self, prompts: Sequence[list[int]], params: SamplingParams) -> list[list[Completion]]:
        ...

    def generate_rows(self, rows: list[Row], version: int, max_new: Optional[int] = None,
                      until: Optional[Callable[[], bool]] = None) -> int:
        """Continue every unfinished row from prompt + its tokens so far by at most ``max_new`` new tokens
        (None: up to its ``params.max_new_tokens`` in total), appending token, log-prob and ``version`` per
        token; set ``finish_reason`` on eos / stop (checked on the WHOLE generated text, earlier windows'
        tokens included) / total length. Rows are processed in the order given (chunks of the engine's batch
        size). ``until()`` is checked between decode steps; when it returns True the call returns, leaving
        rows unfinished (a later call continues them, possibly under newer weights). Returns the decode steps
        run. The ``hf`` and vLLM engines have it (they own weights that can be loaded between windows); a row
        continued under unchanged weights draws what one call draws (``hf``: exactly; vLLM: a per-window seed).
        """
        ...

    def update_weights(self, model_chunks) -> None:
        """Load the actor's current weights (no-op for an engine that shares the actor's modules)."""
        ...

    def load_weight_buckets(self, buckets) -> None:
        """Engines that own their weights: load them from :class:`~megatron_pz.rollout.weight_sync.Bucket`
        s of any source (``update_weights`` feeds the actor's export; a rollout rank of a disaggregated
        run feeds what the bridge received from the training ranks)."""
        ...

    def sleep(self) -> None:
        """Release memory between rollout and training (colocated engines)."""
        ...

    def wake(self) -> None:
        ...

    def finish_phase(self) -> None:
        """End of a rollout phase: serve peers' pending collective generation (see phase.py)."""
        ...
