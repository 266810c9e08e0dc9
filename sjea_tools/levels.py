"""Which levels? The one parser of level lists for every command and function.

Spellings accepted everywhere: None or 'all' (every level), an int, '1', '0,1', a list of ints or
strings (a repeatable option). `ordered=True` keeps the order given (a hierarchical search visits
levels in that order); otherwise levels come back sorted. Repeats are refused, and a level the
run or store does not have is a one-line error that lists the levels it has.
"""

from __future__ import annotations

from typing import Iterable, Sequence

from .errors import SjeaError


def _tokens(spec) -> list[str]:
    if isinstance(spec, (int,)) and not isinstance(spec, bool):
        return [str(spec)]
    if isinstance(spec, str):
        return [t for t in spec.replace(" ", "").split(",") if t != ""] if spec.strip() else []
    out: list[str] = []
    for item in spec:
        out.extend(_tokens(item))
    return out


def parse_levels(spec, available: int | Sequence[int], *, option: str = "--level",
                 ordered: bool = False, min_count: int = 1) -> list[int]:
    """The levels `spec` names, checked against `available` (a level count or the list of levels
    a store holds)."""
    have = list(range(available)) if isinstance(available, int) else sorted(int(k) for k in available)
    have_text = ", ".join(map(str, have))
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == "all"):
        return list(have)
    tokens = _tokens(spec)
    if any(t.lower() == "all" for t in tokens):
        if len(tokens) > 1:
            raise SjeaError(f"{option}: 'all' cannot be combined with level numbers; give 'all' or numbers like 0,1.")
        return list(have)
    try:
        levels = [int(t) for t in tokens]
    except ValueError:
        raise SjeaError(f"{option} must be 'all' or level numbers like 0,1, not '{','.join(tokens)}' "
                        f"(levels here: {have_text}).") from None
    if len(levels) < min_count:
        raise SjeaError(f"{option} needs at least {min_count} level(s); levels here: {have_text}.")
    bad = [k for k in levels if k not in have]
    if bad:
        raise SjeaError(f"{option}: level {', '.join(map(str, bad))} does not exist; levels here: {have_text} (or 'all').")
    if len(set(levels)) != len(levels):
        raise SjeaError(f"{option} {','.join(map(str, levels))} repeats a level; give each level once.")
    return levels if ordered else sorted(levels)


def format_levels(levels: Iterable[int]) -> str:
    return ",".join(str(k) for k in levels)
