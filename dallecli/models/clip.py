"""open_clip glue: the shipped small architectures, loading a CLIP by name, file or folder, and the scorer.

The paper reranks N samples per caption with a contrastive model (§2.6); `ClipScorer` is that model's
whole interface here: normalised image and text features and their cosine. The architectures are
open_clip's own — one JSON file per architecture, as open_clip ships them — so a model can be built from
a name (ours in `clip_configs/`, e.g. `dalle-tiny`, or any of open_clip's, e.g. `ViT-B-32`), from a
checkpoint folder (`dalle train-clip`'s, or open_clip's `local-dir:`), or from a weights file.

The shipped configs: `dalle-tiny` is a 4-layer, 64-wide ViT on 64-px images with 8-px patches (65 tokens)
and a 2-layer, 128-wide text transformer over 24 tokens (shapes captions take at most 14, emoji names 17):
~4 CPU-minutes of training reach 0.9 image→text top-5 on the shapes val split, and it scores over a
thousand images per CPU-second. (16-px patches at twice the width cost the same and learned less: shapes
are 14–25 px.) `dalle-small` is a 6-layer ViT with 8-px patches for a GPU. Both use open_clip's own BPE
tokenizer (SimpleTokenizer, whose vocabulary ships inside the open_clip package: no download).

Offline by default (DESIGN.md): a pretrained tag (`ViT-B-32:openai`) is used from the local cache; it is
downloaded only when the network is there and HF_HUB_OFFLINE is not set, and otherwise refused at once.
"""
from __future__ import annotations

import copy
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence
from urllib.parse import urlparse

import torch
from PIL import Image
from torch import nn

from dallecli import checkpoint
from dallecli.config import write_json_atomic
from dallecli.console import UserError, info
from dallecli.imageutil import center_square, to_tensor

CONFIG_DIR = Path(__file__).parent / "clip_configs"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
OPEN_CLIP_CONFIG = "open_clip_config.json"  # what open_clip's `local-dir:` reads beside the weights
_registered = False


# --- architectures ----------------------------------------------------------------------------------------

def shipped_models() -> dict[str, Path]:
    """The architectures shipped with dalle: name → JSON file."""
    return {p.stem: p for p in sorted(CONFIG_DIR.glob("*.json"))}


def register() -> None:
    """Make the shipped configs known to open_clip by name (`open_clip.create_model("dalle-tiny")`)."""
    global _registered
    if not _registered:
        import open_clip

        open_clip.add_model_config(CONFIG_DIR)
        _registered = True


def architecture(name: str) -> dict[str, Any]:
    """open_clip's model config (embed_dim, vision_cfg, text_cfg) of a shipped or open_clip architecture."""
    import open_clip

    register()
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise UserError(f"unknown CLIP architecture '{name}'; shipped: {', '.join(shipped_models())}; or one of "
                        f"open_clip's {len(open_clip.list_models())} (e.g. ViT-B-32, RN50; "
                        "`python -c 'import open_clip; print(open_clip.list_models())'` lists them)")
    if "multimodal_cfg" in cfg:
        raise UserError(f"'{name}' is a captioning model (CoCa); reranking needs a plain CLIP architecture")
    return cfg


def model_from_config(model_cfg: dict[str, Any]) -> nn.Module:
    """A randomly initialised open_clip model from its config dict (no downloads: no pretrained towers)."""
    from open_clip.model import CLIP, CustomTextCLIP

    cfg = copy.deepcopy(model_cfg)
    if "multimodal_cfg" in cfg:
        raise UserError("captioning models (CoCa) are not supported; use a plain CLIP architecture")
    hf_text = "hf_model_name" in cfg.get("text_cfg", {})
    if "timm_model_name" in cfg.get("vision_cfg", {}):
        cfg["vision_cfg"]["timm_model_pretrained"] = False
    if hf_text:
        cfg["text_cfg"]["hf_model_pretrained"] = False
    cls = CustomTextCLIP if cfg.pop("custom_text", False) or hf_text else CLIP
    try:
        return cls(**cfg)
    except (ImportError, OSError, RuntimeError, TypeError, ValueError) as exc:
        raise UserError(f"cannot build the CLIP architecture ({_first_line(exc)})") from None


def default_preprocess(model_cfg: dict[str, Any]) -> dict[str, Any]:
    """open_clip's default preprocessing (OpenAI mean/std, shortest-side resize + centre crop) at the model's size."""
    from dataclasses import asdict

    from open_clip.transform import PreprocessCfg

    pp = asdict(PreprocessCfg())
    pp["size"] = model_cfg["vision_cfg"].get("image_size", pp["size"])
    return {k: list(v) if isinstance(v, tuple) else v for k, v in pp.items()}


def tokenizer_for(model_cfg: dict[str, Any]) -> Callable[[Sequence[str]], torch.Tensor]:
    """open_clip's tokenizer for a config: its BPE SimpleTokenizer (ships with open_clip), or the named HF one."""
    import open_clip
    from open_clip.tokenizer import HFTokenizer

    text = model_cfg.get("text_cfg", {})
    context = text.get("context_length", 77)
    if text.get("hf_tokenizer_name"):
        try:
            return HFTokenizer(text["hf_tokenizer_name"], context_length=context, **(text.get("tokenizer_kwargs") or {}))
        except Exception as exc:  # tokenizers / transformers / hub errors of every kind
            raise UserError(f"cannot load the tokenizer {text['hf_tokenizer_name']} ({_first_line(exc)}); it is "
                            "fetched from the Hugging Face hub unless cached") from None
    return open_clip.SimpleTokenizer(context_length=context)


def open_clip_config(model_config: dict[str, Any]) -> dict[str, Any]:
    """open_clip_config.json: beside a checkpoint's weights, `open_clip.create_model("local-dir:" + folder)`
    builds the same model from it and finds `model.safetensors` there."""
    return {"model_cfg": model_config["model_cfg"], "preprocess_cfg": model_config["preprocess_cfg"]}


def write_open_clip_config(folder: Path, model_config: dict[str, Any]) -> Path:
    path = Path(folder) / OPEN_CLIP_CONFIG
    write_json_atomic(path, open_clip_config(model_config))
    return path


def export_open_clip(root: Path) -> list[Path]:
    """Give every complete CLIP checkpoint under `root` (or the step folder `root`) its open_clip_config.json."""
    root = Path(root)
    folders = [root] if (root / "DONE").is_file() else [p for _, p in checkpoint.complete_steps(root)]
    written = []
    for folder in folders:
        if not (folder / OPEN_CLIP_CONFIG).is_file():
            ck = checkpoint.load(folder, "clip")
            written.append(write_open_clip_config(folder, ck.model_config))
    return written


# --- the scorer -------------------------------------------------------------------------------------------

def preprocess(image: Image.Image, cfg: dict[str, Any]) -> torch.Tensor:
    """PIL → (3, S, S) normalised as the model was trained: centre square crop, resize, mean/std.
    (open_clip's eval transform — shortest side + centre crop — gives the same geometry.)"""
    size = cfg["size"]
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    image = image.convert("RGB") if image.mode != "RGB" else image
    if cfg.get("resize_mode") == "squash" or h != w:
        image = image.resize((w, h), Image.BICUBIC)
    else:
        image = center_square(image, h)
    x = to_tensor(image)
    mean = torch.tensor(cfg["mean"], dtype=x.dtype).view(3, 1, 1)
    std = torch.tensor(cfg["std"], dtype=x.dtype).view(3, 1, 1)
    return (x - mean) / std


@dataclass
class ClipScorer:
    """A contrastive image–text model, ready to score: cosine similarities of normalised features."""

    model: nn.Module  # an open_clip CLIP, eval mode, on `device`
    tokenizer: Callable[[Sequence[str]], torch.Tensor]
    preprocess_cfg: dict[str, Any]
    device: torch.device
    name: str  # what it is, for reports: a checkpoint path, NAME:TAG, a file
    fingerprint: str | None = None  # the checkpoint's content hash, when it is one of ours
    batch_size: int = 256

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp())

    @torch.inference_mode()
    def image_features(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(N, D) L2-normalised image embeddings (on the CPU), computed in batches."""
        out = []
        for lo in range(0, len(images), self.batch_size):
            x = torch.stack([preprocess(im, self.preprocess_cfg) for im in images[lo: lo + self.batch_size]])
            out.append(self.model.encode_image(x.to(self.device), normalize=True).float().cpu())
        if not out:
            raise ValueError("image_features() of no images")
        return torch.cat(out)

    @torch.inference_mode()
    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        """(M, D) L2-normalised text embeddings (on the CPU)."""
        out = []
        for lo in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(list(texts[lo: lo + self.batch_size])).to(self.device)
            out.append(self.model.encode_text(tokens, normalize=True).float().cpu())
        if not out:
            raise ValueError("text_features() of no texts")
        return torch.cat(out)

    def similarity(self, images: Sequence[Image.Image], texts: Sequence[str]) -> torch.Tensor:
        """(N, M) cosines of every image with every text. `logit_scale * similarity` are CLIP's logits."""
        return self.image_features(images) @ self.text_features(texts).T

    def score(self, images: Sequence[Image.Image], texts: Sequence[str]) -> torch.Tensor:
        """(N,) cosine of each (image, text) pair; one text is paired with every image. Texts are encoded once each."""
        if len(texts) == 1:
            texts = list(texts) * len(images)
        if len(texts) != len(images):
            raise ValueError(f"score() pairs images with texts: got {len(images)} images and {len(texts)} texts")
        unique = list(dict.fromkeys(texts))
        txt = self.text_features(unique)  # (U, D)
        row = {t: i for i, t in enumerate(unique)}
        which = torch.tensor([row[t] for t in texts], dtype=torch.long)
        return (self.image_features(images) * txt[which]).sum(-1)


# --- loading ----------------------------------------------------------------------------------------------

def load_clip(spec: str | None, run_dir: Path, device: str | torch.device = "cpu", *,
              model: str | None = None, batch_size: int = 256) -> ClipScorer:
    """A scorer from `spec`:

    - None: the run's own CLIP (RUN/clip, its latest complete checkpoint);
    - a checkpoint folder of `dalle train-clip` (a step folder or the folder above the steps);
    - `local-dir:FOLDER`: an open_clip folder (open_clip_config.json + weights);
    - `hf-hub:ORG/REPO`: an open_clip model on the Hugging Face hub (from the local cache; downloaded only when online);
    - `NAME:TAG`: an open_clip or shipped architecture with pretrained weights, e.g. `ViT-B-32:openai`
      (from the local cache; downloaded only when online);
    - a weights file (.safetensors, .bin, .pt, .pth) with `model=NAME`, its architecture.
    """
    from dallecli.config import RunDir

    register()
    device = torch.device(device)
    if spec is None:
        loaded = _from_checkpoint(RunDir(Path(run_dir)).clip)
    elif spec.startswith("local-dir:"):
        loaded = _from_local_dir(Path(spec[len("local-dir:"):]))
    elif spec.startswith("hf-hub:"):
        loaded = _from_hf_hub(spec[len("hf-hub:"):])
    elif Path(spec).is_dir():
        loaded = _from_checkpoint(Path(spec))
    elif Path(spec).is_file():
        loaded = _from_file(Path(spec), model)
    elif ":" in spec and not spec.startswith(("hf-hub:", "/", ".", "~")):
        name, tag = spec.split(":", 1)
        loaded = _from_pretrained(name, tag)
    elif _looks_like_path(spec):
        raise UserError(f"--clip {spec}: no such file or folder; give a CLIP checkpoint folder, a weights file, "
                        "NAME:TAG (e.g. ViT-B-32:openai) or local-dir:FOLDER")
    else:
        raise UserError(f"--clip {spec} names an architecture without weights; add a pretrained tag (NAME:TAG, "
                        f"e.g. ViT-B-32:openai) or pass a weights file with --clip FILE --clip-model {spec}")
    net, tokenizer, pp, name, fingerprint = loaded
    return ClipScorer(model=net.to(device).eval(), tokenizer=tokenizer, preprocess_cfg=pp, device=device,
                      name=name, fingerprint=fingerprint, batch_size=batch_size)


def _looks_like_path(spec: str) -> bool:
    return "/" in spec or spec.endswith(WEIGHT_SUFFIXES) or spec.startswith(("~", "."))


def _from_checkpoint(path: Path):
    ck = checkpoint.load(path, "clip")
    cfg = ck.model_config
    missing = [k for k in ("name", "model_cfg", "preprocess_cfg") if k not in cfg]
    if missing:
        raise UserError(f"{ck.path}/config.json: the CLIP model config lacks {', '.join(missing)}")
    net = model_from_config(cfg["model_cfg"])
    try:
        net.load_state_dict(ck.weights())
    except RuntimeError as exc:
        raise UserError(f"{ck.path}: weights do not match its CLIP config ({_first_line(exc)[:200]})") from None
    return net, tokenizer_for(cfg["model_cfg"]), cfg["preprocess_cfg"], f"{ck.path} ({cfg['name']})", ck.fingerprint


def _from_local_dir(folder: Path):
    import open_clip

    if (folder / "config.json").is_file() and (folder / "DONE").is_file():
        return _from_checkpoint(folder)  # one of ours: validated as a clip checkpoint
    if not (folder / OPEN_CLIP_CONFIG).is_file():
        raise UserError(f"local-dir:{folder}: no {OPEN_CLIP_CONFIG} there (open_clip's folder format: that file "
                        "plus open_clip_model.safetensors)")
    try:
        net = open_clip.create_model(f"local-dir:{folder}", weights_only=True, require_pretrained=True)
        tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    except Exception as exc:  # open_clip raises FileNotFoundError, ValueError, RuntimeError, unpickling errors
        raise UserError(f"cannot load the CLIP in local-dir:{folder} ({_first_line(exc)[:200]})") from None
    return net, tokenizer, open_clip.get_model_preprocess_cfg(net), f"local-dir:{folder}", None


def _from_file(path: Path, model: str | None):
    if (path.parent / "config.json").is_file() and (path.parent / "DONE").is_file():
        return _from_checkpoint(path.parent)  # a weights file inside one of our checkpoints: check its kind
    if path.suffix not in WEIGHT_SUFFIXES:
        raise UserError(f"--clip {path}: expected a weights file ({', '.join(WEIGHT_SUFFIXES)}) or a checkpoint folder")
    kind = _safetensors_kind(path)
    if kind not in (None, "clip"):
        raise UserError(f"{path} holds {kind} weights (kind: {kind} != clip); pass a CLIP checkpoint")
    if model is None:
        raise UserError(f"--clip {path} is a bare weights file: name its architecture with --clip-model NAME "
                        f"(e.g. {', '.join(shipped_models())} or ViT-B-32)")
    import open_clip

    cfg = architecture(model)
    net = model_from_config(cfg)
    try:
        open_clip.load_checkpoint(net, str(path), strict=True, weights_only=True)  # .pt/.bin: torch.load(weights_only)
    except Exception as exc:  # UnpicklingError for code in a pickle, RuntimeError for mismatched keys, …
        text = _first_line(exc)
        if "weights_only" in text or "Unpickl" in type(exc).__name__:
            raise UserError(f"refusing to load {path}: not a plain tensor file (it would run code to unpickle)") from None
        raise UserError(f"{path} does not hold {model} weights ({text[:200]}); check --clip-model") from None
    pp = default_preprocess(cfg)
    return net, tokenizer_for(cfg), pp, f"{path} ({model})", None


def _safetensors_kind(path: Path) -> str | None:
    if path.suffix != ".safetensors":
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("kind")
    except Exception as exc:  # a corrupt header
        raise UserError(f"{path} is not a readable safetensors file ({_first_line(exc)})") from None


# --- pretrained weights, offline first ----------------------------------------------------------------------

def offline() -> bool:
    """True when the environment forbids downloads (HF_HUB_OFFLINE=1, as the tests run)."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def cached_pretrained(pretrained_cfg: dict[str, Any], cache_dir: str | None = None) -> str | None:
    """The local file open_clip would download for a pretrained tag, if it is already there."""
    from huggingface_hub import try_to_load_from_cache
    from open_clip.pretrained import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    if pretrained_cfg.get("file") and Path(pretrained_cfg["file"]).is_file():
        return pretrained_cfg["file"]
    if pretrained_cfg.get("hf_hub"):
        repo, filename = os.path.split(pretrained_cfg["hf_hub"])
        names = [filename] if filename else [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME]
        if filename.endswith((".bin", ".pth")):
            names.insert(0, filename[:-4] + ".safetensors")
        for name in names:
            found = try_to_load_from_cache(repo, name, cache_dir=cache_dir)
            if isinstance(found, str):
                return found
    if pretrained_cfg.get("url"):
        path = Path(cache_dir or os.path.expanduser("~/.cache/clip")) / os.path.basename(pretrained_cfg["url"])
        if path.is_file():
            return str(path)
    return None


def _unreachable(host: str, timeout: float = 3.0) -> str | None:
    """Why `host`:443 cannot be reached within `timeout` seconds (DNS included), or None if it can."""
    import socket

    result: list[str | None] = []

    def probe():
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            result.append(None)
        except OSError as exc:
            result.append(str(exc) or type(exc).__name__)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return result[0] if result else f"no answer in {timeout:g} s"


def _from_pretrained(name: str, tag: str, cache_dir: str | None = None):
    import open_clip
    from open_clip.transform import merge_preprocess_dict

    architecture(name)  # a clear error for an unknown name
    pcfg = open_clip.get_pretrained_cfg(name, tag)
    if not pcfg:
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise UserError(f"open_clip has no pretrained weights '{tag}' for {name}; "
                        + (f"known tags: {', '.join(tags)}" if tags else "it has no pretrained tags"))
    path = cached_pretrained(pcfg, cache_dir)
    if path is None:
        source = f"hf-hub:{os.path.split(pcfg['hf_hub'])[0]}" if pcfg.get("hf_hub") else pcfg.get("url", "?")
        fix = f"run once with network access, or pass a local file: --clip FILE --clip-model {name}"
        if offline():
            raise UserError(f"CLIP weights {name}:{tag} are not in the local cache and downloads are off "
                            f"(HF_HUB_OFFLINE=1); {fix}")
        from huggingface_hub import constants

        host = urlparse(constants.ENDPOINT if pcfg.get("hf_hub") else pcfg["url"]).hostname or "huggingface.co"
        reason = _unreachable(host)
        if reason is not None:
            raise UserError(f"CLIP weights {name}:{tag} are not cached and {host} cannot be reached ({reason}); {fix}")
        info(f"downloading CLIP weights {name}:{tag} from {source}")
        try:
            path = open_clip.pretrained.download_pretrained(pcfg, cache_dir=cache_dir)
        except Exception as exc:  # network, hub and file errors of every kind
            raise UserError(f"downloading CLIP weights {name}:{tag} failed ({_first_line(exc)[:200]}); {fix}") from None
    try:
        net = open_clip.create_model(name, pretrained=path, force_quick_gelu=bool(pcfg.get("quick_gelu", False)),
                                     pretrained_text=False, weights_only=True)
        tokenizer = open_clip.get_tokenizer(name)
    except Exception as exc:
        raise UserError(f"cannot load CLIP {name}:{tag} from {path} ({_first_line(exc)[:200]})") from None
    pp = merge_preprocess_dict(open_clip.get_model_preprocess_cfg(net), pcfg)
    return net, tokenizer, pp, f"{name}:{tag}", None


def _from_hf_hub(repo: str):
    import open_clip
    from huggingface_hub import constants, try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(repo, OPEN_CLIP_CONFIG), str):
        fix = "run once with network access, or download the folder and pass --clip local-dir:FOLDER"
        if offline():
            raise UserError(f"hf-hub:{repo} is not in the local cache and downloads are off (HF_HUB_OFFLINE=1); {fix}")
        host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
        reason = _unreachable(host)
        if reason is not None:
            raise UserError(f"hf-hub:{repo} is not cached and {host} cannot be reached ({reason}); {fix}")
        info(f"downloading CLIP hf-hub:{repo}")
    try:
        net = open_clip.create_model(f"hf-hub:{repo}", weights_only=True, require_pretrained=True)
        tokenizer = open_clip.get_tokenizer(f"hf-hub:{repo}")
    except Exception as exc:
        raise UserError(f"cannot load CLIP hf-hub:{repo} ({_first_line(exc)[:200]})") from None
    return net, tokenizer, open_clip.get_model_preprocess_cfg(net), f"hf-hub:{repo}", None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
