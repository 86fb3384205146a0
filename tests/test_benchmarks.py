"""The benchmark entry point: runs, prints valid JSON lines, selects by name. No timing assertions."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KEYS = {"name", "value", "unit", "reference", "ratio", "shape", "config"}


def test_entry_point_prints_one_json_line():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "matmul_small", "--json"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stdout  # nothing but the result on stdout
    result = json.loads(lines[0])
    assert set(result) == KEYS
    assert result["name"] == "matmul_small" and result["unit"] == "GFLOP/s"
    assert result["value"] > 0
    assert "loadavg_1m" in result["config"] and "threads" in result["config"]


def test_unknown_name_exits_2():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "no_such_benchmark"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "no benchmark matches" in proc.stderr and "prior_train_small" in proc.stderr


def test_select_names_patterns_prefixes():
    from benchmarks import registry
    from benchmarks.__main__ import select

    known = list(registry())
    for required in ("prior_train_small", "prior_train_paper_stream", "sample_cached_small",
                     "sample_cached_paper_stream", "sample_uncached_small", "dvae_train_tiny", "dvae_encode_tiny",
                     "build_shards", "read_shards", "rerank", "eval"):
        assert required in known
    assert select(["matmul"], known) == ["matmul"]  # an exact name is not also a prefix
    assert select(["sample_cached_*"], known) == ["sample_cached_small", "sample_cached_paper_stream"]
    assert set(select(["prior"], known)) == {k for k in known if k.startswith("prior_")}
    assert "matmul_small" not in select([], known)


def test_result_json_is_strict():
    from benchmarks.common import Result

    r = Result("x", 1234.56789, "img/s", 10.0, 123.456789, {"batch": (4, 2)}, {"nan": float("nan"), "ok": True})
    data = json.loads(r.to_json())
    assert data["value"] == pytest.approx(1234.6) and data["config"]["nan"] is None
    assert data["shape"]["batch"] == [4, 2]


def test_rival_bracket_measures_around_each_comparison():
    """`--rival`: the rival's figure just before and after a benchmark becomes its reference (geometric mean);
    an "after" serves as the next benchmark's "before" only for the same (shape, figure)."""
    from benchmarks import registry
    from benchmarks.common import RIVAL, Result
    from benchmarks.rival import MEASURED, Bracket

    known = registry()
    for name, (key, field, _) in MEASURED.items():
        assert name in known and field in RIVAL[key]
    figures = iter([100.0, 400.0, 900.0, 50.0, 60.0])
    calls = []
    bracket = Bracket(now=lambda key, field: calls.append((key, field)) or next(figures))

    def ours(name, value):
        return lambda: Result(name, value, "tok/s", RIVAL["small"]["train_tok_s"], 1.0, {},
                              {"meets_target": False})

    a = bracket.run("prior_train_small", ours("prior_train_small", 1000.0))
    assert a.reference == pytest.approx(200.0) and a.ratio == pytest.approx(5.0)  # √(100 · 400)
    assert a.config["rival_before"] == 100.0 and a.config["rival_after"] == 400.0
    assert a.config["rival_recorded"] == RIVAL["small"]["train_tok_s"] and a.config["meets_target"] is True
    b = bracket.run("prior_train_small_bf16", ours("prior_train_small_bf16", 1200.0))  # same figure: reuses 400
    assert b.reference == pytest.approx(600.0) and b.config["meets_target"] is True  # √(400 · 900)
    untouched = bracket.run("matmul", ours("matmul", 7.0))
    assert untouched.reference == RIVAL["small"]["train_tok_s"] and "rival_before" not in untouched.config
    c = bracket.run("sample_cached_small", ours("sample_cached_small", 200.0))  # measured afresh after another
    assert c.ratio == pytest.approx(200.0 / (50.0 * 60.0) ** 0.5) and c.config["meets_target"] is False
    assert calls == [("small", "train_tok_s")] * 3 + [("small", "sample_cached_tok_s")] * 2


def test_rival_failure_keeps_our_figure():
    from benchmarks.common import RIVAL, Result
    from benchmarks.rival import Bracket

    def broken(key, field):
        raise MemoryError("rival ran out of memory")

    result = Bracket(now=broken).run("sample_cached_small", lambda: Result(
        "sample_cached_small", 6000.0, "img tok/s", RIVAL["small"]["sample_cached_tok_s"], 4.86, {}, {}))
    assert result.value == 6000.0 and result.reference == RIVAL["small"]["sample_cached_tok_s"]
    assert result.config["rival_error"] == "MemoryError: rival ran out of memory"


def test_rival_missing_is_one_clear_line(monkeypatch):
    from benchmarks import rival
    from benchmarks.__main__ import main

    monkeypatch.setitem(sys.modules, "dalle_pytorch", None)  # import fails as where it is not installed
    assert "make rival-env" in rival.available()
    assert main(["matmul_small", "--rival"]) == 2


@pytest.mark.slow
def test_gpu_script_runs_every_section_in_smoke_mode(tmp_path):
    """benchmarks/gpu.sh is what a lent GPU runs, once, on a budget of minutes: its wrapper and every section
    (ceilings, training eager / fp16 / compiled, sampling eager / compiled, dVAE encode) must run through.
    `--smoke` runs them on tiny shapes on the CPU; the figures themselves mean nothing here."""
    out = tmp_path / "gpu"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "GPU_BENCH_ARGS": "--smoke"}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    report = json.loads((out / "gpu_results.json").read_text())
    rows = report["results"]
    assert not [r for r in rows if "error" in r], rows
    names = {r["name"] for r in rows}
    for expected in ("gpu_matmul_bf16", "gpu_copy_bandwidth", "gpu_prior_train_base_bf16",
                     "gpu_prior_train_base_fp16-resblock", "gpu_prior_train_base_bf16-compiled",
                     "gpu_sample_eager_b1", "gpu_sample_compiled_b1", "gpu_dvae_encode_paper_channels_last"):
        assert expected in names, sorted(names)
    for row in rows:  # the CPU suite's JSON shape, with a positive figure
        assert set(row) == KEYS and row["value"] > 0, row
    jsonl = [json.loads(line) for line in (out / "gpu_results.jsonl").read_text().splitlines()]
    assert [r["name"] for r in jsonl] == [r["name"] for r in rows]  # written as it went, the same rows
    assert (out / "gpu_log.txt").read_text().rstrip().endswith(f"results: {out / 'gpu_results.json'}")
    assert "gpu_sample_compiled_b1" in proc.stdout.split("=" * 100)[-1]  # the table comes last
