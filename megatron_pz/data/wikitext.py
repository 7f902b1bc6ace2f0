"""Wikitext -> prose straight from mwparserfromhell's token stream, without building its node tree.

``clean.py`` needs only the text, the template names and the tag/link names, and all of them are in
the flat token list the (C) tokenizer returns. Building the tree on top of it costs several times the
tokenizing (a Python object per node, a lazy import per node), so :func:`render` walks the tokens
instead, with the same rules as ``clean._render``. Whatever the walk does not follow (markup inside a
link title, template name or tag name; a token out of place) raises :class:`Unhandled`, and the
caller falls back to the tree walk, so the output never differs.
"""

from __future__ import annotations

from typing import Callable

from mwparserfromhell.nodes import HTMLEntity
from mwparserfromhell.parser import tokens as T

try:
    from mwparserfromhell.parser._tokenizer import CTokenizer as _Tokenizer
except ImportError:  # pure-Python build of mwparserfromhell
    from mwparserfromhell.parser.tokenizer import Tokenizer as _Tokenizer

# Opening token -> the closing token(s) that end its node.
_CLOSERS = {
    T.TemplateOpen: (T.TemplateClose,),
    T.ArgumentOpen: (T.ArgumentClose,),
    T.WikilinkOpen: (T.WikilinkClose,),
    T.ExternalLinkOpen: (T.ExternalLinkClose,),
    T.HTMLEntityStart: (T.HTMLEntityEnd,),
    T.HeadingStart: (T.HeadingEnd,),
    T.CommentStart: (T.CommentEnd,),
    T.TagOpenOpen: (T.TagCloseSelfclose, T.TagCloseClose),
}
_CLOSING = frozenset(c for closers in _CLOSERS.values() for c in closers)
_TAG_PARTS = (T.TagAttrStart, T.TagCloseOpen, T.TagOpenClose)


class Unhandled(Exception):
    """Token layout the walk does not follow; use the tree walk."""


def render(
    wikitext: str,
    out: list[str],
    templates: set[str],
    dropped_tags: frozenset[str],
    newline_tags: frozenset[str],
    link_dropped: Callable[[str], bool],
) -> None:
    """Append the prose of ``wikitext`` to ``out`` and its template names to ``templates``."""
    tokens = _Tokenizer().tokenize(wikitext, 0, False)
    _Walk(tokens, out, templates, dropped_tags, newline_tags, link_dropped).run(0, len(tokens))


def _matches(tokens: list) -> list[int]:
    """Index of the closing token of each opening token (-1 for every other token)."""
    match = [-1] * len(tokens)
    stack: list[int] = []
    for i, token in enumerate(tokens):
        kind = type(token)
        if kind in _CLOSERS:
            stack.append(i)
        elif kind in _CLOSING:
            if not stack or kind not in _CLOSERS[type(tokens[stack[-1]])]:
                raise Unhandled(f"unbalanced {kind.__name__}")
            match[stack.pop()] = i
    if stack:
        raise Unhandled("unclosed node")
    return match


class _Walk:
    """One page's tokens, with the index of each node's closing token to skip or bound it."""

    def __init__(self, tokens, out, templates, dropped_tags, newline_tags, link_dropped):
        self.tokens = tokens
        self.match = _matches(tokens)
        self.out = out
        self.templates = templates
        self.dropped_tags = dropped_tags
        self.newline_tags = newline_tags
        self.link_dropped = link_dropped

    def run(self, i: int, end: int) -> None:
        tokens, match, out = self.tokens, self.match, self.out
        while i < end:
            token = tokens[i]
            kind = type(token)
            if kind is T.Text:
                out.append(token["text"])
                i += 1
                continue
            j = match[i]
            if j < 0:
                raise Unhandled(f"stray {kind.__name__}")
            if kind is T.WikilinkOpen:
                sep = self._first(i + 1, j, (T.WikilinkSeparator,))
                title = self._plain(i + 1, sep)
                if not self.link_dropped(title.strip().lower()):
                    if sep < j:
                        self.run(sep + 1, j)
                    else:
                        out.append(title.split("#")[0])
            elif kind is T.TemplateOpen:
                name_end = self._first(i + 1, j, (T.TemplateParamSeparator,))
                self.templates.add(self._plain(i + 1, name_end).strip().lower())
            elif kind is T.TagOpenOpen:
                self._tag(i, j)
            elif kind is T.ExternalLinkOpen:
                sep = self._first(i + 1, j, (T.ExternalLinkSeparator,))
                if sep < j:
                    self.run(sep + 1, j)
            elif kind is T.HeadingStart:
                out.append("\n")
            elif kind is T.HTMLEntityStart:
                out.append(self._entity(i, j).normalize())
            # comments and arguments: nothing
            i = j + 1

    def _tag(self, i: int, j: int) -> None:
        parts = self._top(i + 1, j, _TAG_PARTS)
        kinds = [type(self.tokens[k]) for k in parts]
        n_attrs = kinds.count(T.TagAttrStart)
        rest = kinds[n_attrs:]
        if kinds[:n_attrs] != [T.TagAttrStart] * n_attrs:
            raise Unhandled("tag attribute inside the tag's contents")
        self_closing = type(self.tokens[j]) is T.TagCloseSelfclose
        if rest not in (([],) if self_closing else ([T.TagCloseOpen], [T.TagCloseOpen, T.TagOpenClose])):
            raise Unhandled("tag layout")
        name_end = parts[0] if parts else j
        name = self._plain(i + 1, name_end).strip().lower()
        if name in self.dropped_tags:
            return
        if name in self.newline_tags:
            self.out.append("\n")
        if len(rest) == 2:
            self.run(parts[n_attrs] + 1, parts[n_attrs + 1])

    def _entity(self, i: int, j: int) -> HTMLEntity:
        """The node mwparserfromhell's builder makes of these tokens."""
        inner = self.tokens[i + 1:j]
        if type(inner[0]) is not T.HTMLEntityNumeric:
            return HTMLEntity(inner[0].text, named=True, hexadecimal=False)
        if type(inner[1]) is T.HTMLEntityHex:
            return HTMLEntity(inner[2].text, named=False, hexadecimal=True, hex_char=inner[1].char)
        return HTMLEntity(inner[1].text, named=False, hexadecimal=False)

    def _top(self, start: int, end: int, kinds: tuple) -> list[int]:
        """Indices in [start, end) of the tokens of ``kinds`` outside nested nodes."""
        found, k, match, tokens = [], start, self.match, self.tokens
        while k < end:
            if type(tokens[k]) in kinds:
                found.append(k)
            k = match[k] + 1 if match[k] >= 0 else k + 1
        return found

    def _first(self, start: int, end: int, kinds: tuple) -> int:
        """First index in [start, end) of a token of ``kinds`` outside nested nodes, else ``end``."""
        k, match, tokens = start, self.match, self.tokens
        while k < end:
            if type(tokens[k]) in kinds:
                return k
            k = match[k] + 1 if match[k] >= 0 else k + 1
        return end

    def _plain(self, start: int, end: int) -> str:
        """The source text of tokens [start, end), which may hold only text and HTML entities."""
        pieces, k = [], start
        while k < end:
            token = self.tokens[k]
            if type(token) is T.Text:
                pieces.append(token["text"])
                k += 1
            elif type(token) is T.HTMLEntityStart:  # "35&nbsp;mm film"
                pieces.append(str(self._entity(k, self.match[k])))
                k = self.match[k] + 1
            else:
                raise Unhandled("markup inside a name")
        return "".join(pieces)
