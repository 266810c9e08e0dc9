"""The one way benchmark scripts write their results into a doc: a block between two markers,
replaced whole (or appended under a heading the first time), written atomically."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sjea_tools.io import atomic_write_text  # noqa: E402


def write_block(path: Path, begin: str, end: str, block: str, heading: str) -> None:
    """Put `block` (which starts with `begin` and ends with `end`) in place of the old one."""
    text = Path(path).read_text()
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + f"\n\n{heading}\n\n" + block + "\n"
    atomic_write_text(path, text)
