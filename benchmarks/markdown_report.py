"""Write a benchmark's results into its own section of BENCHMARKS.md (regenerated, never typed)."""

from __future__ import annotations

import os
from pathlib import Path


def replace_section(path: Path, heading: str, section: str) -> None:
    """Replace the `heading` section of `path` (up to the next ``## ``), or append it.

    Args:
        path: the Markdown file (created when missing).
        heading: the section's heading line, e.g. ``## FAISS alone``.
        section: the new section, starting with that heading.
    """
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.strip() == heading.strip()), None)
    if start is None:
        new = text.rstrip("\n") + "\n\n" + section
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        tail = "".join(lines[end:])
        new = "".join(lines[:start]) + section + ("\n" + tail if tail else "")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(new, encoding="utf-8")
    os.replace(tmp, path)


def replace_block(path: Path, name: str, text: str) -> None:
    """Replace what lies between ``<!-- {name}:start -->`` and ``<!-- {name}:end -->`` in `path`.

    Args:
        path: a Markdown file holding both markers (e.g. README.md).
        name: the block's name.
        text: the new content (generated, never typed).
    """
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    content = path.read_text(encoding="utf-8")
    if start not in content or end not in content:
        raise SystemExit(f"{path} has no {start} ... {end} block to replace")
    head, rest = content.split(start, 1)
    _, tail = rest.split(end, 1)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(f"{head}{start}\n{text}{end}{tail}", encoding="utf-8")
    os.replace(tmp, path)
