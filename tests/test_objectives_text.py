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
    # "at" only occurs inside cat/sat/mat/cat: not a whole word
    assert validate_mask(TEXT, "at", CFG) == (False, "absent")
    assert validate_mask(TEXT, "at", ObjectiveConfig(whole_words_only=False)) == (True, "ok")
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
    assert mask_passage("concatenate a cat", "cat") == "concatenate a [mask]"
    assert mask_passage("concatenate a cat", "cat", whole_words_only=False) == "con[mask]enate a [mask]"
    assert mask_passage("born (1905) in Ulm", "(1905)") == "born [mask] in Ulm"
    assert mask_passage("a \\1 b", "\\1") == "a [mask] b"  # no regex escapes leak into the output
    with pytest.raises(ValueError, match="does not occur"):
        mask_passage(TEXT, "dog")
    prompt = build_predictor_prompt("The [mask] sat.")
    assert prompt.startswith("There is a passage with masked words by [mask]: The [mask] sat.")
    assert prompt.endswith("put the predicted masked words within \\boxed{}.")


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
