r"""Pull answers out of sampled text: ``\mask{...}`` and ``\boxed{...}`` with nested braces.

Hand-written because a regular expression cannot match balanced braces (``\boxed{\frac{1}{2}}``),
and the few lines of brace counting are simpler than a parser dependency.
"""

from __future__ import annotations

import re


def find_braced(text: str, command: str) -> list[str]:
    r"""Contents of every ``\command{...}`` in ``text``, in order, with nested braces balanced.

    An occurrence whose braces never close is skipped (it is not a parsed answer).
    """
    results = []
    needle = "\\" + command + "{"
    pos = text.find(needle)
    while pos != -1:
        start = pos + len(needle)
        depth = 1
        i = start
        while i < len(text) and depth:
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
            i += 1
        if depth == 0:
            results.append(text[start : i - 1])
            pos = text.find(needle, i)
        else:  # unbalanced: nothing after it can close either
            break
    return results


def extract_boxed(response: str) -> str | None:
    r"""Content of the last ``\boxed{...}`` (the final answer after any reasoning), or None."""
    found = find_braced(response, "boxed")
    return found[-1] if found else None


def parse_mask(response: str, pick: str = "last") -> str | None:
    r"""The span the generator chose: content of the last (or first) ``\mask{...}``, stripped.

    *Paper-silent choice*: with several ``\mask{}`` the last one counts by default, like the last
    ``\boxed{}``: a thinking model may try candidates before its final answer. Returns None when
    there is no complete ``\mask{...}``; an empty span is returned as "" (validation rejects it).
    """
    found = find_braced(response, "mask")
    if not found:
        return None
    return (found[-1] if pick == "last" else found[0]).strip()


_WS = re.compile(r"\s+")


def normalize_answer(text: str) -> str:
    """Whitespace- and case-insensitive form, for the optional lenient predictor reward."""
    return _WS.sub(" ", text).strip().casefold()
