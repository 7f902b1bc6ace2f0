"""Stream raw pages out of the three supported inputs, one page at a time, in bounded memory.

* MediaWiki XML dumps (``.xml``, ``.xml.bz2``; multistream ``.bz2`` files are just concatenated bz2
  streams, which :mod:`bz2` reads transparently), parsed with ``ElementTree.iterparse``; every finished
  page element is cleared so memory stays flat on a 20 GB dump.
* local Hugging Face ``wikimedia/wikipedia`` parquet / arrow files, read with ``datasets`` from disk
  (never the hub); their ``text`` is already plain text, so pages are flagged ``markup=False``.
* JSONL with a ``text`` field and an optional ``title``.

Anything unreadable raises :class:`InputError` naming the file and the position (line/column, page
number or JSONL line), so a broken input is never silently truncated.
"""

from __future__ import annotations

import bz2
import hashlib
import json
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

from megatron_pz.errors import BadInput


class InputError(BadInput, ValueError):
    """An input file cannot be read as what its name says; the message names the file and position."""


@dataclass
class RawPage:
    """One page as found in the input, before any cleaning."""

    title: str
    text: str
    ns: int = 0
    redirect: bool = False
    markup: bool = True  # True: MediaWiki markup; False: already plain text (HF parquet, JSONL)
    source: str = ""  # "file:position", for error messages and skip reports


XML_SUFFIXES = (".xml", ".xml.bz2", ".bz2")
TABLE_SUFFIXES = (".parquet", ".arrow")
JSONL_SUFFIXES = (".jsonl", ".json")


def input_kind(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(JSONL_SUFFIXES) or name.endswith(".jsonl.bz2"):
        return "jsonl"
    if name.endswith(XML_SUFFIXES):
        return "xml"
    if name.endswith(TABLE_SUFFIXES):
        return "table"
    raise InputError(
        f"{path}: unknown input type; expected one of .xml, .xml.bz2, .parquet, .arrow, .jsonl(.bz2)"
    )


def expand_inputs(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Files named directly, plus the supported files inside named directories, in sorted order."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(
                p for p in path.rglob("*") if p.is_file() and _is_supported(p)
            )
            if not found:
                raise InputError(f"{path}: directory holds no .xml/.bz2/.parquet/.arrow/.jsonl files")
            files.extend(found)
        elif path.is_file():
            input_kind(path)
            files.append(path)
        else:
            raise InputError(f"{path}: no such input file or directory")
    return files


def _is_supported(path: Path) -> bool:
    if path.name.lower().endswith(".json"):  # in a folder, plain .json is metadata, not data
        return False
    try:
        input_kind(path)
        return True
    except InputError:
        return False


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def iter_pages(path: Path) -> Iterator[RawPage]:
    """All pages of one input file, in file order."""
    kind = input_kind(path)
    if kind == "xml":
        return _iter_xml(path)
    if kind == "table":
        return _iter_table(path)
    return _iter_jsonl(path)


def _open_binary(path: Path):
    return bz2.open(path, "rb") if path.name.lower().endswith(".bz2") else open(path, "rb")


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _child_text(elem: ET.Element, name: str) -> Optional[str]:
    for child in elem:
        if _local(child.tag) == name:
            return child.text
    return None


def _iter_xml(path: Path) -> Iterator[RawPage]:
    pages = 0
    parser = None
    try:
        with _open_binary(path) as stream:
            parser = ET.iterparse(stream, events=("start", "end"))
            root = None
            for event, elem in parser:
                if root is None:
                    root = elem
                    if _local(root.tag) != "mediawiki":
                        raise InputError(
                            f"{path}: root element is <{_local(root.tag)}>, expected <mediawiki> "
                            "(a MediaWiki XML export)"
                        )
                if event != "end" or _local(elem.tag) != "page":
                    continue
                pages += 1
                yield _page_from_element(elem, path, pages)
                root.clear()  # drop finished pages: bounded memory on any dump size
    except ET.ParseError as err:
        line, col = err.position
        raise InputError(
            f"{path}: malformed XML at line {line}, column {col} (after {pages} complete pages): {err}"
        ) from err
    except (EOFError, OSError) as err:  # truncated or corrupt bz2 stream
        raise InputError(
            f"{path}: compressed stream is truncated or corrupt after {pages} complete pages: {err}"
        ) from err
    if pages == 0:
        raise InputError(f"{path}: XML dump holds no <page> elements (empty dump)")


def _page_from_element(elem: ET.Element, path: Path, number: int) -> RawPage:
    title = _child_text(elem, "title")
    ns_text = _child_text(elem, "ns")
    redirect = any(_local(child.tag) == "redirect" for child in elem)
    text = None
    for child in elem:
        if _local(child.tag) == "revision":
            text = _child_text(child, "text")
    where = f"{path}:page {number}"
    if title is None:
        raise InputError(f"{where}: <page> without <title>")
    try:
        ns = int(ns_text) if ns_text is not None else 0
    except ValueError:
        raise InputError(f"{where} ({title!r}): <ns> is {ns_text!r}, expected an integer") from None
    return RawPage(title=title, text=text or "", ns=ns, redirect=redirect, markup=True, source=where)


def _iter_table(path: Path) -> Iterator[RawPage]:
    """Rows of a local HF ``wikimedia/wikipedia`` parquet/arrow file (``title``, ``text`` columns)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # a local file must never trigger a hub call
    import datasets

    try:
        if path.name.lower().endswith(".arrow"):
            table = datasets.Dataset.from_file(str(path))
        else:
            table = datasets.load_dataset(
                "parquet", data_files=str(path), split="train", streaming=True
            )
        columns = table.column_names
    except Exception as err:  # pyarrow raises many types for a corrupt file
        raise InputError(f"{path}: cannot read as a parquet/arrow table: {err}") from err
    if columns is not None and "text" not in columns:
        raise InputError(f"{path}: table has columns {columns}, expected a 'text' column")
    rows = 0
    try:
        for row in table:
            rows += 1
            yield RawPage(
                title=str(row.get("title") or f"{path.name}#{rows}"),
                text=row["text"] or "",
                markup=False,
                source=f"{path}:row {rows}",
            )
    except InputError:
        raise
    except Exception as err:
        raise InputError(f"{path}: unreadable after row {rows}: {err}") from err
    if rows == 0:
        raise InputError(f"{path}: table holds no rows (empty input)")


def _iter_jsonl(path: Path) -> Iterator[RawPage]:
    lines = 0
    try:
        with _open_binary(path) as f:
            for lineno, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                where = f"{path}:line {lineno}"
                try:
                    record = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError as err:
                    raise InputError(f"{where}: not valid UTF-8 at byte {err.start}") from err
                except json.JSONDecodeError as err:
                    raise InputError(f"{where}, column {err.colno}: not valid JSON: {err.msg}") from err
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise InputError(f"{where}: expected an object with a string field 'text'")
                lines += 1
                yield RawPage(
                    title=str(record.get("title") or f"{path.name}#{lineno}"),
                    text=record["text"],
                    markup=bool(record.get("markup", False)),
                    source=where,
                )
    except (EOFError, OSError) as err:
        raise InputError(f"{path}: compressed stream is truncated or corrupt after {lines} records: {err}") from err
    if lines == 0:
        raise InputError(f"{path}: no JSON records (empty input)")
