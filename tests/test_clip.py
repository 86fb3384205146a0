"""CLIP for reranking: shipped configs, training through the shared loop, loading by every spec, offline refusal."""
import io
import json
import socket

import numpy as np
import pytest
import torch

from dallecli import checkpoint
from dallecli.console import UserError
from dallecli.data.records import write_tar
from dallecli.data.shapes import iter_scenes
from dallecli.models.clip import (ClipScorer, architecture, default_preprocess, export_open_clip, load_clip,
                                  model_from_config, register, shipped_models, tokenizer_for)
from dallecli.train.clip_task import ClipTask
from dallecli.train.loop import TrainConfig, train

# A model small enough to train in a few seconds: 32-px images, one block per tower.
MICRO = {"embed_dim": 32,
         "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "head_width": 16, "layers": 1},
         "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


# Solid colours named in the caption: a signal the micro model learns within 40 steps.
COLORS = {"red": (220, 20, 20), "green": (20, 160, 40), "blue": (30, 60, 220), "yellow": (240, 210, 20),
          "purple": (140, 40, 190), "cyan": (0, 190, 200), "orange": (250, 140, 0), "black": (10, 10, 10),
          "white": (250, 250, 250), "gray": (128, 128, 128), "pink": (250, 150, 190), "brown": (120, 70, 20)}


def png(image):
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def make_color_shards(folder, n_train=48, n_val=24, size=32):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    names = list(COLORS)
    for split, n, seed in (("train", n_train, 0), ("val", n_val, 1)):
        rng = np.random.default_rng(seed)
        records = []
        for i in range(n):
            name = names[i % len(names)]
            rgb = np.clip(np.array(COLORS[name]) + rng.integers(-20, 21, 3), 0, 255).astype(np.uint8)
            image = Image.fromarray(np.ascontiguousarray(np.broadcast_to(rgb, (size, size, 3))))
            records.append((f"{split}{i:04d}", {"png": png(image), "txt": f"a {name} picture".encode()}))
        write_tar(folder / f"{split}-000000.tar", records)
    return folder


def make_shards(folder, n_train=64, n_val=32, size=32):
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("val", n_val)):
        records = []
        for key, image, caption, meta in iter_scenes(split, n, seed=0, size=size):
            records.append((key, {"png": png(image), "txt": caption.encode(), "json": json.dumps(meta).encode()}))
        write_tar(folder / f"{split}-000000.tar", records)
    return folder


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test: proves that nothing tried the network."""
    def refuse(*args, **kwargs):
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.fixture
def empty_caches(monkeypatch, tmp_path):
    """No Hugging Face or ~/.cache/clip weights: a pretrained tag cannot be found locally."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def micro_task(shards, **kw):
    return ClipTask(name="micro", model_cfg=MICRO, preprocess_cfg=default_preprocess(MICRO), shards=shards,
                    batch_size=16, seed=0, **kw)


def test_shipped_configs_are_open_clip_architectures():
    import open_clip

    assert {"dalle-tiny", "dalle-small"} <= set(shipped_models())
    register()
    assert "dalle-tiny" in open_clip.list_models()
    cfg = architecture("dalle-tiny")
    assert cfg["vision_cfg"]["image_size"] == 64 and cfg["text_cfg"]["vocab_size"] == 49408
    assert architecture("ViT-B-32")["vision_cfg"]["image_size"] == 224  # open_clip's own names work too
    with pytest.raises(UserError, match="unknown CLIP architecture 'nope'.*dalle-tiny"):
        architecture("nope")


def test_tokenizer_is_open_clips_and_offline(no_network, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = tokenizer_for(architecture("dalle-tiny"))
    ids = tok(["a red circle to the left of a blue square", "a cat"])
    assert ids.shape == (2, 24) and ids.dtype == torch.long
    assert int((ids[1] > 0).sum()) == 4  # <start> a cat <end>


def test_training_lowers_the_loss_and_open_clip_loads_the_checkpoint(tmp_path):
    import open_clip

    shards = make_color_shards(tmp_path / "shards")
    cfg = TrainConfig(steps=40, batch_size=16, lr=1e-3, warmup=5, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.1,
                      save_every=20, eval_every=20, log_every=1, keep=2, seed=0)
    result = train(micro_task(shards, augment=False), cfg, tmp_path / "clip")
    rows = [json.loads(line) for line in (tmp_path / "clip" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["split"] == "train"]
    assert np.mean(losses[:5]) > 2.4 and np.mean(losses[-5:]) < 1.5  # chance is ln 16 = 2.77
    val = [r for r in rows if r["split"] == "val"][-1]
    assert (val["val_images"], val["val_candidates"]) == (24, 12)  # 24 images share 12 distinct captions
    assert val["val_top1"] > 0.5 and val["val_top5"] >= val["val_top1"]
    assert val["val_loss"] < 1.5

    step = result.checkpoint
    # Every saved checkpoint carries open_clip's config from its save on (nothing left for a later export).
    assert all((p / "open_clip_config.json").is_file() for _, p in checkpoint.complete_steps(tmp_path / "clip"))
    assert export_open_clip(tmp_path / "clip") == []
    ours = load_clip(str(step), tmp_path, "cpu")
    theirs, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{step}")
    theirs.eval()
    texts = ["a red circle", "a blue square to the left of a green cross"]
    with torch.no_grad():
        expect = theirs.encode_text(open_clip.get_tokenizer(f"local-dir:{step}")(texts), normalize=True)
    assert torch.allclose(ours.text_features(texts), expect, atol=1e-5)
    images = [im for _, im, _, _ in iter_scenes("val", 3, seed=0, size=32)]
    with torch.no_grad():
        expect = theirs.encode_image(torch.stack([preprocess(im) for im in images]), normalize=True)
    assert torch.allclose(ours.image_features(images), expect, atol=1e-4)
    # RUN/clip is the default: spec None finds the latest complete step.
    run_default = load_clip(None, tmp_path, "cpu")
    assert run_default.fingerprint == checkpoint.load(step, "clip").fingerprint


def test_weights_files_load_with_their_architecture(tmp_path):
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(0)
    net = model_from_config(architecture("dalle-tiny")).eval()
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    save_file(state, tmp_path / "w.safetensors")
    torch.save(state, tmp_path / "w.pt")
    texts = ["a yellow triangle"]
    with torch.no_grad():
        expect = net.encode_text(tokenizer_for(architecture("dalle-tiny"))(texts), normalize=True)
    for name in ("w.safetensors", "w.pt"):
        scorer = load_clip(str(tmp_path / name), tmp_path, "cpu", model="dalle-tiny")
        assert torch.allclose(scorer.text_features(texts), expect, atol=1e-6)
    # open_clip itself loads the same file by name (the shipped config is registered).
    theirs = open_clip.create_model("dalle-tiny", pretrained=str(tmp_path / "w.safetensors")).eval()
    with torch.no_grad():
        assert torch.allclose(theirs.encode_text(open_clip.tokenize(texts, context_length=24), normalize=True),
                              expect, atol=1e-6)
    with pytest.raises(UserError, match="--clip-model NAME"):
        load_clip(str(tmp_path / "w.safetensors"), tmp_path, "cpu")
    with pytest.raises(UserError, match="does not hold dalle-small weights"):
        load_clip(str(tmp_path / "w.safetensors"), tmp_path, "cpu", model="dalle-small")


class Payload:
    """Unpickling this would need code: weights_only loading must refuse it."""


def test_pickled_code_is_refused(tmp_path):
    torch.save({"state_dict": {"x": torch.zeros(1)}, "obj": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(UserError, match="not a plain tensor file"):
        load_clip(str(tmp_path / "evil.pt"), tmp_path, "cpu", model="dalle-tiny")


def test_offline_pretrained_tag_fails_at_once(no_network, empty_caches, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match=r"ViT-B-32:openai are not in the local cache and downloads are off") as exc:
        load_clip("ViT-B-32:openai", tmp_path, "cpu")
    assert "\n" not in str(exc.value) and "--clip FILE --clip-model ViT-B-32" in str(exc.value)
    with pytest.raises(UserError, match="not in the local cache"):
        load_clip("hf-hub:org/some-clip", tmp_path, "cpu")
    with pytest.raises(UserError, match="no pretrained weights 'nope' for ViT-B-32; known tags: .*openai"):
        load_clip("ViT-B-32:nope", tmp_path, "cpu")


def test_unreachable_network_fails_at_once(empty_caches, monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    calls = []

    def unreachable(address, timeout=None, *args):
        calls.append(address)
        raise OSError("Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    with pytest.raises(UserError, match=r"not cached and .* cannot be reached \(Network is unreachable\)"):
        load_clip("ViT-B-32:openai", tmp_path, "cpu")
    assert len(calls) == 1  # one probe, no retries


def test_a_dvae_checkpoint_is_not_a_clip(tmp_path):
    dvae = checkpoint.save(tmp_path / "dvae", 5, kind="dvae", model_config={"vocab_size": 8},
                           weights={"w": torch.zeros(2)})
    for spec in (str(tmp_path / "dvae"), str(dvae), str(dvae / "model.safetensors"), f"local-dir:{dvae}"):
        with pytest.raises(UserError, match="is a dvae checkpoint, but a clip checkpoint was expected") as exc:
            load_clip(spec, tmp_path, "cpu")
        assert "\n" not in str(exc.value)
    (tmp_path / "loose.safetensors").write_bytes((dvae / "model.safetensors").read_bytes())
    with pytest.raises(UserError, match="holds dvae weights"):
        load_clip(str(tmp_path / "loose.safetensors"), tmp_path, "cpu", model="dalle-tiny")


def test_missing_specs_say_what_to_do(tmp_path):
    with pytest.raises(UserError, match="make one with `dalle train-clip`"):
        load_clip(None, tmp_path, "cpu")
    with pytest.raises(UserError, match="no such file or folder"):
        load_clip("missing/weights.safetensors", tmp_path, "cpu")
    with pytest.raises(UserError, match="architecture without weights"):
        load_clip("ViT-B-32", tmp_path, "cpu")


def test_score_is_the_cosine_of_each_pair():
    torch.manual_seed(0)
    cfg = architecture("dalle-tiny")
    scorer = ClipScorer(model=model_from_config(cfg).eval(), tokenizer=tokenizer_for(cfg),
                        preprocess_cfg=default_preprocess(cfg), device=torch.device("cpu"), name="random", batch_size=2)
    images = [im for _, im, _, _ in iter_scenes("val", 5, seed=0, size=64)]
    texts = ["a red circle", "a blue square", "a red circle", "a green cross", "a cat"]
    img, txt = scorer.image_features(images), scorer.text_features(texts)
    assert img.shape == (5, 128) and torch.allclose(img.norm(dim=-1), torch.ones(5), atol=1e-5)
    assert torch.allclose(scorer.score(images, texts), (img * txt).sum(-1), atol=1e-5)
    assert torch.allclose(scorer.similarity(images, texts), img @ txt.T, atol=1e-5)
    assert torch.allclose(scorer.score(images, ["a cat"]), img @ txt[4], atol=1e-5)
    with pytest.raises(ValueError, match="5 images and 2 texts"):
        scorer.score(images, texts[:2])


def _app():
    import typer

    from dallecli.commands import train_clip

    app = typer.Typer()
    app.callback()(lambda: None)
    app.command("train-clip")(train_clip.command)
    return app


def test_train_clip_refuses_an_unknown_model(tmp_path):
    from typer.testing import CliRunner

    result = CliRunner().invoke(_app(), ["train-clip", "--run", str(tmp_path), "--model", "nope"])
    assert result.exit_code != 0 and "unknown CLIP architecture 'nope'" in str(result.exception)


@pytest.mark.slow
def test_train_clip_command_end_to_end(tmp_path):
    import open_clip
    from typer.testing import CliRunner

    make_shards(tmp_path / "shards", n_train=32, n_val=16, size=64)
    args = ["train-clip", "--run", str(tmp_path), "--steps", "4", "--batch-size", "8", "--lr", "2e-4",
            "--eval-every", "2", "--save-every", "2", "--quiet"]
    result = CliRunner().invoke(_app(), args)
    assert result.exit_code == 0, result.output
    step = checkpoint.latest(tmp_path / "clip")
    assert step.name == "step-00000004" and (step / "open_clip_config.json").is_file()
    assert checkpoint.load(step, "clip").model_config["name"] == "dalle-tiny"
    open_clip.create_model(f"local-dir:{step}", require_pretrained=True)
    vals = [json.loads(line) for line in (tmp_path / "clip" / "metrics.jsonl").read_text().splitlines()]
    assert {"val_top1", "val_top5", "val_loss"} <= set(vals[-1])
    # A rerun resumes: already at --steps, nothing more to do.
    assert CliRunner().invoke(_app(), args).exit_code == 0
    # A longer rerun without the options keeps the run's own (not dalle-tiny's batch 128 and lr 1e-3)
    longer = CliRunner().invoke(_app(), ["train-clip", "--run", str(tmp_path), "--steps", "5", "--eval-every", "0",
                                         "--quiet"])
    assert longer.exit_code == 0, longer.output
    saved = json.loads((tmp_path / "clip" / "train_config.json").read_text())
    assert (saved["batch_size"], saved["lr"], saved["steps"]) == (8, 2e-4, 5)


def test_cached_pretrained_weights_are_found_without_network(no_network, empty_caches, tmp_path):
    import open_clip

    from dallecli.models.clip import cached_pretrained

    pcfg = open_clip.get_pretrained_cfg("ViT-B-32", "openai")  # on the hub as timm/…openai/, and at an OpenAI URL
    assert cached_pretrained(pcfg) is None
    clip_cache = tmp_path / "home" / ".cache" / "clip"
    clip_cache.mkdir(parents=True)
    (clip_cache / "ViT-B-32.pt").write_bytes(b"x")
    assert cached_pretrained(pcfg) == str(clip_cache / "ViT-B-32.pt")
    snapshot = tmp_path / "hf" / "models--timm--vit_base_patch32_clip_224.openai" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "open_clip_model.safetensors").write_bytes(b"x")
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc")
    assert cached_pretrained(pcfg) == str(snapshot / "open_clip_model.safetensors")  # the hub's safetensors first


def test_train_clip_help_quotes_the_defaults_it_uses():
    import typer

    from dallecli.commands.train_clip import DEFAULTS

    steps, batch, lr = DEFAULTS["dalle-tiny"]
    params = {p.name: p.help for p in typer.main.get_command(_app()).commands["train-clip"].params}
    assert f"dalle-tiny {steps})" in params["steps"]
    assert f"dalle-tiny {batch})" in params["batch_size"]
    assert f"dalle-tiny {lr:g})" in params["lr"]
