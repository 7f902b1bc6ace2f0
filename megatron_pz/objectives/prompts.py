r"""Prompt texts of every objective. Plain text: base models have no chat template.

Provenance:
- ``prompt_style="paper"`` (the default): PretrainZero's own mask-generation and mask-prediction
  prompts, word for word from its Figure 5 ("Prompt for Mask Generation and Prediction", §3.2),
  line breaks as in the figure; ``<paragraph>`` / ``<paragraph with mask>`` are the slots. The
  figure typesets ``\mask{}`` and ``\boxed{}`` in monospace; the text is the plain command.
- ``prompt_style="ours"``: this project's earlier paraphrase of the generator instruction (numbered
  requirements, an explicit "think step by step first"), with the passage after the instruction,
  and the prediction prompt on one line. Kept as a named alternative (the tiny CPU default measured
  the same held-out figures with either). Not the paper's text.
- ``build_ntr_prompt`` / ``build_rpt_prompt``: written from the RPT paper's description (reason,
  then give the next token(s) in ``\boxed{}``; RPT: after ``</think>``). Not verbatim: neither
  PretrainZero nor RPT prints its next-token prompt.
- RLP: the context is followed by ``RLP_THINK_OPEN``; the thought ends with ``RLP_THINK_CLOSE``,
  then the next token is scored (RLP's "think, then predict" continuation). Not verbatim.
"""

from __future__ import annotations

MASK_TOKEN = "[mask]"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
RLP_THINK_OPEN = THINK_OPEN
RLP_THINK_CLOSE = THINK_CLOSE

# PretrainZero Figure 5, mask generation (verbatim, with the figure's line breaks).
PAPER_GENERATOR_TEMPLATE = (
    "Generate a mask to mask important words in the following paragraph, satisfying the requirements "
    "below:\n"
    "1) The mask should mask one or more entities in the passage. The masked words should be continuous.\n"
    "2) The masked words should exactly match words in the original passage.\n"
    "3) The masked words could be predicted according to the context. The difficulty to predict should "
    "be moderately challenging for you, so the answer would be short and as unique as possible.\n"
    "Paragraph: {passage}\n"
    "The final generated masked words must be placed inside \\mask{{}}."
)

# PretrainZero Figure 5, mask prediction (verbatim, with the figure's line breaks).
PAPER_PREDICTOR_TEMPLATE = (
    "There is a passage with masked words by [mask]:\n"
    "{masked}\n"
    "Please reason step by step, and put the predicted masked words within \\boxed{{}}."
)

# prompt_style="ours": the project's paraphrase (not the paper's text).
OURS_GENERATOR_TEMPLATE = (
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

OURS_PREDICTOR_TEMPLATE = (
    "There is a passage with masked words by [mask]: {masked}\n"
    "Please reason step by step, and put the predicted masked words within \\boxed{{}}."
)

PROMPT_STYLES = ("paper", "ours")
GENERATOR_TEMPLATES = {"paper": PAPER_GENERATOR_TEMPLATE, "ours": OURS_GENERATOR_TEMPLATE}
PREDICTOR_TEMPLATES = {"paper": PAPER_PREDICTOR_TEMPLATE, "ours": OURS_PREDICTOR_TEMPLATE}

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


def _template(templates: dict, style: str) -> str:
    if style not in templates:
        raise ValueError(f"prompt style must be one of {PROMPT_STYLES}, got {style!r}")
    return templates[style]


def build_generator_prompt(passage_text: str, style: str = "paper") -> str:
    return _template(GENERATOR_TEMPLATES, style).format(passage=passage_text)


def build_predictor_prompt(masked_text: str, style: str = "paper") -> str:
    return _template(PREDICTOR_TEMPLATES, style).format(masked=masked_text)


def build_ntr_prompt(context_text: str) -> str:
    return NTR_TEMPLATE.format(context=context_text)


def build_rpt_prompt(context_text: str) -> str:
    return RPT_TEMPLATE.format(context=context_text)
