"""Instruction counts of a kernel's hot loops from its SASS, for comparing kernels without a GPU.

Input: one function's text from ``nvdisasm -g file.cubin`` (compile with -lineinfo; cut the
function out at its ``//--------------------- .text.<name>`` header).

  python sass_paths.py loops FN.sass [--min 40]
      every loop (a backward branch) of at least --min instructions: its static size, opcode
      histogram and the source lines it comes from;
  python sass_paths.py path FN.sass START BRANCH [FILE:LINE=taken ...]
      the instructions issued by one trip from address START (hex) to the loop's backward
      branch at BRANCH (hex): conditional branches are not taken unless their source line is
      named taken, unconditional ones are followed. Predicated-off instructions still issue,
      so they count. Choose the rules that describe the common path (no NaN in the data,
      no sphere norm, ...) and check the branch decisions printed on stderr.

Caveat when comparing counts: ptxas may split a 32x32->64 IMAD.WIDE into IMAD.HI + IMAD
under register pressure; the two forms cost about the same issue slots.
"""
from __future__ import annotations

import argparse
import collections
import re
import sys


def parse(path: str):
    """[(address, instruction, 'file:line')], {label: index}."""
    ins, labels, src = [], {}, ""
    for line in open(path).read().splitlines():
        m = re.search(r'//## File ".*?/([^/"]+)", line (\d+)', line)
        if m:
            src = f"{m.group(1)}:{m.group(2)}"
            continue
        m = re.match(r"^(\.L_x_\d+):", line.strip())
        if m:
            labels[m.group(1)] = len(ins)
            continue
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if m:
            ins.append((int(m.group(1), 16), m.group(2).strip(), src))
    return ins, labels


def opcode(text: str) -> str:
    return re.sub(r"^@!?U?P\w+\s+", "", text).split()[0].split(".")[0]


def branch_target(text: str):
    m = re.search(r"\bBRA\b.*?\((\.L_x_\d+)\)", text)
    return m.group(1) if m else None


def loops(path: str, minimum: int) -> None:
    ins, labels = parse(path)
    for i, (addr, text, _) in enumerate(ins):
        target = branch_target(text)
        if target is None or target not in labels or labels[target] > i:
            continue
        body = ins[labels[target]: i + 1]
        if len(body) < minimum:
            continue
        print(f"loop {body[0][0]:#x}-{addr:#x}: {len(body)} instructions")
        print("   ", dict(collections.Counter(opcode(t) for _, t, _ in body).most_common()))
        print("    from", dict(collections.Counter(s for _, _, s in body).most_common(8)))


def path(path: str, start: int, back: int, rules: dict[str, str]) -> None:
    ins, labels = parse(path)
    at = {addr: i for i, (addr, _, _) in enumerate(ins)}
    i, ops = at[start], collections.Counter()
    for _ in range(100_000):
        addr, text, src = ins[i]
        ops[opcode(text)] += 1
        if addr == back:
            break
        target = branch_target(text)
        if target is not None:
            conditional = text.startswith("@")
            take = not conditional or rules.get(src) == "taken"
            if conditional:
                print(f"  branch {addr:#x} {src}: {'taken' if take else 'not taken'}", file=sys.stderr)
            if take:
                i = labels[target]
                continue
        i += 1
    else:
        sys.exit("no end: the path loops without reaching BRANCH")
    print(sum(ops.values()), dict(ops.most_common()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("loops")
    a.add_argument("sass")
    a.add_argument("--min", type=int, default=40)
    b = sub.add_parser("path")
    b.add_argument("sass")
    b.add_argument("start")
    b.add_argument("branch")
    b.add_argument("rules", nargs="*", help="FILE:LINE=taken")
    args = ap.parse_args()
    if args.cmd == "loops":
        loops(args.sass, args.min)
    else:
        path(args.sass, int(args.start, 16), int(args.branch, 16),
             dict(r.split("=") for r in args.rules))


if __name__ == "__main__":
    main()
