"""Mask parsing/validation, answer extraction and the rewards, on hand-made inputs."""

import pytest

from megatron_pz.objectives.baselines import continuation_boundaries, rpt_prefix_reward
from megatron_pz.objectives.config import ObjectiveConfig
from megatron_pz.objectives.pretrainzero import (
    build_predictor_prompt,
    extract_boxed,
    generator_reward,
    mask_passage,
    parse_mask,
    predictor_reward,
    validate_mask,
)
from test_objectives_support import tiny_tokenizer

CFG = ObjectiveConfig()
TEXT = "The cat sat on the mat. The cat was happy."


def test_parse_mask_found_absent_nested_several():
    assert parse_mask("Let me think. The key word is racing.\n\\mask{stakes}") == "stakes"
    assert parse_mask("no mask here, just \\boxed{x}") is None
    assert parse_mask("\\mask{a {b} c}") == "a {b} c"
    assert parse_mask("\\mask{ stakes }") == "stakes"
    several = "maybe \\mask{first} ... no, \\mask{second}"
    assert parse_mask(several) == "second"
    assert parse_mask(several, pick="first") == "first"
    # an unclosed \mask{ is not an answer; the complete one before it is
    assert parse_mask("\\mask{good} then \\mask{bad") == "good"
    assert parse_mask("\\mask{never closed") is None


def test_validate_mask_reasons():
    assert validate_mask(TEXT, "cat", CFG) == (True, "ok")
    assert validate_mask(TEXT, "The cat", CFG) == (True, "ok")
    assert validate_mask(TEXT, "dog", CFG) == (False, "absent")
    assert validate_mask(TEXT, None, CFG) == (False, "unparseable")
    assert validate_mask(TEXT, "", CFG) == (False, "empty")
    assert validate_mask(TEXT, "   ", CFG) == (False, "empty")
    # "at" only occurs inside cat/sat/mat/cat. The paper's main recipe accepts spans that cut words
    # (PretrainZero §4.4): 4 occurrences, valid. Whole words only is its "PretrainZero-Words" ablation.
    assert validate_mask(TEXT, "at", CFG) == (True, "ok")
    assert validate_mask(TEXT, "at", ObjectiveConfig(whole_words_only=True)) == (False, "absent")
    # substring counting: "x" occurs 8 times inside words -> too frequent under the paper rule
    assert validate_mask("ax bx cx dx ex fx gx hx", "x", CFG) == (False, "too_frequent")
    assert validate_mask("ax bx cx dx ex fx gx hx", "x", ObjectiveConfig(whole_words_only=True)) == (False, "absent")
    # fewer than 8 occurrences is valid, 8 or more is not
    assert validate_mask("x " * 7 + "end", "x", CFG) == (True, "ok")
    assert validate_mask("x " * 8 + "end", "x", CFG) == (False, "too_frequent")
    assert validate_mask("x " * 8 + "end", "x", ObjectiveConfig(max_mask_occurrences=9)) == (True, "ok")
    # function-word-only masks are valid under the paper's rule, invalid with content_words_only
    content = ObjectiveConfig(content_words_only=True)
    assert validate_mask(TEXT, "the", CFG) == (True, "ok")
    assert validate_mask(TEXT, "the", content) == (False, "stopwords_only")
    assert validate_mask(TEXT, "on the", content) == (False, "stopwords_only")
    assert validate_mask(TEXT, "on the mat", content) == (True, "ok")
    assert validate_mask(TEXT, "The cat", content) == (True, "ok")


def test_mask_passage():
    assert mask_passage(TEXT, "cat") == "The [mask] sat on the mat. The [mask] was happy."
    assert mask_passage(TEXT, "cat", replace_all=False) == "The [mask] sat on the mat. The cat was happy."
    # the paper's default cuts words (§4.4); whole_words_only=True is the PretrainZero-Words ablation
    assert mask_passage("concatenate a cat", "cat") == "con[mask]enate a [mask]"
    assert mask_passage("concatenate a cat", "cat", whole_words_only=True) == "concatenate a [mask]"
    assert mask_passage("born (1905) in Ulm", "(1905)", whole_words_only=True) == "born [mask] in Ulm"
    assert mask_passage("a \\1 b", "\\1") == "a [mask] b"  # no regex escapes leak into the output
    with pytest.raises(ValueError, match="does not occur"):
        mask_passage(TEXT, "dog")
    prompt = build_predictor_prompt("The [mask] sat.", "ours")
    assert prompt.startswith("There is a passage with masked words by [mask]: The [mask] sat.")
    assert prompt.endswith("put the predicted masked words within \\boxed{}.")


def test_one_mask_replaces_a_random_occurrence():
    """PretrainZero-OneMask (§4.4): one occurrence drawn at random, not always the first."""
    import random

    text = "x a x b x c"
    seen = {mask_passage(text, "x", replace_all=False, rng=random.Random(seed)) for seed in range(40)}
    assert seen == {"[mask] a x b x c", "x a [mask] b x c", "x a x b [mask] c"}
    # the same rng state gives the same choice (replayable)
    assert mask_passage(text, "x", False, rng=random.Random(7)) == mask_passage(text, "x", False, rng=random.Random(7))


# PretrainZero (arXiv 2512.03442) Figure 5, "Prompt for Mask Generation and Prediction", typed here from
# the figure line by line; <paragraph> and <paragraph with mask> are the figure's slots.
FIGURE5_GENERATION = """Generate a mask to mask important words in the following paragraph, satisfying the requirements below:
1) The mask should mask one or more entities in the passage. The masked words should be continuous.
2) The masked words should exactly match words in the original passage.
3) The masked words could be predicted according to the context. The difficulty to predict should be moderately challenging for you, so the answer would be short and as unique as possible.
Paragraph: <paragraph>
The final generated masked words must be placed inside \\mask{}."""

FIGURE5_PREDICTION = """There is a passage with masked words by [mask]:
<paragraph with mask>
Please reason step by step, and put the predicted masked words within \\boxed{}."""


def test_default_prompts_are_figure5_word_for_word():
    from megatron_pz.objectives.prompts import build_generator_prompt

    assert build_generator_prompt("<paragraph>") == FIGURE5_GENERATION
    assert build_predictor_prompt("<paragraph with mask>") == FIGURE5_PREDICTION
    assert ObjectiveConfig().prompt_style == "paper"
    # ours stays available by name, and differs
    assert build_generator_prompt("<paragraph>", "ours") != FIGURE5_GENERATION
    with pytest.raises(ValueError, match="prompt style"):
        build_generator_prompt("x", "figure6")


def test_ntr_exact_single_token_reward():
    """PretrainZero eq. 5: exact match of the masked token; RPT's prefix reward would pay "Paris is"."""
    from megatron_pz.objectives.baselines import ntr_exact_reward

    assert ntr_exact_reward("Paris", " Paris") == 1.0
    assert ntr_exact_reward("Paris is", " Paris") == 0.0  # multi-token answer that starts right
    assert ntr_exact_reward("Par", " Paris") == 0.0
    assert ntr_exact_reward(None, " Paris") == 0.0
    assert ntr_exact_reward("", " Paris") == 0.0
    assert ntr_exact_reward("x", None) == 0.0  # target inside a multi-byte character
    assert ntr_exact_reward("Paris", " Paris", ignore_leading_whitespace=False) == 0.0
    assert ntr_exact_reward(" Paris", " Paris", ignore_leading_whitespace=False) == 1.0
    assert rpt_prefix_reward("Paris is", " Paris is the capital", [6, 9, 13]) == 1.0  # RPT keeps its rule


def test_extract_boxed_and_predictor_reward():
    assert extract_boxed("\\boxed{1} then \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert extract_boxed("nothing") is None
    assert predictor_reward("reasoning... \\boxed{stakes}", "stakes") == 1.0
    assert predictor_reward("\\boxed{Stakes}", "stakes") == 0.0
    assert predictor_reward("\\boxed{Stakes}", "stakes", normalize=True) == 1.0
    assert predictor_reward("\\boxed{ stakes  }", "stakes") == 0.0
    assert predictor_reward("\\boxed{ stakes  }", "stakes", normalize=True) == 1.0
    assert predictor_reward("\\boxed{stake}", "stakes", normalize=True) == 0.0
    assert predictor_reward("\\boxed{stakes} wait, \\boxed{races}", "stakes") == 0.0  # last box counts
    assert predictor_reward("the answer is stakes", "stakes") == 0.0
    assert predictor_reward("\\boxed{New {York}}", "New {York}") == 1.0


@pytest.mark.parametrize("rewards, expected", [
    ([0.0] * 8, 0.0),  # nobody solves it: no reward for an impossible mask
    ([1.0] * 8, 0.0),  # everybody solves it: trivial
    ([1.0, 0.0, 0.0, 0.0], 0.75),
    ([1.0, 1.0, 0.0, 0.0], 0.5),
    ([1.0] * 7 + [0.0], 0.125),
    ([1.0] + [0.0] * 7, 0.875),
])
def test_generator_reward_table(rewards, expected):
    assert generator_reward(rewards) == pytest.approx(expected)


def test_generator_reward_needs_samples():
    with pytest.raises(ValueError):
        generator_reward([])


def test_rpt_prefix_reward_hand_boundaries():
    cont = " Paris is the capital"
    bounds = [6, 9, 13]  # " Paris" | " is" | " the"
    assert rpt_prefix_reward("Paris", cont, bounds) == 1.0
    assert rpt_prefix_reward("Paris is", cont, bounds) == 1.0
    assert rpt_prefix_reward("Par", cont, bounds) == 0.0  # a prefix, but mid-token
    assert rpt_prefix_reward("Paris i", cont, bounds) == 0.0
    assert rpt_prefix_reward("London", cont, bounds) == 0.0
    assert rpt_prefix_reward(None, cont, bounds) == 0.0
    assert rpt_prefix_reward("", cont, bounds) == 0.0
    assert rpt_prefix_reward("Paris", cont, bounds, ignore_leading_whitespace=False) == 0.0
    assert rpt_prefix_reward(" Paris", cont, bounds, ignore_leading_whitespace=False) == 1.0
    # bytes, not characters: "é" is two bytes
    assert rpt_prefix_reward("café", " café au", [6, 9]) == 1.0
    assert rpt_prefix_reward("caf", " café au", [6, 9]) == 0.0


def test_rpt_boundaries_from_real_tokenizer():
    tok = tiny_tokenizer()
    text = "Paris is the capital of France, and Berlin is the capital of Germany."
    ids = tok.encode(text)
    pieces = tok.convert_ids_to_tokens(ids)
    start = pieces.index("Ġcapit")  # cut before " capit" "al" " of" ...
    context, cont, bounds = continuation_boundaries(tok, ids, start, max_tokens=4)
    assert context == "Paris is the"
    assert cont == " capital of "  # tokens " capit" "al" " of" " "
    # byte-level BPE: one symbol per byte, so the boundaries are cumulative symbol counts
    assert bounds == [6, 8, 11, 12]
    assert rpt_prefix_reward("capit", cont, bounds) == 1.0  # ends on the " capit" | "al" boundary
    assert rpt_prefix_reward("capital", cont, bounds) == 1.0
    assert rpt_prefix_reward("capi", cont, bounds) == 0.0  # mid-token
    assert rpt_prefix_reward("capital o", cont, bounds) == 0.0
    assert rpt_prefix_reward("capital of", cont, bounds) == 1.0


def test_rpt_boundaries_skip_inside_multibyte_characters():
    tok = tiny_tokenizer()
    ids = tok.encode("the euro sign €.")
    pieces = tok.convert_ids_to_tokens(ids)
    start = pieces.index("Ġâ")  # "€" is 3 bytes split over 3 tokens ("Ġâ" carries the space)
    _, cont, bounds = continuation_boundaries(tok, ids, start, max_tokens=8)
    assert cont == " €."
    assert bounds == [4, 5]
    assert rpt_prefix_reward("€", cont, bounds) == 1.0
