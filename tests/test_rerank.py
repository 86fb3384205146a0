"""Reranking: scores and ranks written back into samples.jsonl, missing images, the ranked grid, the command."""
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from dallecli.console import UserError
from dallecli.rerank import rank_rows, ranked_grid, read_samples, rerank_samples

AXES = {"red": 0, "green": 1, "blue": 2}


class ColourScorer:
    """A stand-in CLIP whose order is known: an image's feature is its mean colour, a prompt's is its colour axis.
    The cosine of an image with "red" is R / |RGB|."""

    name = "colour-stub"
    batch_size = 2  # several batches even for a handful of images

    def image_features(self, images):
        x = torch.stack([torch.tensor(im.resize((1, 1), Image.BOX).getpixel((0, 0)), dtype=torch.float) + 1e-3
                         for im in images])
        return x / x.norm(dim=-1, keepdim=True)

    def text_features(self, texts):
        return torch.eye(3)[[AXES[t] for t in texts]]


def expected_cosine(rgb, prompt):
    v = torch.tensor(rgb, dtype=torch.float) + 1e-3
    return float(v[AXES[prompt]] / v.norm())


# (prompt, colour) per sample, interleaved so that order preservation is tested.
SAMPLES = [("red", (120, 100, 100)), ("blue", (0, 0, 255)), ("red", (255, 0, 0)), ("blue", (100, 100, 200)),
           ("red", (200, 50, 50)), ("blue", (200, 0, 0)), ("red", (0, 255, 0))]


def make_samples(folder, samples=SAMPLES):
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (prompt, rgb) in enumerate(samples):
        Image.new("RGB", (16, 16), rgb).save(folder / f"{i:03d}.png")
        lines.append(json.dumps({"prompt": prompt, "image": f"{i:03d}.png", "seed": 7, "index": i,
                                 "logprob": -float(i), "extra": {"kept_by_user": i}}))
    (folder / "samples.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "samples.jsonl"


def test_rerank_ranks_per_prompt_and_keeps_everything_else(tmp_path):
    path = make_samples(tmp_path / "s")
    before = read_samples(path)
    rows = rerank_samples(path, ColourScorer(), keep=2)
    after = read_samples(path)
    assert after == rows and len(after) == len(SAMPLES)
    for old, new, (prompt, rgb) in zip(before, after, SAMPLES):
        assert {k: new[k] for k in old} == old  # every field kept, in order
        assert list(new)[:len(old)] == list(old)
        assert new["clip_score"] == pytest.approx(expected_cosine(rgb, prompt), abs=1e-5)
        assert new["clip"] == "colour-stub"
    # red: pure red, (200,50,50), (120,100,100), pure green; blue: pure blue, (100,100,200), pure red.
    assert [r["rank"] for r in after] == [3, 1, 1, 2, 2, 3, 4]
    assert [r["kept"] for r in after] == [False, True, True, True, True, False, False]
    assert sorted(p.name for p in path.parent.iterdir() if p.name.startswith(".")) == []  # no temporary left


def test_rerank_without_keep_leaves_kept_alone(tmp_path):
    path = make_samples(tmp_path / "s")
    rerank_samples(path, ColourScorer(), keep=1)
    rows = rerank_samples(path, ColourScorer())
    assert sum(r["kept"] for r in rows) == 2 and all("rank" in r for r in rows)


def test_ties_keep_file_order():
    rows = [{"prompt": "p", "clip_score": 0.5}, {"prompt": "p", "clip_score": 0.7}, {"prompt": "p", "clip_score": 0.5}]
    rank_rows(rows)
    assert [r["rank"] for r in rows] == [2, 1, 3]


def test_missing_images_are_counted_then_refused(tmp_path, capsys):
    path = make_samples(tmp_path / "s")
    (path.parent / "003.png").unlink()
    rows = rerank_samples(path, ColourScorer(), max_missing=0.2)
    assert rows[3]["clip_score"] is None and rows[3]["rank"] is None
    assert [r["rank"] for r in rows if r["prompt"] == "blue"] == [1, None, 2]
    assert "1 of 7 images listed" in capsys.readouterr().err
    (path.parent / "000.png").unlink()
    (path.parent / "001.png").write_bytes(b"not a png")
    text = path.read_text()
    with pytest.raises(UserError, match=r"3 of 7 images .* missing or unreadable .*more than 20%: nothing was written"):
        rerank_samples(path, ColourScorer(), max_missing=0.2)
    assert path.read_text() == text


def test_a_decompression_bomb_counts_as_unreadable(tmp_path, monkeypatch):
    """A tiny file that claims far more pixels than Pillow allows is a missing image, not a traceback."""
    from PIL import Image

    path = make_samples(tmp_path / "s")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 256)  # the 16 × 16 samples pass; 64 × 64 is over twice the limit
    Image.new("RGB", (64, 64)).save(path.parent / "003.png")
    rows = rerank_samples(path, ColourScorer(), max_missing=0.99)
    assert rows[3]["clip_score"] is None


def test_bad_samples_file_names_the_line(tmp_path):
    path = tmp_path / "samples.jsonl"
    path.write_text('{"prompt": "a", "image": "0.png"}\n{"prompt": "b"}\n')
    with pytest.raises(UserError, match=r"samples.jsonl:2: expected an object with a \"prompt\" and an \"image\""):
        read_samples(path)
    path.write_text("{oops\n")
    with pytest.raises(UserError, match=r"samples.jsonl:1: not valid JSON"):
        read_samples(path)
    with pytest.raises(UserError, match="no samples file"):
        read_samples(tmp_path / "nope.jsonl")


def test_ranked_grid_has_a_row_per_prompt(tmp_path):
    path = make_samples(tmp_path / "s")
    rows = rerank_samples(path, ColourScorer())
    sheet = ranked_grid(rows, path.parent, cols=3, tile=32)
    full = ranked_grid(rows, path.parent, cols=8, tile=32)
    assert sheet.width == full.width - 32 - 2  # red has 4 samples, cut to 3 (+ the prompt tile)
    assert sheet.height == full.height and sheet.height < 2 * (32 + 3 * 11 + 4) + 10  # two rows
    # The first image after the prompt tile is red's best: pure red.
    assert sheet.getpixel((2 + 32 + 2 + 16, 2 + 16)) == (255, 0, 0)


def _app():
    import typer

    from dallecli.commands import rerank

    app = typer.Typer()
    app.callback()(lambda: None)
    app.command("rerank")(rerank.command)
    return app


@pytest.fixture
def stub_clip(monkeypatch):
    import dallecli.models.clip as clip

    seen = {}

    def load(spec, run_dir, device="cpu", **kw):
        seen.update(spec=spec, run_dir=run_dir, **kw)
        return ColourScorer()

    monkeypatch.setattr(clip, "load_clip", load)
    return seen


def test_command_reranks_the_newest_samples_and_writes_the_grid(tmp_path, stub_clip):
    from typer.testing import CliRunner

    path = make_samples(tmp_path / "run" / "samples" / "20250101-000000")
    result = CliRunner().invoke(_app(), ["rerank", "--run", str(tmp_path / "run"), "--keep", "1", "--quiet"])
    assert result.exit_code == 0, result.output
    assert stub_clip["spec"] is None and stub_clip["run_dir"] == tmp_path / "run"
    rows = read_samples(path)
    assert [r["rank"] for r in rows] == [3, 1, 1, 2, 2, 3, 4] and sum(r["kept"] for r in rows) == 2
    assert Image.open(path.parent / "ranked.png").size[0] > 0
    assert "rerank: done" in result.output


def test_the_newest_samples_are_the_last_drawn_not_the_last_reranked(tmp_path):
    import os

    from dallecli.commands.rerank import _samples_path

    root = tmp_path / "run" / "samples"
    old, new = make_samples(root / "old"), make_samples(root / "new")
    for t, path in enumerate((old, new)):
        (path.parent / "sampling.json").write_text("{}")
        os.utime(path.parent / "sampling.json", (1000 + t, 1000 + t))
    os.utime(old, (5000, 5000))  # the older folder reranked since: its samples.jsonl rewritten
    assert _samples_path(None, root) == new
    (new.parent / "sampling.json").unlink()  # no sampling.json: samples.jsonl's time
    os.utime(new, (500, 500))
    assert _samples_path(None, root) == old


def test_a_sample_folder_without_run_is_ranked_by_its_own_runs_clip(tmp_path, stub_clip, monkeypatch):
    """`dalle rerank runs/x/samples/NAME` used runs/default's CLIP (and failed where there is none)."""
    from typer.testing import CliRunner

    folder = tmp_path / "runs" / "x" / "samples" / "20250101-000000"
    make_samples(folder)
    monkeypatch.chdir(tmp_path)
    assert CliRunner().invoke(_app(), ["rerank", str(folder), "--quiet"]).exit_code == 0
    assert stub_clip["run_dir"].resolve() == tmp_path / "runs" / "x"
    link = tmp_path / "elsewhere"  # a link to the folder: the run is still found
    link.symlink_to(folder, target_is_directory=True)
    assert CliRunner().invoke(_app(), ["rerank", str(link), "--quiet"]).exit_code == 0
    assert stub_clip["run_dir"].resolve() == tmp_path / "runs" / "x"
    assert CliRunner().invoke(_app(), ["rerank", str(folder), "--run", "runs/default", "--quiet"]).exit_code == 0
    assert stub_clip["run_dir"] == Path("runs/default")  # an explicit --run wins
    assert CliRunner().invoke(_app(), ["rerank", str(folder), "--clip", "local-dir:x", "--quiet"]).exit_code == 0
    assert stub_clip["run_dir"] == Path("runs/default")  # --clip names the CLIP: the run is not needed


def test_command_ranks_a_folder_against_a_prompt(tmp_path, stub_clip):
    from typer.testing import CliRunner

    folder = tmp_path / "imgs"
    folder.mkdir()
    for name, rgb in (("a.png", (0, 0, 255)), ("b.png", (255, 0, 0)), ("c.jpg", (200, 40, 40))):
        Image.new("RGB", (20, 30), rgb).save(folder / name)
    args = ["rerank", "--images", str(folder), "--prompt", "red", "--clip", "x.safetensors", "--clip-model", "m", "-q"]
    result = CliRunner().invoke(_app(), args)
    assert result.exit_code == 0, result.output
    assert stub_clip["spec"] == "x.safetensors" and stub_clip["model"] == "m"
    rows = read_samples(folder / "samples.jsonl")
    assert [(r["image"], r["rank"]) for r in rows] == [("a.png", 3), ("b.png", 1), ("c.jpg", 2)]
    assert (folder / "ranked.png").is_file()
    again = CliRunner().invoke(_app(), args)  # a second time would overwrite: refused
    assert again.exit_code != 0 and "already has a samples.jsonl" in str(again.exception)


def test_rerank_with_a_real_tiny_clip(tmp_path):
    """End to end with open_clip: ranks follow the scorer's own pairwise scores."""
    from dallecli.models.clip import ClipScorer, architecture, default_preprocess, model_from_config, tokenizer_for

    torch.manual_seed(0)
    cfg = architecture("dalle-tiny")
    scorer = ClipScorer(model=model_from_config(cfg).eval(), tokenizer=tokenizer_for(cfg),
                        preprocess_cfg=default_preprocess(cfg), device=torch.device("cpu"), name="tiny", batch_size=3)
    samples = [("a red square", (250, 0, 0)), ("a blue square", (0, 0, 250)), ("a red square", (0, 200, 0)),
               ("a red square", (90, 90, 90)), ("a blue square", (200, 200, 0))]
    path = make_samples(tmp_path / "s", samples)
    rows = rerank_samples(path, scorer)
    images = [Image.open(path.parent / r["image"]) for r in rows]
    scores = scorer.score(images, [r["prompt"] for r in rows])
    assert [r["clip_score"] for r in rows] == pytest.approx(scores.tolist(), abs=1e-5)
    for prompt in ("a red square", "a blue square"):
        mine = [(r["rank"], r["clip_score"]) for r in rows if r["prompt"] == prompt]
        assert [s for _, s in sorted(mine)] == sorted((s for _, s in mine), reverse=True)


@pytest.fixture
def tiny_clip_run(tmp_path):
    """A run whose RUN/clip holds one complete dalle-tiny checkpoint (random weights)."""
    from dallecli import checkpoint
    from dallecli.models.clip import architecture, default_preprocess, model_from_config

    cfg = architecture("dalle-tiny")
    torch.manual_seed(0)
    step = checkpoint.save(tmp_path / "run" / "clip", 1, kind="clip", weights=model_from_config(cfg).state_dict(),
                           model_config={"name": "dalle-tiny", "model_cfg": cfg, "preprocess_cfg": default_preprocess(cfg)})
    return tmp_path / "run", step


@pytest.mark.parametrize("which", ["weights file", "step folder", "run's own"])
def test_clip_model_that_the_checkpoint_contradicts_is_refused(tiny_clip_run, stub_clip, which):
    """P12: a file inside one of our checkpoint folders (or the folder) carries its own architecture; a different
    --clip-model is an error naming both, before any CLIP is loaded."""
    from typer.testing import CliRunner

    run, step = tiny_clip_run
    path = make_samples(run / "samples" / "a")
    clip = {"weights file": ["--clip", str(step / "model.safetensors")], "step folder": ["--clip", str(step)],
            "run's own": []}[which]
    result = CliRunner().invoke(_app(), ["rerank", str(path), "--run", str(run), *clip, "--clip-model", "ViT-B-32", "-q"])
    assert result.exit_code != 0 and isinstance(result.exception, UserError)
    text = str(result.exception)
    assert "dalle-tiny" in text and "ViT-B-32" in text and "--clip-model" in text and "\n" not in text
    assert stub_clip == {} and "rank" not in read_samples(path)[0]
    same = CliRunner().invoke(_app(), ["rerank", str(path), "--run", str(run), *clip, "--clip-model", "dalle-tiny", "-q"])
    assert same.exit_code == 0, same.output  # agreeing with the checkpoint is fine


def test_clip_model_is_checked_against_named_clips(tmp_path):
    from dallecli.rerank import check_clip_model

    check_clip_model(None, None, tmp_path)
    check_clip_model(str(tmp_path / "bare.safetensors"), "ViT-B-32", tmp_path)  # missing: load_clip says so
    (tmp_path / "bare.safetensors").write_bytes(b"")
    check_clip_model(str(tmp_path / "bare.safetensors"), "ViT-B-32", tmp_path)  # a bare file: its architecture
    check_clip_model("ViT-B-32:openai", "ViT-B-32", tmp_path)
    with pytest.raises(UserError, match="ViT-B-32:openai is the architecture ViT-B-32, but --clip-model says RN50"):
        check_clip_model("ViT-B-32:openai", "RN50", tmp_path)
    with pytest.raises(UserError, match="carries its own architecture"):
        check_clip_model("hf-hub:org/repo", "RN50", tmp_path)


def test_rerank_with_the_checkpoint_file_and_its_own_architecture_loads_it(tiny_clip_run):
    """The real loader, end to end: --clip FILE-in-checkpoint --clip-model (its own name) ranks the samples."""
    from typer.testing import CliRunner

    run, step = tiny_clip_run
    path = make_samples(run / "samples" / "a")
    result = CliRunner().invoke(_app(), ["rerank", str(path), "--run", str(run), "--clip",
                                         str(step / "model.safetensors"), "--clip-model", "dalle-tiny", "--cpu", "-q"])
    assert result.exit_code == 0, result.output
    assert all(r["clip"].endswith("(dalle-tiny)") for r in read_samples(path))


def test_command_writes_a_folders_ranking_to_out_and_never_replaces_files(tmp_path, stub_clip):
    from typer.testing import CliRunner

    folder = tmp_path / "photos"
    folder.mkdir()
    for name, rgb in (("a.png", (0, 0, 255)), ("b.png", (255, 0, 0))):
        Image.new("RGB", (20, 30), rgb).save(folder / name)
    out = tmp_path / "ranking"
    args = ["rerank", "--images", str(folder), "--prompt", "red", "--clip", "x.safetensors", "-q"]
    result = CliRunner().invoke(_app(), args + ["--out", str(out)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in folder.iterdir()) == ["a.png", "b.png"]  # the user's folder is left alone
    rows = read_samples(out / "samples.jsonl")
    assert [(r["image"], r["rank"]) for r in rows] == [("../photos/a.png", 2), ("../photos/b.png", 1)]
    assert (out / "ranked.png").is_file()
    again = CliRunner().invoke(_app(), args + ["--out", str(out)])
    assert again.exit_code != 0 and "already has a samples.jsonl" in str(again.exception)
    # A ranked.png of the user's own in the folder written to is not replaced either.
    Image.new("RGB", (4, 4)).save(folder / "ranked.png")
    mine = (folder / "ranked.png").read_bytes()
    refused = CliRunner().invoke(_app(), args)
    assert refused.exit_code != 0 and "already has a ranked.png" in str(refused.exception)
    assert (folder / "ranked.png").read_bytes() == mine and not (folder / "samples.jsonl").exists()
    wrong = CliRunner().invoke(_app(), ["rerank", str(out), "--out", str(tmp_path / "x"), "-q"])
    assert wrong.exit_code != 0 and "--out goes with --images" in str(wrong.exception)


def test_a_sample_folders_grid_is_not_a_candidate_and_bad_flags_are_named(tmp_path, stub_clip):
    from typer.testing import CliRunner

    folder = tmp_path / "s"
    make_samples(folder)
    (folder / "sampling.json").write_text("{}")
    Image.new("RGB", (48, 16), (255, 0, 0)).save(folder / "grid.png")  # the sampler's contact sheet
    out = tmp_path / "ranking"
    args = ["rerank", "--images", str(folder), "--prompt", "red", "--clip", "x.safetensors"]
    result = CliRunner().invoke(_app(), [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    images = [r["image"] for r in read_samples(out / "samples.jsonl")]
    assert len(images) == len(SAMPLES) and not [i for i in images if i.endswith("grid.png")]
    assert "not scoring grid.png" in result.output
    # A folder of the user's own keeps its grid.png as a candidate.
    (folder / "sampling.json").unlink()
    (folder / "samples.jsonl").unlink()
    mine = CliRunner().invoke(_app(), [*args, "--out", str(tmp_path / "mine"), "-q"])
    assert mine.exit_code == 0 and len(read_samples(tmp_path / "mine" / "samples.jsonl")) == len(SAMPLES) + 1
    for flags, message in ((["--images", str(folder / "000.png")], "--images"), (["--cols", "0"], "--cols"),
                           (["--batch-size", "0"], "--batch-size"), (["--max-missing", "2"], "--max-missing")):
        base = ["rerank", "--images", str(folder), "--prompt", "red", "--out", str(tmp_path / "x")]
        bad = CliRunner().invoke(_app(), [*base, *flags] if flags[0] != "--images" else
                                 ["rerank", *flags, "--prompt", "red"])
        assert isinstance(bad.exception, UserError) and str(bad.exception).startswith(message), str(bad.exception)


def test_a_refused_rerank_into_a_new_out_folder_leaves_no_folder(tmp_path, stub_clip):
    from typer.testing import CliRunner

    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("a.png", "b.png"):
        (folder / name).write_bytes(b"not a picture")
    out = tmp_path / "ranking"
    result = CliRunner().invoke(_app(), ["rerank", "--images", str(folder), "--prompt", "red", "--out", str(out),
                                         "--clip", "x.safetensors", "-q"])
    assert isinstance(result.exception, UserError) and "nothing was written" in str(result.exception)
    assert not out.exists()


def test_a_rerank_without_keep_moves_the_kept_marks_with_the_new_order():
    """rerank --keep 1, then rerank again by another CLIP without --keep: still one kept per prompt, and it is
    the new rank 1 (not the old one, now ranked lower)."""
    rows = [{"prompt": "p", "image": f"{i}.png", "clip_score": s} for i, s in enumerate([0.1, 0.9, 0.5])]
    rank_rows(rows, keep=1)
    assert [r["kept"] for r in rows] == [False, True, False]
    for row, new in zip(rows, [0.8, 0.2, 0.3]):  # another CLIP's scores
        row["clip_score"] = new
    rank_rows(rows)
    assert [(r["rank"], r["kept"]) for r in rows] == [(1, True), (3, False), (2, False)]
    fresh = [{"prompt": "p", "image": "a.png", "clip_score": 0.5}]
    rank_rows(fresh)
    assert "kept" not in fresh[0]  # never marked: still unmarked


def test_reranking_a_sample_folder_redraws_its_gallery_best_first(tmp_path, stub_clip):
    """A `dalle sample` folder (index.html and grid.png beside samples.jsonl): rerank writes its gallery again in
    the new order, not only ranked.png. A folder of the user's own images never gets one; an empty --prompt is
    refused."""
    from typer.testing import CliRunner

    path = make_samples(tmp_path / "s")
    (path.parent / "index.html").write_text("old gallery")
    (path.parent / "grid.png").write_bytes(b"old grid")
    result = CliRunner().invoke(_app(), ["rerank", str(path.parent), "--keep", "1", "-q"])
    assert result.exit_code == 0, result.output
    page = (path.parent / "index.html").read_text()
    assert page != "old gallery" and Image.open(path.parent / "grid.png").size[0] > 0
    best = [r["image"] for r in read_samples(path) if r["rank"] == 1]
    assert all(image in page for image in best)

    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (20, 30), (255, 0, 0)).save(folder / "a.png")
    empty = CliRunner().invoke(_app(), ["rerank", "--images", str(folder), "--prompt", "  ", "-q"])
    assert isinstance(empty.exception, UserError) and "empty --prompt" in str(empty.exception)
    assert not (folder / "samples.jsonl").exists()


def test_one_caption_asked_twice_is_ranked_as_two_prompts():
    """Rows with prompt_index (what the sampler writes): one caption given as two prompts is two groups, each
    keeping its own mark, not one pooled group whose best two could both land in the first."""
    rows = [{"prompt": "a red circle", "prompt_index": i, "index": j, "image": f"{i}{j}.png", "clip_score": s,
             "kept": j == 0} for i, scores in enumerate([(0.9, 0.8), (0.2, 0.1)]) for j, s in enumerate(scores)]
    rank_rows(rows)
    assert [(r["prompt_index"], r["rank"], r["kept"]) for r in rows] == [(0, 1, True), (0, 2, False),
                                                                       (1, 1, True), (1, 2, False)]


def test_rewritten_samples_jsonl_and_feature_caches_read_like_other_files(tmp_path):
    """A rerank rewrote samples.jsonl owner-only (0600), so a gallery served to others could not fetch it;
    eval's feature caches were 0600 too."""
    import stat

    from dallecli.evaluate.fid import save_cached
    from dallecli.rerank import write_samples

    import os

    old = os.umask(0o022)  # the usual umask: files 0644 (under 077 the bug would not show)
    try:
        write_samples(tmp_path / "samples.jsonl", [{"prompt": "a", "image": "a.png"}])
        cache = save_cached(tmp_path / "cache", "k", {"x": torch.zeros(2)}, {"what": "test"})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "samples.jsonl").stat().st_mode) == 0o644
    assert stat.S_IMODE(cache.stat().st_mode) == 0o644


def test_a_samples_file_that_is_not_utf8_is_one_error(tmp_path):
    path = tmp_path / "samples.jsonl"
    path.write_bytes('{"prompt": "caf\u00e9", "image": "a.png"}\n'.encode("latin-1"))
    with pytest.raises(UserError, match="is not UTF-8 text; save it as UTF-8"):
        read_samples(path)
