"""Sampling: filtering, the cache against the uncached reference, seeds, guidance, image prompts, outputs."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from dallecli.cli import app
from dallecli.console import UserError
from dallecli.sample import (SamplingConfig, generate_codes, load_pipeline, sample_to_folder, top_k_filter,
                             top_p_filter)


def test_top_k_and_top_p_on_hand_made_logits():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(top_k_filter(logits, 2)[0, 2:]).all() and torch.isfinite(top_k_filter(logits, 2)[0, :2]).all()
    kept = torch.isfinite(top_p_filter(logits, 0.8))[0].tolist()
    assert kept == [True, True, False, False]  # 0.5 + 0.3 reaches 0.8
    assert torch.isfinite(top_p_filter(logits, 0.81))[0].tolist() == [True, True, True, False]
    assert torch.isfinite(top_p_filter(logits, 0.1))[0].tolist() == [True, False, False, False]  # best always kept
    assert torch.equal(top_p_filter(logits, 1.0), logits) and torch.equal(top_k_filter(logits, None), logits)


@pytest.fixture
def pipe(tiny_run):
    return load_pipeline(tiny_run, device="cpu")


def _text(pipe, captions):
    from dallecli.sample import encode_prompts

    return encode_prompts(pipe, captions)


@pytest.mark.parametrize("packed", [True, False])
def test_cache_matches_uncached_reference(pipe, packed, monkeypatch):
    import dallecli.models.cpu_decode as cpu_decode

    if not packed:  # a torch without oneDNN's packed linear: model.decode_step
        monkeypatch.setattr(cpu_decode, "packed_linear_available", lambda: False)
    text = _text(pipe, ["a red circle", "a blue square above a green cross"])
    greedy = SamplingConfig(top_k=1)
    cached, lp1 = generate_codes(pipe.prior, text, [0, 1], greedy, precision="fp32")
    reference, lp2 = generate_codes(pipe.prior, text, [0, 1], greedy, uncached=True, precision="fp32")
    assert torch.equal(cached, reference)
    assert torch.allclose(lp1, lp2, atol=1e-4)


def test_bf16_sampling_stays_close_to_fp32(pipe):
    text = _text(pipe, ["a red circle", "a blue square above a green cross"])
    greedy = SamplingConfig(top_k=1)
    fp32, lp32 = generate_codes(pipe.prior, text, [0, 1], greedy, precision="fp32")
    bf16, lp16 = generate_codes(pipe.prior, text, [0, 1], greedy, precision="bf16")
    assert bf16.shape == fp32.shape and (bf16 == fp32).float().mean() > 0.9  # near-ties may flip
    assert torch.allclose(lp16, lp32, rtol=0.05)


def test_uniform_noise_is_uniform_independent_and_a_function_of_the_seed():
    from dallecli.sample import uniform_noise

    seeds = torch.arange(256, dtype=torch.int64) * 7919 + 3
    u = uniform_noise(seeds, 1024)  # (images, tokens)
    assert u.shape == (256, 1024) and u.dtype == torch.float32
    assert 0 < u.min() and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.005 and abs(u.var().item() - 1 / 12) < 0.002
    counts = torch.histc(u, bins=16, min=0, max=1)
    expected = u.numel() / 16
    assert ((counts - expected) ** 2 / expected).sum().item() < 60  # chi-square, 15 d.o.f. (p ≈ 1e-6)
    for a, b in ((u[:, :-1], u[:, 1:]), (u[:-1], u[1:])):  # neighbouring tokens, neighbouring seeds
        assert abs(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()) < 0.01
    assert torch.equal(uniform_noise(seeds[10:11], 1024), u[10:11])  # a row alone is the same row
    assert torch.equal(uniform_noise(seeds, 64), u[:, :64])  # a shorter image: the same first tokens
    assert not torch.equal(uniform_noise(seeds + 1, 1024), u)
    big = torch.tensor([2**40 + 3, 3])  # the high 32 bits of a seed count
    assert not torch.equal(uniform_noise(big, 8)[0], uniform_noise(big, 8)[1])


def test_draws_follow_the_distribution():
    from dallecli.sample import _draw, uniform_noise

    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -30.0]]).expand(20000, -1)
    tokens, logp = _draw(logits, SamplingConfig(), uniform_noise(torch.arange(20000), 1)[:, 0])
    freq = torch.bincount(tokens, minlength=5).float() / 20000
    assert torch.allclose(freq, logits[0].softmax(-1), atol=0.012)
    assert torch.allclose(logp, logits[0].log_softmax(-1)[tokens])
    masked = torch.tensor([[float("-inf"), 1.0, float("-inf"), 0.0, float("-inf")]]).expand(20000, -1)
    tokens, _ = _draw(masked, SamplingConfig(), uniform_noise(torch.arange(20000), 1)[:, 0])
    assert set(tokens.tolist()) == {1, 3}  # zero-probability codes, the first and the last included, never drawn


def test_compiled_decoder_gives_the_same_images(pipe, monkeypatch):
    import dallecli.sample as sample

    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: module)  # the plumbing; compiling is a GPU matter
    text = _text(pipe, ["a red circle", "a blue square above a green cross"])
    cfg = SamplingConfig(guidance=2.0)
    plain, lp1 = generate_codes(pipe.prior, text, [3, 4], cfg, precision="fp32")
    compiled, lp2 = generate_codes(pipe.prior, text, [3, 4], cfg, compiled=True, precision="fp32")
    assert torch.equal(plain, compiled) and torch.allclose(lp1, lp2, atol=1e-4)
    held = pipe.prior.__dict__["_compiled_decoder"]
    again, _ = generate_codes(pipe.prior, text, [3, 4], cfg, compiled=True, precision="fp32")  # the held decoder
    assert torch.equal(again, plain) and pipe.prior.__dict__["_compiled_decoder"] is held
    assert "_compiled_decoder" not in "".join(pipe.prior.state_dict())
    sample.generate_codes(pipe.prior, text[:1], [5], cfg, compiled=True, precision="fp32")  # another batch size
    assert pipe.prior.__dict__["_compiled_decoder"] is not held


def test_the_decode_step_traces_as_one_graph(pipe, monkeypatch):
    """What --compile needs on any device: dynamo traces the whole decode step (fullgraph=True), the CPU's
    oneDNN linear layers included. Dynamo's eager backend checks the tracing without a C compiler."""
    real_compile = torch.compile

    def traced(module, **kwargs):
        kwargs.pop("mode", None)
        return real_compile(module, **kwargs, backend="eager")

    monkeypatch.setattr(torch, "compile", traced)
    pipe.prior.__dict__.pop("_compiled_decoder", None)
    text = _text(pipe, ["a red circle"])
    try:
        plain, _ = generate_codes(pipe.prior, text, [7], SamplingConfig(), precision="fp32")
        compiled, _ = generate_codes(pipe.prior, text, [7], SamplingConfig(), compiled=True, precision="fp32")
    finally:
        pipe.prior.__dict__.pop("_compiled_decoder", None)
        torch._dynamo.reset()
    assert torch.equal(plain, compiled)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_seeds_reproduce_and_regenerate_alone(pipe, precision):
    text = _text(pipe, ["a red circle", "a red circle", "a green cross"])
    cfg = SamplingConfig()
    a, _ = generate_codes(pipe.prior, text, [5, 6, 7], cfg, precision=precision)
    b, _ = generate_codes(pipe.prior, text, [5, 6, 7], cfg, precision=precision)
    assert torch.equal(a, b)
    alone, _ = generate_codes(pipe.prior, text[1:2], [6], cfg, precision=precision)  # image 1, drawn by itself
    assert torch.equal(alone[0], a[1])
    assert not torch.equal(a[0], a[1])  # same caption, different seeds


def test_guidance_one_equals_plain(pipe):
    text = _text(pipe, ["a red circle", "a blue cross"])
    plain, _ = generate_codes(pipe.prior, text, [3, 4], SamplingConfig())
    guided, _ = generate_codes(pipe.prior, text, [3, 4], SamplingConfig(guidance=1.0))
    assert torch.equal(plain, guided)
    strong, _ = generate_codes(pipe.prior, text, [3, 4], SamplingConfig(guidance=3.0))
    assert strong.shape == plain.shape


def test_image_prompt_keeps_its_rows(pipe):
    text = _text(pipe, ["a red circle"] * 2)
    grid = pipe.prior.config.grid
    prompt = torch.arange(2 * grid).remainder(pipe.prior.config.image_vocab)[None].expand(2, -1)
    codes, _ = generate_codes(pipe.prior, text, [0, 1], SamplingConfig(), prompt=prompt)
    assert torch.equal(codes[:, : 2 * grid], prompt)


def test_an_image_prompt_with_transparency_is_read_on_white(pipe, tmp_path):
    from dallecli.sample import image_prompt_codes

    size = pipe.dvae.config.image_size
    rgba = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    rgba.paste((0, 90, 200, 255), (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
    rgba.save(tmp_path / "prompt.png")
    Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB").save(tmp_path / "white.png")
    Image.alpha_composite(Image.new("RGBA", rgba.size, "black"), rgba).convert("RGB").save(tmp_path / "black.png")
    codes = [image_prompt_codes(pipe, tmp_path / f"{name}.png", rows=2) for name in ("prompt", "white", "black")]
    assert torch.equal(codes[0], codes[1]) and not torch.equal(codes[0], codes[2])


def test_guidance_warns_when_the_prior_never_dropped_its_caption(tiny_run, capsys):
    from dallecli import checkpoint

    ck = checkpoint.load(tiny_run / "prior", "prior")
    for drop in (0.0, 0.1):
        checkpoint.save(tiny_run / f"prior-{drop}", 1, kind="prior", model_config=ck.model_config,
                        weights=ck.weights(ema=False), meta={**ck.meta, "cond_drop": drop})
        for guidance in (1.0, 2.0):
            sample_to_folder(tiny_run, ["a red circle"], n=1, prior=tiny_run / f"prior-{drop}", guidance=guidance,
                             name=f"g{drop}-{guidance}", device="cpu")
            warned = "trained with --cond-drop 0" in capsys.readouterr().err
            assert warned == (drop == 0.0 and guidance != 1.0), (drop, guidance)


def test_a_long_prompt_is_cut_with_a_warning_that_shows_where(pipe, capsys):
    from dallecli.sample import encode_prompts

    prompt = "a cyan square and more words here to make it long enough"
    ids = encode_prompts(pipe, [prompt])[0]
    n = pipe.prior.config.text_len
    assert (ids != pipe.tokenizer.pad_id).sum() == n  # cut to the model's text length
    err = " ".join(capsys.readouterr().err.split())
    kept = pipe.tokenizer.decode(pipe.tokenizer.encode(prompt)[:n]).strip()
    assert f"prompt longer than {n} tokens: cut after {kept!r}" in err
    dropped = err.split(", '")[1].split("' dropped")[0]
    assert (kept + dropped).replace(" ", "") == prompt.replace(" ", "")  # kept + dropped = the prompt


def test_sample_to_folder_writes_everything(tiny_run):
    path = sample_to_folder(tiny_run, ["a red circle", "a green cross"], n=3, seed=10, batch_size=4, name="t",
                            device="cpu", quiet=True)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["prompt"], r["index"], r["seed"]) for r in rows] == [
        ("a red circle", 0, 10), ("a red circle", 1, 11), ("a red circle", 2, 12),
        ("a green cross", 0, 13), ("a green cross", 1, 14), ("a green cross", 2, 15)]
    folder = path.parent
    assert folder == tiny_run / "samples" / "t"
    for r in rows:
        assert Image.open(folder / r["image"]).size == (16, 16)
        assert isinstance(r["logprob"], float) and r["logprob"] < 0
    assert (folder / "grid.png").exists()
    page = (folder / "index.html").read_text()
    assert "a green cross" in page and "000-002.png" in page
    # The same command again gives the same pictures; one image alone is regenerated from its seed.
    again = sample_to_folder(tiny_run, ["a green cross"], n=1, seed=14, name="u", device="cpu", quiet=True)
    one = json.loads(again.read_text().splitlines()[0])
    assert (again.parent / one["image"]).read_bytes() == (folder / "001-001.png").read_bytes()
    # sampling.json: what it takes, besides each image's seed, to draw them again
    settings = json.loads((folder / "sampling.json").read_text())
    assert {k: settings[k] for k in ("n", "seed", "batch_size", "temperature", "guidance", "prompts")} == {
        "n": 3, "seed": 10, "batch_size": 4, "temperature": 1.0, "guidance": 1.0, "prompts": 2}
    assert settings["prior"].endswith("step-00000001") and settings["precision"] in ("bf16", "fp32")


def test_images_are_decoded_one_at_a_time(tiny_run, monkeypatch):
    """A convolution's last bit can depend on the batch it runs in; the sampler decodes each image alone so
    that an image regenerated by itself is the same file."""
    from dallecli import codes

    sizes = []
    real = codes.codes_to_images

    def spy(model, c, batch_size=64):
        sizes.append(batch_size)
        return real(model, c, batch_size=batch_size)

    monkeypatch.setattr(codes, "codes_to_images", spy)
    sample_to_folder(tiny_run, ["a red circle"], n=3, batch_size=3, name="one-by-one", device="cpu", quiet=True)
    assert sizes == [1]


def test_bad_sampling_options(tiny_run):
    for kwargs, message in [({"top_p": 0.0}, "--top-p"), ({"top_k": 0}, "--top-k"), ({"rerank": 5, "n": 2}, "--rerank"),
                            ({"temperature": 0}, "--temperature")]:
        with pytest.raises(UserError, match=message):
            sample_to_folder(tiny_run, ["a red circle"], device="cpu", quiet=True, **kwargs)
    with pytest.raises(UserError, match="empty prompt"):
        sample_to_folder(tiny_run, ["  "], device="cpu", quiet=True)
    not_image = tiny_run / "x.png"
    not_image.write_text("hello")
    with pytest.raises(UserError, match="not a readable image"):
        sample_to_folder(tiny_run, ["a red circle"], device="cpu", quiet=True, image_prompt=not_image, prompt_rows=1)


def test_long_prompt_is_cut_with_a_warning(tiny_run, capsys):
    path = sample_to_folder(tiny_run, ["a red circle above a blue square " * 4], n=1, device="cpu", quiet=True)
    assert path.exists()
    assert "longer than 8 tokens: cut after" in capsys.readouterr().err


def test_compile_on_a_cpu_says_the_default_is_faster(tiny_run, capsys, monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: module)  # the warning, not the compiling
    path = sample_to_folder(tiny_run, ["a red circle"], n=1, device="cpu", quiet=True, compiled=True)
    assert path.exists()
    assert "--compile on a CPU" in capsys.readouterr().err


def test_cli_sample_and_errors(tiny_run):
    runner = CliRunner()
    result = runner.invoke(app, ["sample", "a red circle", "--run", str(tiny_run), "--n", "2", "--name", "cli", "-q"])
    assert result.exit_code == 0, result.output
    assert len((tiny_run / "samples" / "cli" / "samples.jsonl").read_text().splitlines()) == 2
    missing = runner.invoke(app, ["sample", "x", "--run", str(tiny_run / "nope")])
    assert isinstance(missing.exception, UserError) and "dalle train-prior" in str(missing.exception)


def test_mismatched_dvae_is_refused(tiny_run, tmp_path):
    from tests.conftest import make_tiny_run

    other = make_tiny_run(tmp_path / "other", grid=4, vocab=32)
    # Another dVAE with the same shape but other weights: the fingerprint check must catch it.
    from dallecli import checkpoint

    ck = checkpoint.load(other / "dvae", "dvae")
    weights = {k: v + 1 if v.is_floating_point() else v for k, v in ck.weights().items()}
    checkpoint.save(other / "dvae2", 1, kind="dvae", model_config=ck.model_config, weights=weights)
    with pytest.raises(UserError, match="dvae_fingerprint mismatch"):
        load_pipeline(tiny_run, dvae=other / "dvae2", device="cpu")
    # Sampling suggests the flags it has (no --fresh there).
    with pytest.raises(UserError, match="--dvae") as err:
        load_pipeline(tiny_run, dvae=other / "dvae2", device="cpu")
    assert "--fresh to start over" not in str(err.value)


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_an_existing_samples_folder_is_kept_unless_overwrite(tiny_run):
    runner = CliRunner()
    base = ["sample", "--run", str(tiny_run), "--n", "2", "--name", "s1", "-q"]
    assert runner.invoke(app, [*base[:1], "a red circle", *base[1:]]).exit_code == 0
    folder = tiny_run / "samples" / "s1"
    before = _files(folder)
    # The same name again: refused, nothing touched.
    again = runner.invoke(app, [*base[:1], "a green cross", *base[1:]])
    assert isinstance(again.exception, UserError) and "--overwrite" in str(again.exception)
    assert _files(folder) == before
    # --overwrite, but the command fails (a CLIP that does not exist): checked before drawing, old folder intact.
    bad = runner.invoke(app, [*base[:1], "a green cross", *base[1:], "--overwrite", "--rerank", "1",
                              "--clip", str(tiny_run / "no-such-clip")])
    assert isinstance(bad.exception, UserError) and "no-such-clip" in str(bad.exception)
    assert _files(folder) == before and not (tiny_run / "samples" / ".s1.replaced").exists()
    fresh = runner.invoke(app, ["sample", "a green cross", "--run", str(tiny_run), "--name", "s2", "--rerank", "1",
                                "--clip", str(tiny_run / "no-such-clip"), "-q"])
    assert isinstance(fresh.exception, UserError) and not (tiny_run / "samples" / "s2").exists()  # nothing drawn
    # --overwrite that succeeds replaces the folder whole: no image of the old run is left behind.
    ok = runner.invoke(app, [*base[:1], "a green cross", *base[1:], "--n", "1", "--overwrite"])
    assert ok.exit_code == 0, ok.output
    rows = [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["a green cross"]
    assert sorted(p.name for p in folder.glob("*.png") if p.name != "grid.png") == ["000-000.png"]
    assert not (tiny_run / "samples" / ".s1.replaced").exists()


def test_samples_without_a_name_started_in_the_same_second_get_folders_of_their_own(tiny_run, monkeypatch):
    """The default name is the date and time: a second command in the same second takes NAME-2, never the first
    one's folder; a failed command's claimed folder goes."""
    import datetime as dt

    from dallecli.commands.common import ReplacedFolder, claim_new_folder

    class Frozen(dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2030, 1, 2, 3, 4, 5)

    monkeypatch.setattr(dt, "datetime", Frozen)
    root = tiny_run / "samples"
    assert [claim_new_folder(root)[0] for _ in range(3)] == [
        "20300102-030405", "20300102-030405-2", "20300102-030405-3"]
    runner = CliRunner()
    for prompt in ("a red circle", "a green cross"):
        result = runner.invoke(app, ["sample", prompt, "--run", str(tiny_run), "--n", "1", "-q"])
        assert result.exit_code == 0, result.output
    rows = {f.parent.name: json.loads(f.read_text())["prompt"] for f in root.glob("*/samples.jsonl")}
    assert rows == {"20300102-030405-4": "a red circle", "20300102-030405-5": "a green cross"}
    with pytest.raises(RuntimeError):
        name, made = claim_new_folder(root)
        with ReplacedFolder(root / name, overwrite=False, made=made):
            raise RuntimeError("interrupted")
    assert not (root / "20300102-030405-6").exists() and root.is_dir()
    # A mistyped --run: the run folder and its samples/ made for the claim go with it
    typo = runner.invoke(app, ["sample", "x", "--run", str(tiny_run.parent / "typo" / "run"), "-q"])
    assert isinstance(typo.exception, UserError) and not (tiny_run.parent / "typo").exists()


def test_a_seed_whose_images_could_not_be_redrawn_alone_is_refused(tiny_run):
    from dallecli.sample import MAX_SEED

    runner = CliRunner()
    base = ["sample", "a", "b", "--run", str(tiny_run), "--n", "2", "-q"]
    refused = runner.invoke(app, [*base, "--seed", str(MAX_SEED - 2)])
    assert isinstance(refused.exception, UserError) and f"at most {MAX_SEED - 3}" in str(refused.exception)
    assert not (tiny_run / "samples").exists() or not any((tiny_run / "samples").iterdir())


def test_a_prior_trained_on_codes_of_another_runs_dvae_finds_that_dvae(tiny_run, tmp_path, capsys):
    """`encode --dvae ../other/dvae` then `train-prior`: the run has no dVAE of its own, and the code manifest
    names the one to decode with."""
    import shutil

    from dallecli import checkpoint

    run = tmp_path / "copy"
    shutil.copytree(tiny_run, run)
    shutil.move(run / "dvae", tmp_path / "elsewhere")
    dvae_step = checkpoint.latest(tmp_path / "elsewhere")
    (run / "codes").mkdir()
    (run / "codes" / "manifest.json").write_text(json.dumps({"kind": "codes", "dvae": {"checkpoint": str(dvae_step)}}))
    ck = checkpoint.load(run / "prior", "prior")
    weights = ck.weights()
    shutil.rmtree(run / "prior")
    checkpoint.save(run / "prior", 1, kind="prior", model_config=ck.model_config, weights=weights,
                    meta={**ck.meta, "codes": str(run / "codes")})
    pipe = load_pipeline(run, device="cpu")
    assert pipe.dvae_path == dvae_step and "the dVAE that made the codes" in capsys.readouterr().err
    shutil.rmtree(tmp_path / "elsewhere")  # gone too: the usual error, naming the run's dVAE folder
    with pytest.raises(UserError, match="dvae"):
        load_pipeline(run, device="cpu")


def test_a_failed_overwrite_puts_the_old_folder_back(tmp_path):
    from dallecli.commands.common import ReplacedFolder

    folder = tmp_path / "s"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"old")
    (folder / "samples.jsonl").write_bytes(b"{}")
    with pytest.raises(RuntimeError):
        with ReplacedFolder(folder, overwrite=True):
            folder.mkdir()
            (folder / "b.png").write_bytes(b"new, partial")
            raise RuntimeError("interrupted")
    assert _files(folder) == {"a.png": b"old", "samples.jsonl": b"{}"}
    with pytest.raises(SystemExit):  # a launcher exiting with its workers' non-zero code
        with ReplacedFolder(folder, overwrite=True):
            raise SystemExit(3)
    assert _files(folder) == {"a.png": b"old", "samples.jsonl": b"{}"}


def test_overwrite_replaces_only_a_samples_folder(tiny_run, tmp_path, monkeypatch):
    """--overwrite with --out naming a folder of the user's own (no sampling.json / samples.jsonl) is refused
    and the folder kept as it was; `--out .` writes into an empty current folder, and --overwrite never
    replaces the folder the command runs in."""
    runner = CliRunner()
    mine = tmp_path / "photos"
    mine.mkdir()
    (mine / "holiday.jpg").write_bytes(b"mine")
    res = runner.invoke(app, ["sample", "a red circle", "--n", "1", "--out", str(mine), "--overwrite",
                              "--run", str(tiny_run), "-q"])
    assert isinstance(res.exception, UserError) and "not a samples folder" in str(res.exception)
    res = runner.invoke(app, ["sample", "a red circle", "--n", "1", "--out", str(mine), "--run", str(tiny_run), "-q"])
    assert "not a samples folder" in str(res.exception) and "--overwrite never" in str(res.exception)
    assert _files(mine) == {"holiday.jpg": b"mine"}
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    res = runner.invoke(app, ["sample", "a red circle", "--n", "1", "--out", ".", "--run", str(tiny_run), "-q"])
    assert res.exit_code == 0, res.output
    assert (here / "samples.jsonl").exists() and (here / "000-000.png").exists()
    res = runner.invoke(app, ["sample", "a red circle", "--n", "1", "--out", ".", "--overwrite",
                              "--run", str(tiny_run), "-q"])
    assert isinstance(res.exception, UserError) and "current folder" in str(res.exception)
    assert (here / "000-000.png").exists() and not list(tmp_path.glob(".*replaced"))
    # an image prompt inside the folder --overwrite replaces would be moved away before it is read
    res = runner.invoke(app, ["sample", "a red circle", "--n", "1", "--out", str(here), "--overwrite",
                              "--image-prompt", str(here / "000-000.png"), "--prompt-rows", "1",
                              "--run", str(tiny_run), "-q"])
    assert isinstance(res.exception, UserError) and "copy the image elsewhere" in str(res.exception)
    # --out a symbolic link to a samples folder: replaced twice without a stale ".replaced" left in between
    monkeypatch.chdir(tmp_path)
    (tmp_path / "link").symlink_to(here)
    for _ in range(2):
        res = runner.invoke(app, ["sample", "a red circle", "--n", "1", "--out", "link", "--overwrite",
                                  "--run", str(tiny_run), "-q"])
        assert res.exit_code == 0, res.output
    assert not list(tmp_path.glob(".*replaced"))


def test_bad_prompt_and_output_paths(tiny_run, tmp_path):
    runner = CliRunner()
    as_dir = runner.invoke(app, ["sample", "--prompts", str(tmp_path), "--run", str(tiny_run), "-q"])
    assert isinstance(as_dir.exception, UserError) and "is a folder" in str(as_dir.exception)
    a_file = tmp_path / "out.txt"
    a_file.write_text("keep me")
    as_file = runner.invoke(app, ["sample", "a red circle", "--out", str(a_file), "--run", str(tiny_run), "-q"])
    assert isinstance(as_file.exception, UserError) and "is a file" in str(as_file.exception)
    assert a_file.read_text() == "keep me"
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n\n")
    res = runner.invoke(app, ["sample", "--prompts", str(blank), "--run", str(tiny_run), "-q"])
    assert isinstance(res.exception, UserError) and "holds no caption (only blank lines)" in str(res.exception)
    with pytest.raises(UserError, match="--prompt-rows 4"):
        sample_to_folder(tiny_run, ["a red circle"], device="cpu", quiet=True, image_prompt=a_file)


@pytest.mark.parametrize("sig, code, word", [("SIGTERM", 143, "terminated"), ("SIGINT", 130, "interrupted")])
def test_a_stopped_sample_says_so_and_leaves_no_half_folder(tiny_run, sig, code, word):
    """Stopped mid-way (a scheduler's SIGTERM, Ctrl-C): one line, the usual exit code, and no half-written
    folder, so that the same command can simply be run again."""
    import os
    import signal

    from tests.fixtures import cli

    folder = tiny_run / "samples" / "stop"
    proc = cli.start(["sample", "a red circle", "--run", tiny_run, "--n", "3000", "--batch-size", "1", "--name",
                      "stop", "-q"])
    try:
        cli.wait_for(lambda: folder.is_dir() and any(folder.glob("*.png")), proc)
        os.killpg(proc.pid, getattr(signal, sig))
    finally:
        done = cli.finish(proc, timeout=120)
    assert done.returncode == code, done.stderr[-2000:]
    assert [line for line in done.stderr.splitlines() if line.strip()][-1] == f"error: {word}", done.stderr[-2000:]
    assert not folder.exists()


def test_the_main_process_of_a_split_run_loads_the_reranking_clip_once(tiny_run, tmp_path, monkeypatch):
    """--gpus N --rerank K: every process loads the CLIP before drawing (a bad --clip fails at once); the main
    one reranks the merged samples with the CLIP it loaded then, instead of loading it a second time."""
    from dallecli import sample
    from dallecli.models import clip as clip_mod

    loads = []

    class Scorer:  # any fixed scores do: this test counts loads
        name, batch_size = "stub", 8

        def image_features(self, images):
            return torch.stack([torch.tensor(np.asarray(im.convert("RGB"), dtype=np.float32).mean((0, 1)))
                                for im in images])

        def text_features(self, texts):
            return torch.ones(len(texts), 3)

    def load(spec, run, device="cpu", **kw):
        loads.append(spec)
        return Scorer()

    monkeypatch.setattr(clip_mod, "load_clip", load)
    out = tmp_path / "split"
    main_scorer = clip_mod.load_clip(None, tiny_run)  # as `dalle sample` does in each process, before drawing
    for rank, scorer in ((0, main_scorer), (1, None)):  # the two processes' work, one after the other
        sample.sample_to_folder(tiny_run, ["a red circle", "a blue square"], out, n=2, rerank=1, device="cpu",
                                quiet=True, rank=rank, world=2, scorer=scorer)
    assert len(loads) == 2  # one per process
    sample.merge_parts(out, 2)
    sample.finish_folder(out, ["a red circle", "a blue square"], 2, 1, None, tiny_run, quiet=True,
                         scorer=main_scorer)
    assert len(loads) == 2  # the main process's, handed on
    settings = json.loads((out / "sampling.json").read_text())
    assert settings["rerank"] == 1 and settings["clip"] == "stub"  # reranked after the draw: recorded
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert sum(r["kept"] for r in rows) == 2 and all("clip_score" in r for r in rows)
    sample.finish_folder(out, ["a red circle", "a blue square"], 2, 1, None, tiny_run, quiet=True)
    assert len(loads) == 3  # handed on once only


def test_sampling_uses_the_dvae_checkpoint_the_prior_was_trained_with(tiny_run, capfd):
    """More dVAE training after the prior (a later dVAE checkpoint, other codes): `dalle sample` without --dvae
    takes the run's dVAE checkpoint whose fingerprint the prior recorded, and says so; with none left that
    matches, the mismatch is refused as before."""
    import shutil

    from dallecli import checkpoint

    first = checkpoint.latest(tiny_run / "dvae")
    ck = checkpoint.load(first, "dvae")
    weights = {k: v + 1 if v.is_floating_point() else v for k, v in ck.weights().items()}
    later = checkpoint.save(tiny_run / "dvae", 5, kind="dvae", model_config=ck.model_config, weights=weights)
    assert checkpoint.latest(tiny_run / "dvae") == later
    pipe = load_pipeline(tiny_run, device="cpu")
    assert pipe.dvae_path == first
    assert first.name in capfd.readouterr().err.replace("\n", "")  # wrapped at the console width
    with pytest.raises(UserError, match="dvae_fingerprint mismatch"):  # an explicit --dvae is taken as given
        load_pipeline(tiny_run, dvae=later, device="cpu")
    shutil.rmtree(first)
    with pytest.raises(UserError, match="dvae_fingerprint mismatch"):
        load_pipeline(tiny_run, device="cpu")


def test_a_clip_without_rerank_is_said_to_be_unused(tiny_run):
    result = CliRunner().invoke(app, ["sample", "a red circle", "--run", str(tiny_run), "--n", "1", "--name", "w",
                                      "--clip", "some-clip", "-q"])
    assert result.exit_code == 0, result.output
    assert "--clip some-clip is used only with --rerank" in result.output.replace("\n", " ")
    assert "clip_score" not in (tiny_run / "samples" / "w" / "samples.jsonl").read_text()


@pytest.mark.parametrize("field, value", [("temperature", float("nan")), ("temperature", float("inf")),
                                          ("temperature", 0.0), ("guidance", float("nan")),
                                          ("guidance", float("inf")), ("guidance", -1.0)])
def test_sampling_options_must_be_finite(field, value):
    """`--temperature nan` drew near-white images and wrote NaN into samples.jsonl and sampling.json."""
    from dallecli.console import UserError

    with pytest.raises(UserError, match=f"--{field} must be a finite number"):
        SamplingConfig(**{field: value}).validate()


def test_guidance_zero_is_unconditional_sampling(pipe):
    c = pipe.prior.config
    text = _text(pipe, ["a red circle", "a blue square above a green cross"])
    empty = torch.full_like(text, c.pad_id)
    prompt = torch.arange(c.grid).remainder(c.image_vocab)[None].expand(2, -1)
    for p in (None, prompt):
        zero, lp0 = generate_codes(pipe.prior, text, [3, 4], SamplingConfig(guidance=0.0), prompt=p,
                                   precision="fp32")
        uncond, lp1 = generate_codes(pipe.prior, empty, [3, 4], SamplingConfig(), prompt=p, precision="fp32")
        assert torch.equal(zero, uncond)
        torch.testing.assert_close(lp0, lp1)


def test_temperature_divides_the_logits():
    from dallecli.sample import _draw, uniform_noise

    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).expand(20000, -1)
    u = uniform_noise(torch.arange(20000), 1)[:, 0]
    tokens, logp = _draw(logits, SamplingConfig(temperature=2.0), u)
    freq = torch.bincount(tokens, minlength=4).float() / 20000
    assert torch.allclose(freq, (logits[0] / 2).softmax(-1), atol=0.012)
    assert torch.allclose(logp, (logits[0] / 2).log_softmax(-1)[tokens])


def test_completing_an_image_from_its_own_rows_gives_the_same_image(pipe):
    grid = pipe.prior.config.grid
    text = _text(pipe, ["a red circle", "a green cross"])
    full, _ = generate_codes(pipe.prior, text, [8, 9], SamplingConfig(), precision="fp32")
    done, _ = generate_codes(pipe.prior, text, [8, 9], SamplingConfig(), prompt=full[:, : 2 * grid],
                             precision="fp32")
    assert torch.equal(done, full)  # token i draws the image's random number i, prompt or not
