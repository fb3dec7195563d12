"""Numbers in reports and log lines."""

from __future__ import annotations


def number(x: float | None, spec: str = ".3f") -> str:
    """``x`` formatted with ``spec``; "n/a" for None (a metric that could not be computed,
    e.g. an AUROC on one class)."""
    return "n/a" if x is None else format(x, spec)
