"""The stages end to end through the command line, on a tiny shapes world, and the refusals between them."""
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from dallecli import checkpoint
from dallecli.cli import app
from dallecli.console import UserError


def invoke(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result


def ok(*args):
    result = invoke(*args)
    assert result.exit_code == 0, f"{args}: {result.output}\n{result.exception!r}"
    return result


@pytest.fixture(scope="module")
def shapes_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("pipeline") / "run"
    ok("build-shards", "--source", "shapes", "--count", 240, "--per-shard", 100, "--run", run, "-q")
    ok("tokenize", "--run", run, "--vocab-size", 300, "-q")
    ok("train-dvae", "--run", run, "--preset", "tiny-vq", "--steps", 3, "--batch-size", 8, "--eval-every", 3,
       "--save-every", 3, "-q")
    ok("encode", "--run", run, "--batch-size", 32, "-q")
    ok("train-prior", "--run", run, "--preset", "tiny", "--steps", 3, "--batch-size", 8, "--eval-every", 3,
       "--save-every", 3, "--warmup", 1, "-q")
    return run


def test_every_stage_writes_its_outputs(shapes_run):
    run = shapes_run
    manifest = json.loads((run / "shards" / "manifest.json").read_text())
    assert manifest["counts"]["train"] + manifest["counts"]["val"] == 240
    assert (run / "tokenizer" / "tokenizer.json").exists()
    dvae = checkpoint.load(run / "dvae", "dvae")
    assert dvae.step == 3 and dvae.has_ema()
    codes = json.loads((run / "codes" / "manifest.json").read_text())
    assert codes["dvae"]["fingerprint"] == dvae.fingerprint and codes["dvae"]["grid"] == 8
    assert codes["counts"]["train"] == manifest["counts"]["train"]
    prior = checkpoint.load(run / "prior", "prior")
    assert prior.meta["dvae_fingerprint"] == dvae.fingerprint
    val = [json.loads(line) for line in (run / "prior" / "metrics.jsonl").read_text().splitlines()
           if json.loads(line)["split"] == "val"]
    assert {"val_text_loss", "val_image_loss"} <= set(val[-1])
    assert any(p.name.startswith("recon-") for p in (run / "dvae").iterdir())


def test_encode_precisions_agree(shapes_run, tmp_path):
    from dallecli.data.records import iter_records, list_shards

    codes = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        ok("encode", "--run", shapes_run, "--out", out, "--precision", precision, "-q")
        assert json.loads((out / "manifest.json").read_text())["precision"] == precision
        codes[precision] = np.concatenate([np.frombuffer(r.members["codes"], "<u2")
                                           for s in list_shards(out, "val") for r in iter_records(s, [])])
    assert codes["fp32"].shape == codes["bf16"].shape and len(codes["fp32"]) > 0
    same = (codes["fp32"] == codes["bf16"]).mean()
    assert same > 0.5  # bf16 moves a code only where two codes are about equally near (fp32 search either way)
    assert invoke("encode", "--run", shapes_run, "--out", tmp_path / "x", "--precision", "fp16").exit_code == 2


def test_sample_and_preview(shapes_run):
    ok("sample", "a red circle", "a blue square above a green cross", "--run", shapes_run, "--n", 2, "--name", "t",
       "--guidance", 2, "-q")
    rows = (shapes_run / "samples" / "t" / "samples.jsonl").read_text().splitlines()
    assert len(rows) == 4
    ok("encode", "--run", shapes_run, "--preview", 4, "-q")
    preview = shapes_run / "dvae" / "preview"
    lines = [json.loads(line) for line in (preview / "preview.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and (preview / lines[0]["reconstruction"]).exists() and (preview / "grid.png").exists()


def test_preview_of_more_images_than_the_val_split_holds_says_so(shapes_run):
    val = json.loads((shapes_run / "shards" / "manifest.json").read_text())["counts"]["val"]
    result = ok("encode", "--run", shapes_run, "--preview", val + 5)
    assert f"hold {val} readable image(s); previewing those" in " ".join(result.output.split())
    lines = (shapes_run / "dvae" / "preview" / "preview.jsonl").read_text().splitlines()
    assert len(lines) == val
    ok("encode", "--run", shapes_run, "--preview", 2, "-q")  # a smaller preview leaves none of the larger's images
    assert sorted(p.name for p in (shapes_run / "dvae" / "preview").iterdir()) == [
        "000-original.png", "000-reconstruction.png", "001-original.png", "001-reconstruction.png", "grid.png",
        "preview.jsonl"]


def test_preview_grid_keeps_originals_above_their_reconstructions(shapes_run, tmp_path):
    from PIL import Image

    ok("encode", "--run", shapes_run, "--preview", 10, "-q")  # 10: a last chunk of 2, not a full row of 8
    preview = shapes_run / "dvae" / "preview"
    sheet = np.asarray(Image.open(preview / "grid.png").convert("RGB"))
    tile = np.asarray(Image.open(preview / "000-original.png").convert("RGB"))
    scale = max(1, 128 // tile.shape[0])
    side, pad = tile.shape[0] * scale, 2
    assert sheet.shape[:2] == (4 * (side + pad) + pad, 8 * (side + pad) + pad)  # 2 pairs of rows of 8

    def cell(row, col):
        y, x = pad + row * (side + pad), pad + col * (side + pad)
        return sheet[y: y + side: scale, x: x + side: scale]

    def png(name):
        return np.asarray(Image.open(preview / name).convert("RGB"))

    for i in range(10):
        row, col = 2 * (i // 8), i % 8
        assert np.array_equal(cell(row, col), png(f"{i:03d}-original.png"))
        assert np.array_equal(cell(row + 1, col), png(f"{i:03d}-reconstruction.png"))
    for row in (2, 3):
        for col in range(2, 8):
            assert (cell(row, col) == 255).all()  # blank, not the next image


def test_prior_refuses_codes_of_another_dvae(shapes_run, tmp_path):
    manifest_path = shapes_run / "codes" / "manifest.json"
    original = manifest_path.read_text()
    manifest = json.loads(original)
    manifest["dvae"]["fingerprint"] = "0123456789abcdef"
    manifest_path.write_text(json.dumps(manifest))
    try:
        result = invoke("train-prior", "--run", shapes_run, "--preset", "tiny", "--steps", 4, "--batch-size", 8)
        assert isinstance(result.exception, UserError)
        assert "dvae_fingerprint mismatch" in str(result.exception)
    finally:
        manifest_path.write_text(original)


def test_dvae_size_mismatch_and_wrong_kind(shapes_run):
    result = invoke("train-dvae", "--run", shapes_run, "--preset", "small", "--out", shapes_run / "other")
    assert isinstance(result.exception, UserError) and "--size 128" in str(result.exception)
    result = invoke("encode", "--run", shapes_run, "--dvae", shapes_run / "prior", "--out", shapes_run / "x")
    assert isinstance(result.exception, UserError)
    assert "is a prior checkpoint, but a dvae checkpoint was expected" in str(result.exception)
    result = invoke("sample", "a red circle", "--run", shapes_run, "--prior", shapes_run / "dvae")
    assert isinstance(result.exception, UserError) and "kind" in str(result.exception)


def test_the_command_line_imports_no_torch_until_a_command_runs():
    """`dalle --help` stays instant: registering the commands imports neither torch nor open_clip."""
    import subprocess
    import sys

    code = "import sys, dallecli.cli; print(sorted(m for m in ('torch', 'open_clip', 'numpy') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr


def test_cli_help_lists_every_command():
    result = ok("--help")
    for name in ("build-shards", "tokenize", "train-dvae", "encode", "train-prior", "sample", "demo"):
        assert name in result.output
    assert ok("--version").output.startswith("dalle ")


def test_preset_choices_are_the_models_presets():
    """`--preset` lists its choices in --help (enums: no torch at registration); they must stay the models'."""
    from dallecli.commands import train_dvae, train_prior
    from dallecli.models import dvae, prior

    assert [p.value for p in train_prior.Preset] == list(prior.PRESETS)
    assert sorted(p.value for p in train_dvae.Preset) == sorted(dvae.PRESETS)
