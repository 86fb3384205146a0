"""`dalle eval`: FID / IS / KID against independent references, the blur, the cache, bad inputs, the layout."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import typer
from PIL import Image, ImageFilter
from typer.testing import CliRunner

from dallecli.console import UserError
from dallecli.data.records import write_tar
from dallecli.data.shapes import render_scene
from dallecli.evaluate import features as nets
from dallecli.evaluate import fid as F_
from dallecli.evaluate.run import CATEGORIES, EvalConfig, evaluate

torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------------ fixtures

class TinyInception(nn.Module):
    """Inception-shaped and random: convolutions, a global pool → (B, 24) features, a head → (B, 10) logits."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 24, 3, 2, 1), nn.ReLU())
        self.fc = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor):
        pool = self.body(x * 2 - 1).mean((2, 3))
        return pool, self.fc(pool)


@pytest.fixture(scope="module")
def net_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("net") / "tiny_inception.pt"
    torch.jit.script(TinyInception().eval()).save(str(path))
    return path


class StandInClip:
    """A deterministic stand-in for dallecli.models.clip's scorer: colour histograms vs. colour words."""

    fingerprint = "standin0"
    WORDS = ("red", "green", "blue", "yellow", "purple", "cyan")

    def image_features(self, images):
        rows = []
        for im in images:
            a = np.asarray(im.convert("RGB"), dtype=np.float32) / 255
            rows.append([a[..., 0].mean(), a[..., 1].mean(), a[..., 2].mean(), a.std(), 1 - a.mean(), 0.1])
        return torch.tensor(rows)

    def text_features(self, texts):
        return torch.tensor([[float(w in t) + 0.1 for w in self.WORDS] for t in texts])


@pytest.fixture
def clip(monkeypatch):
    monkeypatch.setattr(nets, "load_scorer", lambda spec, run, device: StandInClip())


@pytest.fixture
def no_clip(monkeypatch):
    def absent(spec, run, device):
        raise UserError("no CLIP at RUN/clip")

    monkeypatch.setattr(nets, "load_scorer", absent)


def png(image: Image.Image) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def make_run(root: Path, n: int = 24, size: int = 64, shapes: bool = True) -> Path:
    """A run whose val shards hold n shapes scenes."""
    records = []
    for i in range(n):
        image, caption, meta = render_scene(0, i, size, "val")
        records.append((f"v{i:04d}", {"png": png(image), "txt": caption.encode(), "json": json.dumps(meta).encode()}))
    (root / "shards").mkdir(parents=True)
    write_tar(root / "shards" / "val-000000.tar", records)
    if shapes:
        (root / "shards" / "manifest.json").write_text(json.dumps({"arguments": {"source": {"kind": "shapes", "seed": 0}}}))
    return root


def write_samples(folder: Path, rows: list[tuple[str, Image.Image, dict]]) -> Path:
    """samples.jsonl with one PNG per row: (prompt, image, extra fields)."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (prompt, image, extra) in enumerate(rows):
        name = f"{i:04d}.png"
        image.save(folder / name)
        lines.append(json.dumps({"prompt": prompt, "image": name, "seed": i, "index": 0, "logprob": 0.0, **extra}))
    (folder / "samples.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "samples.jsonl"


def noisy(image: Image.Image, sigma: float, seed: int) -> Image.Image:
    a = np.asarray(image, dtype=np.float32)
    a = a + np.random.default_rng(seed).normal(0, sigma * 255, a.shape)
    return Image.fromarray(np.clip(a, 0, 255).round().astype(np.uint8))


def val_samples(folder: Path, n: int = 24, size: int = 64, sigma: float = 0.05) -> Path:
    return write_samples(folder, [(c, noisy(im, sigma, i), {}) for i, (im, c, _) in
                                  enumerate(render_scene(0, i, size, "val") for i in range(n))])


def quick(**kw) -> EvalConfig:
    return EvalConfig(**{"name": "t", "blur": (0, 2), "reconstruction": False, "composition_count": 0, **kw})


def cleanfid_frechet(real: np.ndarray, fake: np.ndarray) -> float:
    """clean-fid's definition: μ, Σ with np.mean / np.cov (ddof 1), d² = |μ1−μ2|² + tr Σ1 + tr Σ2 − 2 tr √(Σ1Σ2).
    tr √(Σ1Σ2) = tr √(√Σ1 Σ2 √Σ1): symmetric square roots by eigendecomposition (no scipy here)."""
    mu1, mu2 = real.mean(0), fake.mean(0)
    s1, s2 = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(root1 @ s2 @ root1)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(inner, 0, None)).sum())


# ------------------------------------------------------------------------------------------------ statistics

def test_fid_of_a_set_against_itself_is_zero():
    x = torch.randn(200, 16, generator=torch.Generator().manual_seed(0)) * 3 + 1
    assert abs(F_.fid(x, x)) < 1e-6 * F_.fid(x, x + 1) + 1e-8
    assert F_.fid(x, x + 1) == pytest.approx(16.0, rel=1e-6)  # a mean shift of 1 in 16 dims


def test_fid_grows_with_noise(net_file, tmp_path):
    feats = nets.load_features(str(net_file), device="cpu")
    base = [render_scene(3, i, 32, "train")[0] for i in range(64)]
    real = torch.cat([feats.extract(torch.stack([torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)
                                                 for im in base]).float() / 255)[0]])
    fids = []
    for sigma in (0.0, 0.05, 0.1, 0.2, 0.4):
        x = torch.stack([torch.from_numpy(np.asarray(noisy(im, sigma, i)).copy()).permute(2, 0, 1)
                         for i, im in enumerate(base)]).float() / 255
        fids.append(F_.fid(real, feats.extract(x)[0]))
    assert fids[0] == pytest.approx(0, abs=1e-6)
    assert all(a < b for a, b in zip(fids, fids[1:])), fids


def test_is_of_one_image_repeated_is_one():
    logits = torch.randn(1, 10).repeat(40, 1)
    mean, std, splits = F_.inception_score(logits)
    assert mean == pytest.approx(1.0, abs=1e-5) and std == pytest.approx(0, abs=1e-5) and splits == 10
    sure = torch.eye(10).repeat(100, 1) * 50  # 10 classes, each image sure of its own: IS → 10
    assert 9 < F_.inception_score(sure)[0] <= 10


def test_our_fid_equals_torchmetrics_and_cleanfid(net_file, tmp_path):
    """The same TorchScript network: our pipeline (files → ImageSet → features → fid) = torchmetrics run
    on the images with that network = clean-fid's formula on the features."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    refs = []
    for i in range(40):
        image = noisy(render_scene(1, i, 32, "train")[0], 0.1 * (i % 2), i)
        image.save(tmp_path / f"{i}.png")
        refs.append(F_.ImageRef(str(tmp_path / f"{i}.png")))
    feats = nets.load_features(str(net_file), device="cpu")
    real, = F_.over_batches(F_.ImageSet(refs[:20], 32), lambda x, i: (feats.extract(x)[0],), batch_size=7)
    fake, = F_.over_batches(F_.ImageSet(refs[20:], 32), lambda x, i: (feats.extract(x)[0],), batch_size=7)
    ours = F_.fid(real, fake)

    net = torch.jit.load(str(net_file))

    class Head(nn.Module):
        num_features = 24

        def forward(self, x):
            return net(x)[0]

    tm = FrechetInceptionDistance(feature=Head())
    load = lambda rs: torch.stack([torch.from_numpy(np.asarray(r.open()).copy()).permute(2, 0, 1) for r in rs]).float() / 255
    tm.update(load(refs[:20]), real=True)
    tm.update(load(refs[20:]), real=False)
    assert ours == pytest.approx(float(tm.compute()), rel=1e-4)
    assert ours == pytest.approx(cleanfid_frechet(real.double().numpy(), fake.double().numpy()), rel=1e-4)


def test_kid_matches_its_definition():
    """KID = mean over random subsets of the unbiased MMD² with k(x, y) = (x·y/d + 1)³; small sets use
    subsets of half their size (a subset of everything would have no spread)."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 5, generator=g).double(), torch.randn(8, 5, generator=g).double() + 0.5
    mean, std, size = F_.kid(x, y, seed=3)
    assert size == 4

    def mmd(a, b):
        k = lambda u, v: (u @ v.T / 5 + 1) ** 3
        m = len(a)
        kaa, kbb = k(a, a), k(b, b)
        return float(((kaa.sum() - kaa.trace()) + (kbb.sum() - kbb.trace())) / (m * (m - 1)) - 2 * k(a, b).mean())

    torch.manual_seed(3)  # the subsets torchmetrics draws under that seed
    ref = [mmd(x[torch.randperm(8)[:4]], y[torch.randperm(8)[:4]]) for _ in range(F_.KID_SUBSETS)]
    assert mean == pytest.approx(np.mean(ref), rel=1e-6) and std == pytest.approx(np.std(ref), rel=1e-6)
    assert F_.kid(x, x + 2)[0] > F_.kid(x, x + 0.5)[0]


# ------------------------------------------------------------------------------------------------ the blur

def test_blur_radius_zero_leaves_images_unchanged_and_matches_pillow(tmp_path):
    image = noisy(render_scene(0, 5, 64, "val")[0], 0.1, 0)
    image.save(tmp_path / "a.png")
    ref = [F_.ImageRef(str(tmp_path / "a.png"))]
    assert torch.equal(F_.ImageSet(ref, 64, 0)[0].permute(1, 2, 0), torch.from_numpy(np.asarray(image).copy()))
    assert F_.blur(image, 0) is image
    for radius in (1, 2, 4, 8):
        want = np.asarray(image.filter(ImageFilter.GaussianBlur(radius)))
        got = F_.ImageSet(ref, 64, radius)[0].permute(1, 2, 0).numpy()
        assert np.array_equal(got, want)
        assert not np.array_equal(got, np.asarray(image))


# ------------------------------------------------------------------------------------------------ evaluate

def test_metrics_layout_and_the_cache(tmp_path, net_file, clip, monkeypatch):
    run = make_run(tmp_path / "run")
    samples = val_samples(tmp_path / "s")
    cfg = quick(samples=samples, features=str(net_file), blur=(0, 1, 2, 4, 8))
    folder, metrics = evaluate(run, cfg)
    saved = json.loads((folder / "metrics.json").read_text())
    assert folder == run / "eval" / "t"
    assert list(saved) == ["protocol", "blur", "clip_score", "composition", "reconstruction", "rerank_sizes"]
    assert list(saved["blur"]) == ["0", "1", "2", "4", "8"]
    for m in saved["blur"].values():
        assert set(m) == {"fid", "is", "is_std", "kid", "kid_std"}
        assert m["fid"] > 0 and m["is"] >= 1 and math.isfinite(m["kid"])
    assert set(saved["clip_score"]) == {"generated", "real"} and saved["clip_score"]["real"] > 0
    assert set(saved["composition"]) == set(CATEGORIES) | {"overall"}
    assert saved["reconstruction"] is None and saved["rerank_sizes"] == {}
    p = saved["protocol"]
    assert {"features", "resize", "count", "seeds", "checkpoints"} <= set(p)
    assert p["features"]["name"] == "torchscript:tiny_inception.pt" and p["count"]["samples"] == 24
    assert p["resize"]["image_size"] == 64 and p["checkpoints"]["clip"] == "standin0"
    assert (folder / "fid_is_blur.png").stat().st_size > 0

    # Second run: the references are never opened again, and the numbers are the same.
    cached = sorted((run / "eval" / "cache").iterdir())
    assert len(cached) == 6  # five radii + the real CLIP score
    opened = []
    real_open = F_.ImageRef.open
    monkeypatch.setattr(F_.ImageRef, "open", lambda self: opened.append(self.path) or real_open(self))
    _, again = evaluate(run, quick(samples=samples, features=str(net_file), blur=(0, 1, 2, 4, 8), name="t2"))
    assert not [p for p in opened if p.endswith(".tar")]
    assert again["blur"] == metrics["blur"] and sorted((run / "eval" / "cache").iterdir()) == cached


def test_rebuilt_val_shards_of_the_same_sizes_are_not_taken_for_the_cached_ones(tmp_path):
    """The reference cache's key holds the images' bytes: shards rebuilt with other images of the same byte
    sizes (tar members are padded) must not reuse the earlier features."""
    from dallecli.evaluate.inputs import read_references

    def shards(colour):
        folder = tmp_path / colour
        folder.mkdir()
        write_tar(folder / "val-000000.tar", [(f"v{i}", {"png": png(Image.new("RGB", (32, 32), colour)),
                                                        "txt": b"a square"}) for i in range(4)])
        return folder

    red, blue = read_references(shards("red"), 4), read_references(shards("blue"), 4)
    assert red.identity["shards"] == blue.identity["shards"]  # the names and sizes alone would collide
    assert red.identity != blue.identity
    assert read_references(tmp_path / "red", 4).identity == red.identity  # and the same shards still hit


def test_samples_and_references_of_different_sizes_are_compared_at_the_smaller(tmp_path, net_file, no_clip):
    run = make_run(tmp_path / "run", size=64)
    samples = val_samples(tmp_path / "s", size=32)
    _, metrics = evaluate(run, quick(samples=samples, features=str(net_file)))
    r = metrics["protocol"]["resize"]
    assert (r["image_size"], r["samples_from"], r["references_from"]) == (32, [32], [64])
    assert metrics["clip_score"] == {"generated": None, "real": None}
    assert "no CLIP" in metrics["protocol"]["clip_score"]["null_because"]


def test_missing_sample_files_are_counted_then_refused(tmp_path, net_file, no_clip):
    run = make_run(tmp_path / "run")
    samples = val_samples(tmp_path / "s", n=20)
    (samples.parent / "0003.png").unlink()
    _, metrics = evaluate(run, quick(samples=samples, features=str(net_file)))
    assert metrics["protocol"]["count"]["missing"] == 1 and metrics["protocol"]["count"]["samples"] == 19
    for i in range(4, 8):
        (samples.parent / f"{i:04d}.png").unlink()
    with pytest.raises(UserError, match="5 of the 20 images listed .* are missing"):
        evaluate(run, quick(samples=samples, features=str(net_file)))


@pytest.mark.parametrize("case", ["one sample", "unknown features", "not torchscript", "bad blur", "bad json"])
def test_bad_input_is_one_line(tmp_path, net_file, no_clip, case):
    run = make_run(tmp_path / "run")
    samples = val_samples(tmp_path / "s", n=6)
    kw = dict(samples=samples, features=str(net_file))
    if case == "one sample":
        kw["samples"] = write_samples(tmp_path / "one", [("a red circle", Image.new("RGB", (64, 64), "white"), {})])
        pattern = "at least 2"
    elif case == "unknown features":
        kw["features"], pattern = "inceptoin", "unknown --features 'inceptoin'"
    elif case == "not torchscript":
        bad = tmp_path / "pickle.pt"
        torch.save({"w": torch.zeros(2)}, bad)
        kw["features"], pattern = str(bad), "is not a TorchScript module"
    elif case == "bad blur":
        kw["blur"], pattern = (0, -1), "--blur must list distinct radii"
    else:
        samples.write_text(samples.read_text() + "{not json\n")
        pattern = "line 7 is not a sample"
    with pytest.raises(UserError, match=pattern) as err:
        evaluate(run, quick(**kw))
    assert "\n" not in str(err.value)


def test_missing_inception_weights_say_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(UserError, match="pt_inception-2015-12-05-6726825d.pth") as err:
        nets.load_features("inception", device="cpu")
    assert "\n" not in str(err.value) and "--inception-weights" in str(err.value)


def test_composition_on_true_renders_is_perfect_and_reranking_picks_by_clip_score(tmp_path, net_file, no_clip):
    run = make_run(tmp_path / "run", n=12)
    rows = []
    for split in ("test-seen", "test-zeroshot"):
        for i in range(24):
            image, caption, _ = render_scene(0, i, 64, split)
            # Candidate 0: a blank canvas (fails the checker); candidate 1: the true render, ranked higher.
            rows.append((caption, Image.new("RGB", (64, 64), "white"), {"index": 0, "clip_score": 0.1,
                                                                         "prompt_index": len(rows) // 2}))
            rows.append((caption, image, {"index": 1, "clip_score": 0.3, "prompt_index": len(rows) // 2}))
    comp = write_samples(tmp_path / "c", rows)
    val = []
    for i in range(12):
        image, caption, _ = render_scene(0, i, 64, "val")
        val.append((caption, Image.new("RGB", (64, 64), "white"), {"index": 0, "clip_score": 0.1, "prompt_index": i}))
        val.append((caption, image, {"index": 1, "clip_score": 0.3, "prompt_index": i}))
    samples = write_samples(tmp_path / "s", val)
    _, m = evaluate(run, quick(samples=samples, composition_samples=comp, features=str(net_file), rerank=2,
                               rerank_sizes=(1, 2)))
    counts = m["protocol"]["composition_counts"]
    assert all(counts[c] > 0 for c in CATEGORIES), counts
    assert m["composition"] == {**{c: 1.0 for c in CATEGORIES}, "overall": 1.0}
    assert m["rerank_sizes"]["2"]["composition"]["overall"] == 1.0
    assert m["rerank_sizes"]["1"]["composition"]["overall"] == 0.0  # the blank canvases
    assert m["rerank_sizes"]["2"]["fid"] < m["rerank_sizes"]["1"]["fid"]
    assert m["blur"]["0"]["fid"] == pytest.approx(m["rerank_sizes"]["2"]["fid"])  # --rerank 2: the headline
    assert m["protocol"]["selection"]["scores"] == "samples.jsonl clip_score"


def test_generation_goes_through_the_sampler(tmp_path, net_file, clip, monkeypatch):
    """Without --samples: val captions (and, in the shapes world, test-split captions) go to sample_to_folder."""
    from dallecli import sample

    calls = []

    def fake_sampler(run, prompts, out, *, n=1, rerank=None, seed=0, **kw):
        calls.append((list(prompts), n, rerank, seed))
        rows = []
        for i, p in enumerate(prompts):
            for j in range(n):
                rows.append((p, noisy(render_scene(0, i, 64, "val")[0], 0.05, i * n + j),
                             {"index": j, "prompt_index": i, "clip_score": float(j), "kept": True}))
        return write_samples(Path(out), rows)

    monkeypatch.setattr(sample, "sample_to_folder", fake_sampler)
    run = make_run(tmp_path / "run", n=10)
    from dallecli import checkpoint

    prior = checkpoint.save(run / "prior", 1, kind="prior", model_config={}, weights={"w": torch.zeros(1)},
                            meta={"dvae_fingerprint": "0123456789abcdef"})
    _, m = evaluate(run, quick(features=str(net_file), composition_count=3, rerank_sizes=(1, 2), seed=7))
    # the dVAE that decoded the samples is the prior's own, whatever dVAE the reconstruction metrics use
    assert m["protocol"]["checkpoints"]["dvae"] == "0123456789abcdef"
    assert m["protocol"]["checkpoints"]["prior"] == checkpoint.load(prior, "prior").fingerprint
    (val, n, rerank, seed), (test, *_) = calls
    assert len(val) == 10 and (n, rerank, seed) == (2, 2, 7)
    assert test == [render_scene(0, i, 64, split)[1] for split in ("test-seen", "test-zeroshot") for i in range(3)]
    assert m["protocol"]["selection"]["rerank"] == 1 and set(m["rerank_sizes"]) == {"1", "2"}
    assert m["protocol"]["count"]["samples"] == 10
    assert m["protocol"]["sampling"] == {"temperature": 1.0, "top_k": None, "top_p": None, "guidance": 1.0,
                                         "candidates_per_prompt": 2, "seed": 7}


def test_reconstruction_metrics_with_a_tiny_dvae(tmp_path, net_file, no_clip):
    from dallecli import checkpoint
    from dallecli.config import to_dict
    from dallecli.models.dvae import DVAE, PRESETS

    run = make_run(tmp_path / "run", n=8)
    torch.manual_seed(0)
    cfg = PRESETS["tiny"]
    checkpoint.save(run / "dvae", 1, kind="dvae", model_config=to_dict(cfg), weights=DVAE(cfg).state_dict())
    _, m = evaluate(run, quick(samples=val_samples(tmp_path / "s", n=8), features=str(net_file),
                               reconstruction=True))
    r = m["reconstruction"]
    assert set(r) == {"psnr", "rfid", "codebook_usage"}
    assert 0 < r["codebook_usage"] <= 1 and math.isfinite(r["psnr"]) and r["rfid"] > 0
    assert m["protocol"]["checkpoints"]["dvae_reconstruction"] == checkpoint.load(run / "dvae", "dvae").fingerprint
    assert m["protocol"]["checkpoints"]["dvae"] is None  # given samples: no dVAE of ours decoded them


def test_fid_inception_architecture_loads_the_weight_file_layout():
    """The FID Inception is torchvision's Inception3 layout: the pt_inception file's keys load unmapped."""
    from torchvision.models.inception import Inception3

    net = nets.fid_inception()
    plain = Inception3(num_classes=1008, aux_logits=False, init_weights=False)
    assert list(net.state_dict()) == list(plain.state_dict())
    feats, logits = net(torch.rand(1, 3, 64, 64))
    assert feats.shape == (1, 2048) and logits.shape == (1, 1008)
    # The FID blocks differ from torchvision's: pools that skip padding, a max pool in Mixed_7c.
    net.load_state_dict(plain.state_dict())
    x = torch.rand(1, 2048, 8, 8)
    assert not torch.allclose(net.Mixed_7c(x), plain.Mixed_7c(x))


def test_cli_runs_and_fails_in_one_line(tmp_path, net_file, no_clip):
    from dallecli.commands.eval import command

    app = typer.Typer()
    app.command()(command)
    app.command("other")(lambda: None)
    run = make_run(tmp_path / "run")
    samples = val_samples(tmp_path / "s")
    ok = CliRunner().invoke(app, ["command", "--run", str(run), "--samples", str(samples), "--features",
                                  str(net_file), "--blur", "0,1", "--name", "cli", "--cpu", "-q"])
    assert ok.exit_code == 0, ok.output
    assert (run / "eval" / "cli" / "metrics.json").is_file() and "FID" in ok.output
    bad = CliRunner().invoke(app, ["command", "--run", str(run), "--samples", str(samples), "--features", "nope"])
    assert bad.exit_code != 0 and isinstance(bad.exception, UserError)


def test_gather_rows_reassembles_uneven_slices(monkeypatch):
    """5 rows over 2 processes: slices of 2 and 3, padded to 3, gathered, unpadded in rank order."""
    import accelerate.utils

    rows = torch.arange(10.0).view(5, 2)
    assert [F_.shard_range(5, r, 2) for r in range(2)] == [(0, 2), (2, 5)]
    pad0 = torch.cat([rows[0:2], torch.zeros(1, 2)])

    class State:
        num_processes, process_index, device = 2, 1, "cpu"

    monkeypatch.setattr(accelerate.utils, "gather", lambda padded: torch.cat([pad0, padded]))
    assert torch.equal(F_.gather_rows(rows[2:5], 5, State()), rows)


MULTI = """
import json, sys, torch
from pathlib import Path
from accelerate import PartialState
from dallecli.evaluate import features as nets
from dallecli.evaluate import fid as F_
from dallecli.evaluate.run import EvalConfig, evaluate
torch.set_num_threads(1)
def no_clip(*a):
    raise nets.UserError("none")
nets.load_scorer = no_clip
state = PartialState(cpu=True)
cfg = EvalConfig(name=sys.argv[3], samples=Path(sys.argv[2]), features=sys.argv[4], blur=(0, 2), reconstruction=False)
result = evaluate(Path(sys.argv[1]), cfg, state)
Path(sys.argv[1], f"rank{state.process_index}").write_text(f"{state.num_processes} {result is not None}")
from dallecli.train.launch import close_process_group
close_process_group()  # as `dalle` does at the end of every command
"""


@pytest.mark.slow
def test_two_gloo_processes_give_the_one_process_numbers(tmp_path, net_file, no_clip):
    import socket
    import subprocess
    import sys

    run = make_run(tmp_path / "run", n=21)
    samples = val_samples(tmp_path / "s", n=21)
    _, one = evaluate(run, quick(samples=samples, features=str(net_file), name="one"))
    script = tmp_path / "multi.py"
    script.write_text(MULTI)
    for f in (run / "eval" / "cache").iterdir():  # the two processes must extract the references themselves
        f.unlink()
    with socket.socket() as s:  # a free port: a fixed one may still be held by an earlier run
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", port,
           str(script), str(run), str(samples), "two", str(net_file)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    ranks = [(run / f"rank{r}").read_text() if (run / f"rank{r}").exists() else None for r in (0, 1)]
    assert ranks == ["2 True", "2 False"], done.stderr[-3000:]  # only rank 0 returns the metrics
    two = json.loads((run / "eval" / "two" / "metrics.json").read_text())
    for r in ("0", "2"):
        assert two["blur"][r]["fid"] == pytest.approx(one["blur"][r]["fid"], rel=1e-4)
        assert two["blur"][r]["is"] == pytest.approx(one["blur"][r]["is"], rel=1e-5)


# ------------------------------------------------------------------------------------------------ early checks

def fake_sampler(calls: list):
    """A stand-in for sample_to_folder: noisy val renders, one call recorded per folder drawn."""
    def draw(run, prompts, out, *, n=1, rerank=None, seed=0, **kw):
        calls.append(Path(out))
        rows = [(p, noisy(render_scene(0, i, 64, "val")[0], 0.05, i * n + j),
                 {"index": j, "prompt_index": i, "kept": True}) for i, p in enumerate(prompts) for j in range(n)]
        return write_samples(Path(out), rows)

    return draw


@pytest.fixture
def no_sampling(monkeypatch):
    from dallecli import sample

    def refuse(*a, **kw):
        raise AssertionError("sampled before the inputs were checked")

    monkeypatch.setattr(sample, "sample_to_folder", refuse)


@pytest.mark.parametrize("case", ["unknown features", "missing torchscript", "not torchscript", "weights not torch",
                                  "weights of something else", "no cached inception", "bad clip"])
def test_bad_networks_fail_before_any_sampling(tmp_path, monkeypatch, net_file, no_sampling, no_clip, case):
    """P7: --features, --inception-weights and --clip are checked before hundreds of images are drawn."""
    run = make_run(tmp_path / "run", n=6)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))  # no cached Inception weights
    kw = dict(composition_count=3)
    if case == "unknown features":
        kw["features"], pattern = "nosuch", "unknown --features 'nosuch'"
    elif case == "missing torchscript":
        kw["features"], pattern = str(tmp_path / "gone.pt"), "no such TorchScript file"
    elif case == "not torchscript":
        torch.save({"w": torch.zeros(2)}, tmp_path / "pickle.pt")
        kw["features"], pattern = str(tmp_path / "pickle.pt"), "is not a TorchScript module"
    elif case == "weights not torch":
        (tmp_path / "notimg.txt").write_text("hello\n")
        kw["inception_weights"], pattern = tmp_path / "notimg.txt", "is not a PyTorch state dict"
    elif case == "weights of something else":
        torch.save({"w": torch.zeros(2)}, tmp_path / "other.pth")
        kw["inception_weights"], pattern = tmp_path / "other.pth", "does not hold the FID Inception weights"
    elif case == "no cached inception":
        pattern = "FID Inception weights not found"
    else:
        kw.update(clip="RUN/nosuch", features=str(net_file))
        pattern = "no CLIP for --features clip / --clip"
    with pytest.raises(UserError, match=pattern) as err:
        evaluate(run, quick(**kw))
    assert "\n" not in str(err.value)
    assert not (run / "eval" / "t").exists()


def test_names_and_files_are_checked_by_validate(tmp_path, monkeypatch):
    """The cheap part of P7 runs in validate(), before `--gpus N` starts N processes."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(UserError, match="unknown --features 'nosuch'"):
        quick(features="nosuch").validate()
    with pytest.raises(UserError, match="Inception weights not found"):
        quick().validate()
    with pytest.raises(UserError, match="--inception-weights .* is not a file"):
        quick(inception_weights=tmp_path / "none.pth").validate()
    quick(features="clip").validate()


def test_inception_weights_without_inception_features_are_said_to_be_unused(tmp_path, capfd):
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"")
    quick(features="clip", inception_weights=weights).validate()
    err = capfd.readouterr().err
    assert "--inception-weights" in err and "unused" in err


def test_inception_weights_that_are_not_a_state_dict_say_what_they_should_be(tmp_path):
    """P8d: not '(101)', but the expected format and where to get the file."""
    (tmp_path / "notimg.txt").write_text("hello, not weights\n")
    with pytest.raises(UserError) as err:
        nets.load_inception(tmp_path / "notimg.txt", "cpu")
    text = str(err.value)
    assert "(101)" not in text and "\n" not in text
    assert "--inception-weights" in text and nets.INCEPTION_FILE in text and nets.INCEPTION_URL in text


def test_rerank_sizes_error_gives_a_rerank_sizes_example(tmp_path):
    """P8f: the example is one of --rerank-sizes, not --blur's radii."""
    from dallecli.commands.eval import command

    app = typer.Typer()
    app.command()(command)
    app.command("other")(lambda: None)
    bad = CliRunner().invoke(app, ["command", "--run", str(tmp_path), "--rerank-sizes", "1,x"])
    assert isinstance(bad.exception, UserError)
    text = str(bad.exception)
    assert "--rerank-sizes 1,2,4,8" in text and "0,1,2,4,8" not in text and "'1,x'" in text


def test_a_failed_eval_leaves_an_earlier_one_of_its_name_alone(tmp_path, net_file, no_clip, monkeypatch):
    """Re-running under one name replaces the folder only when it succeeds: a bad --features caught after the
    first check neither redraws the samples nor touches metrics.json."""
    from dallecli import sample

    calls = []
    monkeypatch.setattr(sample, "sample_to_folder", fake_sampler(calls))
    run = make_run(tmp_path / "run", n=6)
    folder, _ = evaluate(run, quick(features=str(net_file), composition_count=2))
    assert len(calls) == 2
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}
    torch.save({"w": torch.zeros(2)}, tmp_path / "pickle.pt")
    with pytest.raises(UserError, match="is not a TorchScript module"):
        evaluate(run, quick(features=str(tmp_path / "pickle.pt"), composition_count=2))
    assert len(calls) == 2
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()} == before

    def late(*a, **kw):  # a failure during sampling itself: metrics.json is only ever replaced whole, at the end
        raise UserError("the sampler failed")

    monkeypatch.setattr(sample, "sample_to_folder", late)
    with pytest.raises(UserError, match="the sampler failed"):
        evaluate(run, quick(features=str(net_file), composition_count=2))
    assert (folder / "metrics.json").read_bytes() == before[folder / "metrics.json"][0]


def test_eval_failing_mid_sampling_puts_the_earlier_evaluation_of_its_name_back(tmp_path, net_file, no_clip,
                                                                                   monkeypatch):
    """`dalle eval --name NAME` again: the old folder waits aside while the new one is drawn. A sampler that
    dies half-way (after writing some images) leaves the earlier samples and metrics.json exactly as they were,
    and no `.NAME.replaced` behind; a run that succeeds replaces the folder whole."""
    from dallecli import sample
    from dallecli.commands.eval import command

    app = typer.Typer()
    app.command()(command)
    app.command("other")(lambda: None)
    calls: list = []
    monkeypatch.setattr(sample, "sample_to_folder", fake_sampler(calls))
    run = make_run(tmp_path / "run", n=6)
    args = ["command", "--run", str(run), "--features", str(net_file), "--blur", "0", "--name", "again",
            "--composition-count", "2", "--no-reconstruction", "--cpu", "-q"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    folder = run / "eval" / "again"
    before = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert Path("metrics.json") in before and any(p.suffix == ".png" for p in before)

    def dies_half_way(run_, prompts, out, **kw):
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "000-000.png").write_bytes(b"half a new sample")
        raise UserError("the sampler failed")

    refused = CliRunner().invoke(app, args)  # the same name again, without --overwrite
    assert isinstance(refused.exception, UserError) and "--overwrite" in str(refused.exception)
    assert {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before
    args.append("--overwrite")
    monkeypatch.setattr(sample, "sample_to_folder", dies_half_way)
    failed = CliRunner().invoke(app, args)
    assert isinstance(failed.exception, UserError) and "the sampler failed" in str(failed.exception)
    assert {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before
    assert not (run / "eval" / ".again.replaced").exists()

    monkeypatch.setattr(sample, "sample_to_folder", fake_sampler(calls))
    (folder / "stale.txt").write_text("left by hand")
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    assert (folder / "metrics.json").is_file() and not (folder / "stale.txt").exists()
    assert not (run / "eval" / ".again.replaced").exists()


@pytest.mark.parametrize("name", ["cache", ".hidden", "a/b", ""])
def test_eval_names_that_would_clash_are_refused(name):
    with pytest.raises(UserError, match="--name"):
        EvalConfig(name=name).validate()


def test_eval_of_samples_inside_its_own_folder_evaluates_them_in_place(tmp_path, net_file, no_clip):
    """--samples RUN/eval/NAME/samples/samples.jsonl with --name NAME: the folder cannot be set aside (the
    samples would go with it); the samples stay and metrics.json is rewritten."""
    from dallecli.commands.eval import command

    app = typer.Typer()
    app.command()(command)
    app.command("other")(lambda: None)
    run = make_run(tmp_path / "run")
    samples = val_samples(run / "eval" / "here" / "samples")
    args = ["command", "--run", str(run), "--samples", str(samples), "--features", str(net_file), "--blur", "0",
            "--name", "here", "--no-reconstruction", "--cpu", "-q"]
    for again in ([], ["--overwrite"]):
        result = CliRunner().invoke(app, [*args, *again])
        assert result.exit_code == 0, result.output
        assert (run / "eval" / "here" / "metrics.json").is_file() and samples.is_file()
    refused = CliRunner().invoke(app, args)
    assert isinstance(refused.exception, UserError) and "--overwrite" in str(refused.exception)


def test_eval_of_a_sample_folder_in_place_leaves_no_plot_of_an_earlier_evaluation(tmp_path, net_file, clip):
    """--samples FOLDER reads FOLDER/samples.jsonl; an --overwrite that keeps the folder (its samples are inside)
    does not keep a rerank.png the new metrics do not have; generation-only flags are said to be unused."""
    from dallecli.commands.eval import command

    app = typer.Typer()
    app.command()(command)
    app.command("other")(lambda: None)
    run = make_run(tmp_path / "run")
    folder = run / "eval" / "here" / "samples"
    write_samples(folder, [(c, noisy(im, 0.05, i), {"index": i % 2, "prompt_index": i // 2})
                           for i, (im, c, _) in enumerate(render_scene(0, i // 2, 64, "val") for i in range(24))])
    args = ["command", "--run", str(run), "--samples", str(folder), "--features", str(net_file), "--blur", "0",
            "--name", "here", "--no-reconstruction", "--cpu", "--overwrite"]
    first = CliRunner().invoke(app, [*args, "--rerank-sizes", "1,2"])
    assert first.exit_code == 0, first.output
    assert (run / "eval" / "here" / "rerank.png").is_file()
    again = CliRunner().invoke(app, [*args, "--temperature", "2", "--guidance", "3"])
    assert again.exit_code == 0, again.output
    assert not (run / "eval" / "here" / "rerank.png").exists() and "rerank.png" not in again.output
    assert "--temperature, --guidance only shape the samples eval draws itself" in again.output
    empty = tmp_path / "empty"
    empty.mkdir()
    refused = CliRunner().invoke(app, ["command", "--run", str(run), "--samples", str(empty), "--cpu"])
    assert isinstance(refused.exception, UserError) and "is a folder without a samples.jsonl" in str(refused.exception)


def test_evaluations_without_a_name_in_the_same_second_get_folders_of_their_own(tmp_path, net_file, no_clip,
                                                                                  monkeypatch):
    import datetime as dt

    from dallecli.commands.eval import command

    class Frozen(dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2030, 1, 2, 3, 4, 5)

    monkeypatch.setattr(dt, "datetime", Frozen)
    app = typer.Typer()
    app.command()(command)
    app.command("other")(lambda: None)
    run = make_run(tmp_path / "run")
    samples = val_samples(tmp_path / "s")
    args = ["command", "--run", str(run), "--samples", str(samples), "--features", str(net_file), "--blur", "0",
            "--no-reconstruction", "--cpu", "-q"]
    for _ in range(2):
        assert CliRunner().invoke(app, args).exit_code == 0
    bad = CliRunner().invoke(app, [*args, "--blur", "-1"])  # refused before it claims a folder
    assert isinstance(bad.exception, UserError)
    (tmp_path / "no-shards").mkdir()
    failed = CliRunner().invoke(app, [*args, "--shards", str(tmp_path / "no-shards")])  # fails once it runs
    assert isinstance(failed.exception, UserError)
    assert sorted(p.name for p in (run / "eval").iterdir() if p.name != "cache") == [
        "20300102-030405", "20300102-030405-2"]
    assert all((run / "eval" / n / "metrics.json").is_file() for n in ("20300102-030405", "20300102-030405-2"))


def test_unreadable_sample_images_count_with_the_missing_ones(tmp_path, net_file, no_clip):
    run = make_run(tmp_path / "run")
    samples = val_samples(tmp_path / "s", n=20)
    (samples.parent / "0003.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    _, metrics = evaluate(run, quick(samples=samples, features=str(net_file)))
    assert metrics["protocol"]["count"]["missing"] == 1 and metrics["protocol"]["count"]["samples"] == 19
    for i in range(4, 8):
        (samples.parent / f"{i:04d}.png").write_bytes(b"")
    with pytest.raises(UserError, match="5 of the 20 images listed .* are missing or unreadable"):
        evaluate(run, quick(samples=samples, features=str(net_file)))


def test_captions_and_samples_files_that_are_not_utf8_are_one_error(tmp_path, net_file, no_clip):
    run = make_run(tmp_path / "run")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("un caf\u00e9\nune cr\u00e8pe\n".encode("latin-1"))
    with pytest.raises(UserError, match="captions file .*latin.txt is not UTF-8 text"):
        evaluate(run, quick(captions=latin, features=str(net_file)))
    samples = val_samples(tmp_path / "s", n=4)
    samples.write_bytes(samples.read_bytes() + '{"prompt": "caf\u00e9", "image": "0000.png"}\n'.encode("latin-1"))
    with pytest.raises(UserError, match="samples file .*samples.jsonl is not UTF-8 text"):
        evaluate(run, quick(samples=samples, features=str(net_file)))


def test_the_composition_table_is_for_the_shapes_world_not_for_data_captioned_like_it(tmp_path):
    from dallecli.evaluate.inputs import shapes_world

    captions = ["a red circle", "a blue square above a green triangle"]
    folder = tmp_path / "shards"
    folder.mkdir()
    assert shapes_world(folder, captions) == 0  # shards of another tool: judged by their captions
    (folder / "manifest.json").write_text(json.dumps({"arguments": {"source": {"kind": "folder", "path": "x"}}}))
    assert shapes_world(folder, captions) is None  # the user's own pictures
    (folder / "manifest.json").write_text(json.dumps({"arguments": {"source": {"kind": "shapes", "seed": 3}}}))
    assert shapes_world(folder, captions) == 3


def test_one_prompts_candidates_are_evaluated_together(tmp_path, net_file, no_clip):
    """A `dalle rerank --images` folder lists one prompt: its images are measured, not refused."""
    run = make_run(tmp_path / "run")
    scenes = [render_scene(0, i, 64, "val")[0] for i in range(6)]
    samples = write_samples(tmp_path / "one", [("a scene", im, {"index": i}) for i, im in enumerate(scenes)])
    _, metrics = evaluate(run, quick(samples=samples, features=str(net_file)))
    assert metrics["protocol"]["count"]["samples"] == 6 and metrics["protocol"]["count"]["prompts"] == 1


def test_eval_inputs_inside_its_own_folder_stay_put(tmp_path, net_file, no_clip, monkeypatch):
    """Any input kept inside RUN/eval/NAME (a --captions file; --samples through a link from inside) keeps the
    folder where it is: setting it aside would take the input with it."""
    from dallecli import sample
    from dallecli.commands.eval import command

    app = typer.Typer()
    app.command()(command)
    app.command("other")(lambda: None)
    monkeypatch.setattr(sample, "sample_to_folder", fake_sampler([]))
    run = make_run(tmp_path / "run", n=6)
    args = ["command", "--run", str(run), "--features", str(net_file), "--blur", "0", "--composition-count", "2",
            "--no-reconstruction", "--cpu", "-q", "--name", "x"]
    assert CliRunner().invoke(app, args).exit_code == 0
    captions = run / "eval" / "x" / "prompts.txt"
    captions.write_text("a red circle\na blue square\na green triangle\n")
    again = CliRunner().invoke(app, [*args, "--captions", str(captions), "--overwrite"])
    assert again.exit_code == 0, repr(again.exception)
    assert captions.is_file()

    link = run / "eval" / "x" / "linked"
    link.symlink_to(val_samples(tmp_path / "elsewhere").parent, target_is_directory=True)
    linked = CliRunner().invoke(app, [*args, "--samples", str(link / "samples.jsonl"), "--overwrite"])
    assert linked.exit_code == 0, repr(linked.exception)
    assert link.is_symlink() and (run / "eval" / "x" / "metrics.json").is_file()


def test_few_images_are_warned_about_once_and_the_default_count_is_named(tmp_path, net_file, no_clip, capfd,
                                                                          monkeypatch):
    import dallecli.evaluate.run as run_mod

    run = make_run(tmp_path / "run")
    samples = val_samples(tmp_path / "s")
    evaluate(run, quick(samples=samples, features=str(net_file)))
    err = " ".join(capfd.readouterr().err.split())
    assert "fewer than --count (default 1000); using all 24" in err
    assert err.count("noisy and biased upward") == 1 and "24 samples and 24 references" in err
    evaluate(run, quick(samples=samples, features=str(net_file), count=30))
    assert "fewer than --count 30; using all 24" in " ".join(capfd.readouterr().err.split())
    monkeypatch.setattr(run_mod, "FEW_IMAGES", 24)  # 24 of each: enough, no warning
    evaluate(run, quick(samples=samples, features=str(net_file), count=24))
    err = capfd.readouterr().err
    assert "fewer than" not in err and "noisy" not in err


def test_eval_help_names_the_default_count():
    from dallecli.commands.eval import command
    from dallecli.evaluate.run import DEFAULT_COUNT

    app = typer.Typer()
    app.command()(command)
    count = next(p for p in typer.main.get_command(app).params if p.name == "count")
    assert f"(default {DEFAULT_COUNT})" in count.help


def test_drawn_samples_record_which_candidates_were_measured(tmp_path, net_file, clip, monkeypatch):
    """eval --rerank K draws candidates, measures the best of the first K per prompt, and marks exactly those
    `kept` in its samples.jsonl (the sampler had marked all of them): evaluating that file again with
    --samples measures the same images, so gives the same numbers."""
    from dallecli import sample

    def draw(run, prompts, out, *, n=1, rerank=None, seed=0, **kw):
        rows = [(p, noisy(render_scene(0, i, 64, "val")[0], 0.05 * (1 + j), i * n + j),
                 {"index": j, "prompt_index": i, "clip_score": float((i + j) % 3), "kept": True})
                for i, p in enumerate(prompts) for j in range(n)]
        return write_samples(Path(out), rows)

    monkeypatch.setattr(sample, "sample_to_folder", draw)
    run = make_run(tmp_path / "run", n=10)
    folder, first = evaluate(run, quick(features=str(net_file), composition_count=2, rerank=2, rerank_sizes=(1, 4)))
    rows = [json.loads(line) for line in (folder / "samples" / "samples.jsonl").read_text().splitlines()]
    kept = [r for r in rows if r["kept"]]
    assert len(rows) == 40 and len(kept) == 10
    for r in kept:  # the best by clip_score of the prompt's first two candidates
        pair = [x for x in rows if x["prompt_index"] == r["prompt_index"] and x["index"] < 2]
        assert r["index"] < 2 and r["clip_score"] == max(x["clip_score"] for x in pair)
    comp = [json.loads(line) for line in (folder / "samples-composition" / "samples.jsonl").read_text().splitlines()]
    assert sum(r["kept"] for r in comp) == 4
    _, again = evaluate(run, quick(name="again", features=str(net_file), samples=folder / "samples" / "samples.jsonl",
                                   composition_samples=folder / "samples-composition" / "samples.jsonl"))
    assert again["blur"] == first["blur"] and again["composition"] == first["composition"]
    assert again["clip_score"]["generated"] == first["clip_score"]["generated"]


def test_clip_scores_are_100_cosine_floored_at_zero():
    class Fixed:
        def image_features(self, images):
            return torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.6, 0.8]])

        def text_features(self, texts):
            return torch.tensor([[2.0, 0.0]] * len(texts))

    scores = nets.clip_scores(Fixed(), torch.rand(3, 3, 8, 8), ["a", "b", "c"])
    assert scores.tolist() == pytest.approx([100.0, 0.0, 60.0])


def test_composition_overall_counts_every_sample_alike():
    from types import SimpleNamespace

    from dallecli.evaluate.run import _composition

    single, pair = "a red circle", "a red circle above a blue square"
    cands = [SimpleNamespace(prompt=p) for p in [single] * 3 + [pair]]
    acc, counts = _composition(cands, lambda c: c.prompt == single)
    assert acc["seen_single"] == 1.0 and acc["relation_seen"] == 0.0
    assert acc["overall"] == 0.75  # 3 of 4 samples, not the mean of the categories (0.5)


def test_reconstruction_psnr_is_that_of_the_decoded_images(tmp_path):
    from dallecli import checkpoint
    from dallecli.config import to_dict
    from dallecli.evaluate.run import evaluate
    from dallecli.imageutil import to_tensor
    from dallecli.models.dvae import DVAE, PRESETS

    run = make_run(tmp_path / "run", n=8)
    torch.manual_seed(0)
    cfg = PRESETS["tiny"]
    model = DVAE(cfg).eval()
    checkpoint.save(run / "dvae", 1, kind="dvae", model_config=to_dict(cfg), weights=model.state_dict())
    net = tmp_path / "net.pt"
    torch.jit.script(TinyInception().eval()).save(str(net))
    def absent(spec, run, device):
        from dallecli.console import UserError
        raise UserError("no CLIP")

    nets_load, nets.load_scorer = nets.load_scorer, absent
    try:
        _, m = evaluate(run, quick(samples=val_samples(tmp_path / "s", n=8), features=str(net), reconstruction=True))
    finally:
        nets.load_scorer = nets_load
    x = torch.stack([to_tensor(render_scene(0, i, 64, "val")[0]) for i in range(8)])
    with torch.no_grad():
        rec = model.decode_codes(model.encode(x)).float().clamp(0, 1)
    expected = (-10 * torch.log10((rec - x).square().flatten(1).mean(1))).mean().item()
    assert m["reconstruction"]["psnr"] == pytest.approx(expected, rel=1e-4)
