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


def provenance(argv: list[str]) -> dict:
    """The command (as typed after `python`), the commit and the date a block records."""
    import subprocess
    import time

    script = Path(argv[0]).resolve().relative_to(Path(__file__).resolve().parents[1])
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                            capture_output=True, text=True).stdout.strip()
    return {"command": " ".join(["python", str(script), *argv[1:]]), "commit": commit, "date": time.strftime("%Y-%m-%d")}


def publish(data: dict, text: str, work: Path, doc: Path | None, begin: str, end: str, heading: str) -> None:
    """Keep the measured data in work/result.json, print the block without its data comment, and
    write it into `doc` when one is given."""
    import json

    work.mkdir(parents=True, exist_ok=True)
    (work / "result.json").write_text(json.dumps(data, indent=1))
    print("\n".join(text.splitlines()[:-2]))  # the last two lines: the data comment and the end marker
    if doc is not None:
        write_block(doc, begin, end, text, heading=heading)
