"""Readable lab names from a MEDS root's ``metadata/codes.parquet`` (its ``description``
column), for reports and plots.

A name is the dataset's description kept as written (free text), with the code's unit in
brackets when the code carries one the description does not mention (``LAB//50912//mg/dL`` +
"Creatinine" -> "Creatinine [mg/dL]"); a code without a description is named by the code itself.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from cvmae_jax.data import meds

CODES_FILE = "metadata/codes.parquet"
UNKNOWN_UNITS = ("", "UNK")  # a code's last part that says nothing about the unit
SHORT_WIDTH = 36  # characters of a name on a plot's axis


def read_descriptions(meds_dir: str | Path, codes: Sequence[str]) -> tuple[str | None, ...]:
    """The description of each of ``codes`` in ``meds_dir/metadata/codes.parquet``; None where
    the file, its ``code`` or ``description`` column, the code's row or its value is missing
    (a code listed twice takes its first non-empty description)."""
    path = Path(meds_dir) / CODES_FILE
    if not path.is_file():
        return (None,) * len(codes)
    try:
        names = pq.read_schema(path).names
        if "code" not in names or "description" not in names:
            return (None,) * len(codes)
        table = meds.read_parquet_file(path, columns=["code", "description"])
    except (pa.ArrowException, OSError) as e:
        raise meds.MEDSFormatError(f"{path}: not a readable Parquet file ({e})") from None
    wanted, found = set(codes), {}
    for code, text in zip(table["code"].to_pylist(), table["description"].to_pylist()):
        text = None if text is None else str(text).strip()
        if code in wanted and text and code not in found:
            found[code] = text
    return tuple(found.get(c) for c in codes)


def lab_name(code: str, description) -> str:
    """The readable name of ``code``: its description, plus `` [unit]`` when the code has a
    unit the description does not contain; the code itself without a description (None, empty,
    or not text: a JSON reader may turn the text "nan" into a float)."""
    if not isinstance(description, str) or not description:
        return code
    unit = meds.code_unit(code)
    if unit in UNKNOWN_UNITS or _mentions(description, unit):
        return description
    return f"{description} [{unit}]"


def _mentions(text: str, unit: str) -> bool:
    """True when ``unit`` occurs in ``text`` as a whole word ("L" is not in "Lactate")."""
    return re.search(rf"(?<![\w/]){re.escape(unit)}(?![\w/])", text) is not None


def lab_names(codes: Sequence[str], descriptions: Sequence[str | None]) -> tuple[str, ...]:
    """``lab_name`` of each code with the description at the same position."""
    return tuple(lab_name(c, d) for c, d in zip(codes, descriptions, strict=True))


def short_name(name: str, code: str, width: int = SHORT_WIDTH) -> str:
    """``name`` cut to at most ``width`` characters for a plot's axis, keeping the code's unit
    visible: "Creatinine [Blood, Chemistry] (hosp labevents itemid 50912); unit mg/dL" ->
    "Creatinine [Blood, Chemistr… [mg/dL]"."""
    if len(name) <= width:
        return name
    unit = meds.code_unit(code)
    tail = "" if unit in UNKNOWN_UNITS else f" [{unit}]"
    return name[:max(width - len(tail) - 1, 1)].rstrip() + "…" + tail


def markdown_cell(name: str) -> str:
    """``name`` inside a Markdown table cell: on one line, a `|` of the free text escaped (it
    would end the cell)."""
    return " ".join(name.splitlines()).replace("|", "\\|")
