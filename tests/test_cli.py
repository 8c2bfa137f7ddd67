"""``python -m diffkern`` and the family check modules it discovers (diffkern/checks/).

One real run in a subprocess (CPU only, the default quick checks); everything about exit
status and argument errors runs in-process against fake family modules, so it is fast and
does not depend on the real checks passing.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from diffkern import _C, checks
from diffkern.__main__ import main
from diffkern.checks._timing import median_time

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "diffkern", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=os.getcwd())


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "o.json"
    proc = _cli("--device", "cpu", "--json", str(out))
    return proc, out


def test_real_run_passes_and_says_what_it_checks(cpu_run):
    proc, _ = cpu_run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    head = "\n".join(lines[:6])
    assert "diffkern " in lines[0] and "torch " in head, head
    plan = next(line for line in lines[:6] if line.startswith("checking famil"))
    for name in checks.family_names():
        assert name in plan, plan
    assert "on cpu" in plan, plan
    assert "Traceback" not in proc.stderr, proc.stderr


def test_real_run_json_has_rows_of_every_family(cpu_run):
    proc, out = cpu_run
    data = json.loads(out.read_text())
    assert data["failed"] == 0 and data["devices"] == ["cpu"]
    assert data["families"] == checks.family_names()
    for name in checks.family_names():
        rows = [r for r in data["rows"] if r["family"] == name]
        assert rows, f"no rows for family {name}"
        assert any(r["status"] == "ok" for r in rows), f"{name}: no passing check, only info"
        for r in rows:
            assert set(r) >= {"family", "device", "check", "value", "reference", "status"}, r
            assert r["status"] in ("ok", "info"), r
    assert data["seconds"]["total"] > 0


def test_bad_json_path_fails_fast_with_one_line(tmp_path):
    path = str(tmp_path / "missing_dir" / "o.json")
    proc = _cli("--json", path, timeout=60)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "--json" in err[0] and path in err[0], proc.stderr
    assert "checking" not in proc.stdout  # nothing ran
    assert not (tmp_path / "missing_dir").exists()


def test_list_families_json_is_the_plug_contract():
    proc = _cli("--list-families", "--json", "-", timeout=60)
    assert proc.returncode == 0, proc.stderr
    listing = json.loads(proc.stdout)["families"]
    assert [f["name"] for f in listing] == checks.family_names()
    for f in listing:
        # Named like the C++ folder: the C++ benchmarks and the build use that name.
        assert (ROOT / "csrc" / f["name"]).is_dir(), f["name"]
        assert f["sanitizer_workload"], f"{f['name']}: no sanitizer_workload"
        for b in f["gpu_benchmarks"]:
            assert set(b) == {"name", "timeout_s", "argv"}, b
            assert (ROOT / b["argv"][0]).is_file(), b  # the script the GPU check will run
            assert 0 < b["timeout_s"] <= 600, b


def test_every_compiled_family_has_a_check_module():
    assert sorted(_C.FAMILIES) == checks.family_names()


def test_compiled_family_without_check_module_fails(fake_family, capsys):
    fake_family(lambda device, quick: [_row("ok")], compiled=("fake", "ghost"))
    assert main(["--device", "cpu"]) == 1
    out = capsys.readouterr().out
    assert "no check module diffkern/checks/ghost.py" in out
    assert "checks/fake.py" not in out


def test_resolve_names_aliases_and_typos():
    names = checks.family_names()
    assert checks.resolve(None) == names == checks.resolve("all")
    assert checks.resolve("none") == []
    assert checks.resolve("ot") == ["sinkhorn"]
    assert checks.resolve("sinkhorn,log_bessel") == sorted(["sinkhorn", "log_bessel"])
    with pytest.raises(ValueError, match="unknown family sinkhron"):
        checks.resolve("sinkhron")


# ------------------------------------------------------------- in-process, fake families
def _fake(run):
    module = types.ModuleType("diffkern.checks.fake")
    module.run = run
    return module


@pytest.fixture
def fake_family(monkeypatch):
    """Replace discovery by one family 'fake' whose run() is given by the test."""
    def install(run, compiled=("fake",)):
        module = _fake(run)
        monkeypatch.setattr(checks, "family_names", lambda: ["fake"])
        monkeypatch.setattr(checks, "load", lambda name: module)
        monkeypatch.setattr(_C, "FAMILIES", tuple(compiled))  # what the build reports
        return module
    return install


def _row(status):
    return dict(check="c", value=1.0, reference="r", status=status)


@pytest.mark.parametrize("run, want", [
    (lambda device, quick: [_row("ok"), _row("info")], 0),
    (lambda device, quick: [_row("ok"), _row("fail")], 1),
    (lambda device, quick: [_row("FAIL")], 1),
    (lambda device, quick: [_row("weird")], 1),
    (lambda device, quick: [], 1),
    (lambda device, quick: 1 / 0, 1),
], ids=["pass", "fail", "upper-case FAIL", "unknown status", "no rows", "raises"])
def test_exit_status_follows_rows(fake_family, capsys, run, want):
    fake_family(run)
    assert main(["--device", "cpu"]) == want
    out = capsys.readouterr().out
    assert "checking family fake on cpu" in out


def test_failure_reaches_json_and_other_families_still_run(monkeypatch, tmp_path):
    good = _fake(lambda device, quick: [_row("ok")])
    bad = _fake(lambda device, quick: 1 / 0)
    monkeypatch.setattr(checks, "family_names", lambda: ["a_bad", "b_good"])
    monkeypatch.setattr(checks, "load", lambda name: bad if name == "a_bad" else good)
    monkeypatch.setattr(_C, "FAMILIES", ("a_bad", "b_good"))
    out = tmp_path / "o.json"
    assert main(["--device", "cpu", "--json", str(out)]) == 1
    data = json.loads(out.read_text())
    assert data["failed"] == 1
    by_family = {r["family"]: r for r in data["rows"]}
    assert by_family["a_bad"]["status"] == "error"
    assert "ZeroDivisionError" in by_family["a_bad"]["value"]
    assert by_family["b_good"]["status"] == "ok"


@pytest.mark.parametrize("where", ["missing dir", "a directory", "read-only dir"])
def test_bad_json_path_runs_nothing(fake_family, capsys, tmp_path, where):
    called = []
    fake_family(lambda device, quick: called.append(device) or [_row("ok")])
    path = {"missing dir": tmp_path / "no" / "o.json", "a directory": tmp_path,
            "read-only dir": tmp_path / "ro" / "o.json"}[where]
    if where == "read-only dir":
        path.parent.mkdir()
        path.parent.chmod(0o500)
        if os.access(path.parent, os.W_OK):  # root ignores permission bits
            pytest.skip("running as root: a read-only directory is still writable")
    assert main(["--json", str(path)]) == 2
    assert called == []
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("python -m diffkern: error: --json"), err
    assert str(path) in err[0]


def test_unknown_family_is_one_line(capsys):
    assert main(["--families", "nosuch"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nosuch" in err[0] and "sinkhorn" in err[0], err


def test_cuda_requested_without_usable_gpu_is_one_line(capsys):
    usable = torch.cuda.is_available() and __import__("diffkern").build_info()["cuda"]
    if usable:
        pytest.skip("a usable GPU is present: --device cuda is valid here")
    assert main(["--device", "cuda", "--families", "none"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--device cuda" in err[0], err


def test_nan_values_give_strict_json(fake_family, tmp_path):
    fake_family(lambda device, quick: [dict(check="c", value=float("nan"), reference="",
                                            status="fail")])
    out = tmp_path / "o.json"
    assert main(["--device", "cpu", "--json", str(out)]) == 1
    data = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"literal {c}"))
    assert data["rows"][0]["value"] == "nan"


def test_median_time_rejects_no_repeats():
    with pytest.raises(ValueError, match="repeats"):
        median_time(lambda: None, "cpu", repeats=0)
    calls = []
    median_time(lambda: calls.append(1), "cpu", repeats=3, warmup=2)
    assert len(calls) == 5


@pytest.mark.parametrize("name", checks.family_names())
def test_sanitizer_workload_runs(name, device):
    """The workloads compute-sanitizer runs must pass without it, too (and on the CPU, so
    a change of an op's signature breaks CI, not the next GPU check)."""
    assert checks.load(name).sanitizer_workload(device) > 0
