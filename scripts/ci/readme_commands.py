#!/usr/bin/env python3
"""Print one of the README's two commands, exactly as written, for .ci/run to execute.

CI runs what README.md says rather than a retyped copy, so the two cannot drift apart.
The commands are the fenced ```bash blocks in the section whose heading contains
"two commands" (up to the next heading of the same or a higher level). Anything else
there -- no such heading, other than exactly two fenced blocks, a block that is not
``bash``, an empty block -- is an error: CI must fail loudly rather than run something
other than what a user reads.

Usage: readme_commands.py [--readme PATH] N      (N = 1 or 2; prints block N to stdout)
Standard library only: it runs before any virtual environment exists.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

HEADING_KEY = "two commands"
# CommonMark: up to 3 spaces of indent, then a run of >= 3 backticks or tildes.
FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})\s*([^`\s]*)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")


def fail(msg: str) -> None:
    print(f"readme_commands.py: {msg}", file=sys.stderr)
    sys.exit(2)


def section_blocks(text: str) -> list[tuple[int, str, str]]:
    """(line number, info string, body) of each fenced block in the "two commands" section."""
    in_section, level = False, 0
    found_heading = False
    fence = None  # (marker char, length, info, first line, body lines) while inside a block
    blocks = []
    for no, line in enumerate(text.splitlines(), start=1):
        if fence is not None:
            m = FENCE.match(line)
            # A closing fence: same character, at least as long, nothing after it.
            if m and m.group(1)[0] == fence[0] and len(m.group(1)) >= fence[1] and not m.group(2):
                if in_section:
                    blocks.append((fence[3], fence[2], "\n".join(fence[4])))
                fence = None
            else:
                fence[4].append(line)
            continue
        m = FENCE.match(line)
        if m:
            fence = (m.group(1)[0], len(m.group(1)), m.group(2).lower(), no, [])
            continue
        h = HEADING.match(line)  # only outside fences: "# comment" in a bash block is no heading
        if h:
            if in_section and len(h.group(1)) <= level:
                in_section = False
            if HEADING_KEY in h.group(2).lower():
                if found_heading:
                    fail(f"README has more than one heading containing {HEADING_KEY!r} (line {no})")
                found_heading, in_section, level = True, True, len(h.group(1))
    if fence is not None:
        fail(f"unclosed code fence opened at README line {fence[3]}")
    if not found_heading:
        fail(f"no heading containing {HEADING_KEY!r} in the README")
    return blocks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("n", type=int, choices=(1, 2), help="which command: 1 (install + check) or 2 (tests)")
    ap.add_argument("--readme", default=str(Path(__file__).resolve().parents[2] / "README.md"))
    args = ap.parse_args()
    try:
        text = Path(args.readme).read_text(encoding="utf-8")
    except OSError as e:
        fail(f"cannot read {args.readme}: {e}")
    blocks = section_blocks(text)
    if len(blocks) != 2:
        where = ", ".join(f"line {b[0]}" for b in blocks) or "none"
        fail(f"expected exactly 2 fenced blocks under the {HEADING_KEY!r} heading, found "
             f"{len(blocks)} ({where})")
    for no, info, body in blocks:
        if info != "bash":
            fail(f"the block at README line {no} is tagged {info or '(nothing)'!r}, expected 'bash'")
        if not body.strip():
            fail(f"the block at README line {no} is empty")
    print(blocks[args.n - 1][2])


if __name__ == "__main__":
    main()
