r"""Prompt texts of every objective. Plain text: base models have no chat template.

Provenance (the papers' appendices were not retrievable from this project's reference store, so
only the mask-prediction prompt is verbatim):
- ``build_predictor_prompt``: PretrainZero's mask-prediction prompt, verbatim as quoted in the
  project's issue ("There is a passage with masked words by [mask]: ... within \boxed{}.").
- ``build_generator_prompt``: written from PretrainZero's description of its mask-generation
  instruction (mask one or more entities; a continuous span exactly matching words of the passage;
  predictable from context; moderately challenging; short and as unique as possible; think, then
  write the span inside ``\mask{}``). Not the paper's verbatim text.
- ``build_ntr_prompt`` / ``build_rpt_prompt``: written from the RPT paper's description (reason,
  then give the next token(s) in ``\boxed{}``; RPT: after ``</think>``). Not verbatim.
- RLP: the context is followed by ``RLP_THINK_OPEN``; the thought ends with ``RLP_THINK_CLOSE``,
  then the next token is scored (RLP's "think, then predict" continuation). Not verbatim.
"""

from __future__ import annotations

MASK_TOKEN = "[mask]"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
RLP_THINK_OPEN = THINK_OPEN
RLP_THINK_CLOSE = THINK_CLOSE

GENERATOR_TEMPLATE = (
    "Below is a passage. Choose words of the passage to mask, so that a reader has to reason to "
    "recover them.\n"
    "Requirements:\n"
    "1. Mask one or more entities: a single continuous span that exactly matches words of the passage.\n"
    "2. The masked words must be predictable from the context of the passage.\n"
    "3. The masking should be moderately challenging: neither trivial nor impossible to recover.\n"
    "4. The span should be short and as unique in the passage as possible.\n"
    "Think step by step first, then write the exact words to mask within \\mask{{}}.\n\n"
    "Passage:\n{passage}\n"
)

PREDICTOR_TEMPLATE = (
    "There is a passage with masked words by [mask]: {masked}\n"
    "Please reason step by step, and put the predicted masked words within \\boxed{{}}."
)

NTR_TEMPLATE = (
    "Here is the beginning of a text:\n{context}\n"
    "Please reason step by step about how the text continues, and put the next word(s) of the text "
    "within \\boxed{{}}."
)

RPT_TEMPLATE = (
    "Predict the next token(s) of the text below. First think inside <think> </think>, then put "
    "your prediction of the next token(s) within \\boxed{{}}.\n\n"
    "Text: {context}\n" + THINK_OPEN + "\n"
)


def build_generator_prompt(passage_text: str) -> str:
    return GENERATOR_TEMPLATE.format(passage=passage_text)


def build_predictor_prompt(masked_text: str) -> str:
    return PREDICTOR_TEMPLATE.format(masked=masked_text)


def build_ntr_prompt(context_text: str) -> str:
    return NTR_TEMPLATE.format(context=context_text)


def build_rpt_prompt(context_text: str) -> str:
    return RPT_TEMPLATE.format(context=context_text)
