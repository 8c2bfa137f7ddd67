#!/usr/bin/env python3
"""Check a built diffkern wheel for what the "one wheel for any torch >= 2.4" claim rests on.

- The compiled module links no libtorch/libc10 (and no shared CUDA runtime, no libpython):
  it talks to torch only through DLPack, so any torch version can load it.
- The wheel is tagged for what it is: a compiled CPython extension, so a platform wheel
  (Root-Is-Purelib: false), tagged for the interpreter that built it (cpXY-cpXY, or
  cpXY-abi3 should the module ever use the stable ABI) and a Linux platform, never
  py3-none-any.
- Its run-time requirements are pyproject.toml's (torch, and nothing that crept in).

Usage: check_wheel.py WHEEL      (run with the interpreter the wheel was built for)
Standard library plus binutils' readelf.
"""
from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from email.parser import Parser
from pathlib import Path

FORBIDDEN = re.compile(r"^(libtorch|libc10|libcudart\.so|libpython)")


def fail(msg: str) -> None:
    print(f"check_wheel.py: FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


def main() -> None:
    if len(sys.argv) != 2:
        fail("usage: check_wheel.py WHEEL")
    wheel = Path(sys.argv[1])
    # name-version(-build)?-python-abi-platform.whl
    parts = wheel.name[:-len(".whl")].split("-")
    if not wheel.name.endswith(".whl") or len(parts) not in (5, 6):
        fail(f"{wheel.name} is not a wheel file name")
    py, abi, plat = parts[-3:]
    here = f"cp{sys.version_info.major}{sys.version_info.minor}"
    print(f"wheel tag: {py}-{abi}-{plat} (interpreter: {here})")
    if py != here or abi not in (here, "abi3"):
        fail(f"tag {py}-{abi} does not match the building interpreter {here}")
    if not (plat.startswith("linux_") or plat.startswith("manylinux")):
        fail(f"platform tag {plat!r} is not a Linux platform tag")

    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        info_dir = next(n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info"))
        meta_wheel = Parser().parsestr(zf.read(f"{info_dir}/WHEEL").decode())
        meta = Parser().parsestr(zf.read(f"{info_dir}/METADATA").decode())
        if meta_wheel["Root-Is-Purelib"].strip().lower() != "false":
            fail("Root-Is-Purelib is not false for a wheel with a compiled module")
        tags = meta_wheel.get_all("Tag") or []
        if f"{py}-{abi}-{plat}" not in tags:
            fail(f"WHEEL's Tag lines {tags} do not include the file name's tag")
        requires = [r.split(";")[0].replace(" ", "") for r in meta.get_all("Requires-Dist") or []
                    if "extra ==" not in r]
        print(f"runtime requirements: {requires}")
        pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
        declared = [r.replace(" ", "") for r in
                    tomllib.loads(pyproject.read_text())["project"]["dependencies"]]
        if sorted(requires) != sorted(declared):
            fail(f"the wheel requires {requires}, pyproject.toml declares {declared}")
        modules = [n for n in names if re.fullmatch(r"diffkern/_C\..*\.so", n)]
        if len(modules) != 1:
            fail(f"expected one compiled module diffkern/_C.*.so, found {modules}")
        with tempfile.TemporaryDirectory() as tmp:
            so = zf.extract(modules[0], tmp)
            dyn = subprocess.run(["readelf", "-d", so], check=True, capture_output=True, text=True).stdout
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", dyn)
    print(f"{modules[0]} NEEDED: {' '.join(needed)}")
    bad = [n for n in needed if FORBIDDEN.match(n)]
    if bad:
        fail(f"the compiled module links {bad}: the wheel would be tied to one torch/CUDA/Python build")
    print("check_wheel.py: ok")


if __name__ == "__main__":
    main()
