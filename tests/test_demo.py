"""`dalle demo`: the whole pipeline at a very small budget, and its resume / refusal logic."""
import json

import pytest

from dallecli.console import UserError
from dallecli.demo import Budget, run_demo


def test_budget_scales_with_minutes():
    ten, twenty = Budget.for_minutes(10), Budget.for_minutes(20)
    assert twenty.prior_steps == 2 * ten.prior_steps and twenty.dvae_steps == 2 * ten.dvae_steps
    assert Budget.for_minutes(0.01).prior_steps >= 20  # never below a run that can save and sample


@pytest.mark.parametrize("data", ["emoji", "shapes"])
def test_the_default_run_is_the_one_make_demo_uses(data, monkeypatch):
    from pathlib import Path

    from typer.testing import CliRunner

    import dallecli.demo
    from dallecli.cli import app

    called = {}
    monkeypatch.setattr(dallecli.demo, "run_demo", lambda data, minutes, run, **kw: called.update(run=run))
    assert CliRunner().invoke(app, ["demo", "--data", data]).exit_code == 0
    assert called["run"] == Path(f"runs/demo-{data}")  # Makefile: RUN ?= runs/demo-$(DATA)


def test_a_font_given_to_the_demo_is_the_one_build_shards_renders_with(tmp_path):
    from typer.testing import CliRunner

    from dallecli.cli import app

    font = tmp_path / "nowhere" / "NotoColorEmoji.ttf"
    result = CliRunner().invoke(app, ["demo", "--run", str(tmp_path / "run"), "--font", str(font), "-q"])
    assert result.exit_code == 2 and f"emoji font not found at {font}" in " ".join(result.output.split())


def test_refuses_another_demo_in_the_same_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "demo.json").write_text(json.dumps({"args": {"data": "emoji", "minutes": 10.0}, "done": {}}))
    with pytest.raises(UserError, match="made with --data emoji, --minutes 10.0; use another --run, the same "
                                        "options, or --fresh"):
        run_demo("shapes", 10.0, run)
    with pytest.raises(UserError, match="--minutes"):
        run_demo("shapes", 0, tmp_path / "other")


def test_fresh_never_deletes_a_folder_the_demo_did_not_make(tmp_path):
    """`--fresh --run DIR` deleted DIR whatever it held (a trained run of one's own, say)."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "important.txt").write_text("keep me")
    for fresh in (True, False):
        with pytest.raises(UserError, match="not a demo run"):
            run_demo("shapes", 10.0, mine, fresh=fresh)
    assert (mine / "important.txt").read_text() == "keep me"


@pytest.mark.parametrize("minutes", [float("nan"), float("inf"), -1.0])
def test_bad_minutes_and_run_paths_are_one_line_errors(tmp_path, minutes):
    with pytest.raises(UserError, match="--minutes must be a positive number"):
        run_demo("shapes", minutes, tmp_path / "run")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(UserError, match="is a file, not a folder"):
        run_demo("shapes", 1.0, a_file)
    bad_state = tmp_path / "bad"
    bad_state.mkdir()
    (bad_state / "demo.json").write_text("[1]")
    with pytest.raises(UserError, match="not a demo state file"):
        run_demo("shapes", 1.0, bad_state)
    assert a_file.read_text() == "x"


@pytest.mark.slow
def test_demo_end_to_end_on_shapes(tmp_path):
    run = tmp_path / "demo"
    rows = run_demo("shapes", 0.05, run)
    samples = run / "samples" / "demo"
    for name in ("index.html", "grid.png", "samples.jsonl"):
        assert (samples / name).exists(), name
    lines = [json.loads(line) for line in (samples / "samples.jsonl").read_text().splitlines()]
    assert {"clip_score", "rank", "kept"} <= set(lines[0])
    metrics = json.loads((run / "eval" / "demo" / "metrics.json").read_text())
    assert set(metrics["composition"]) >= {"seen_single", "zeroshot_single", "relation_seen", "relation_zeroshot"}
    assert "0" in metrics["blur"] and metrics["clip_score"]["generated"] is not None
    state = json.loads((run / "demo.json").read_text())
    assert list(state["done"]) == ["build-shards", "tokenize", "train-dvae", "encode", "train-prior", "train-clip",
                                   "sample", "eval"]
    assert "gallery" in rows
    # A second run skips every finished stage.
    before = (samples / "grid.png").stat().st_mtime_ns
    run_demo("shapes", 0.05, run)
    assert (samples / "grid.png").stat().st_mtime_ns == before


@pytest.mark.parametrize("val,count", [(77, 77), (1000, 100)])
def test_demo_evaluates_all_of_a_small_val_split_without_asking_for_more(tmp_path, monkeypatch, val, count):
    """The emoji world holds ~80 val images: the demo's eval asks for those, not --count 100 (a warning)."""
    import types

    import dallecli.demo as demo
    from dallecli.evaluate.run import FEW_IMAGES

    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "manifest.json").write_text(json.dumps({"counts": {"train": 1500, "val": val}}))
    calls = []
    monkeypatch.setattr(demo, "gallery_clip_check", lambda run: None)
    demo._evaluate("emoji", tmp_path, True, types.SimpleNamespace(command=lambda **kw: calls.append(kw)), {})
    assert calls[0]["count"] == count and count >= FEW_IMAGES  # and no "few images" warning either


def test_minutes_left_follow_the_pace_of_the_finished_stages():
    """The stage header's estimate was the budget alone: "about 9.7 min left" through a 50-minute dVAE stage."""
    from dallecli.demo import _minutes_left

    stages = [("a", 0.3, None), ("b", 0.2, None), ("c", 0.5, None)]
    assert _minutes_left(stages, {}, 10) == pytest.approx(10)
    assert _minutes_left(stages, {"a": 180.0}, 10) == pytest.approx(7)  # on schedule: a took its 3 minutes
    assert _minutes_left(stages, {"a": 720.0}, 10) == pytest.approx(28)  # 4× slower: so will b and c be
    assert _minutes_left(stages, {"a": 720.0, "b": 120.0}, 10) == pytest.approx(5 * 840 / 300)
    assert _minutes_left(stages, {"a": 18.0}, 10) == pytest.approx(7)  # faster: the budget still stands
    small = [("shards", 0.02, None), ("rest", 0.98, None)]
    assert _minutes_left(small, {"shards": 1.0}, 10) == pytest.approx(9.8)  # too little to tell the pace
    # a CPU without native bf16 trains in fp32: 2.5× the plan expected until a training stage shows the pace
    assert _minutes_left(stages, {}, 10, expected_pace=2.5) == pytest.approx(25)
    assert _minutes_left(small, {"shards": 1.0}, 10, expected_pace=2.5) == pytest.approx(24.5)
    assert _minutes_left(stages, {"a": 360.0}, 10, expected_pace=2.5) == pytest.approx(14)  # 2× measured wins
