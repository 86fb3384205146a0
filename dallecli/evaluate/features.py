"""Feature networks: what images become before FID / KID / IS (§3.1), and the CLIP glue they share.

`load_features(spec)` gives a `Features`: an extract function (B,3,S,S) in [0, 1] → (features, logits or
None), the side images are resized to, and a content fingerprint that is part of every cache key.
  inception  the FID Inception of pytorch-fid (TF's pt_inception-2015-12-05 weights): torchvision's
             Inception3 layout with pytorch-fid's four FID blocks (pools that skip padding, a max pool in
             the last block), built here, not remapped: the weight file's keys load as they are. Input:
             [0, 1] images, bilinear resize to 299 (align_corners=False), scaled to [-1, 1]: pytorch-fid's
             protocol. Its numbers compare with pytorch-fid's, not bit for bit with TF's resize.
             IS uses torch-fidelity's 'logits_unbiased' (the 1008-way fc without its bias).
  clip       a CLIP image tower (`dallecli.models.clip.load_clip`): unit-normalised image embeddings,
             the CLIP's own preprocessing. No classifier head: IS is null.
  FILE.pt    a TorchScript module: (B, 3, H, W) floats in [0, 1] → (B, D) features, or a tuple
             ((B, D) features, (B, C) class logits); IS is computed only in the second case. An int
             attribute `input_size` makes images be resized (bilinear) to that side first.

The Inception weights are read from a local file (--inception-weights, else the torch hub cache), never
downloaded here: no hidden downloads, evaluation runs offline, and the file's hash (its fingerprint) says
which weights every cached statistic and reported FID came from. A missing file is one line on where to
get it.
"""
from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from dallecli.console import UserError, warn

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{INCEPTION_FILE}"
TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".ts", ".jit")


# --- feature networks ---------------------------------------------------------------------------------------

def _fid_blocks():
    """pytorch-fid's FID blocks: TF's Inception pools skip the padding; its last block max-pools."""
    from torchvision.models.inception import InceptionA, InceptionC, InceptionE

    def avg(x):
        return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)

    class FIDInceptionA(InceptionA):
        def _forward(self, x):
            b5 = self.branch5x5_2(self.branch5x5_1(x))
            b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
            return [self.branch1x1(x), b5, b3, self.branch_pool(avg(x))]

    class FIDInceptionC(InceptionC):
        def _forward(self, x):
            b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
            bd = x
            for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                          self.branch7x7dbl_5):
                bd = layer(bd)
            return [self.branch1x1(x), b7, bd, self.branch_pool(avg(x))]

    class FIDInceptionE(InceptionE):
        def __init__(self, in_channels: int, pool):
            super().__init__(in_channels)
            self.pool = pool

        def _forward(self, x):
            b3 = self.branch3x3_1(x)
            b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
            bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
            bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
            return [self.branch1x1(x), b3, bd, self.branch_pool(self.pool(x))]

    def maxpool(x):
        return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)

    return FIDInceptionA, FIDInceptionC, lambda c: FIDInceptionE(c, avg), lambda c: FIDInceptionE(c, maxpool)


def fid_inception() -> nn.Module:
    """The FID Inception v3 (random weights until loaded): forward((B,3,H,W) in [0,1]) → ((B,2048), (B,1008))."""
    from torchvision.models.inception import Inception3

    A, C, E1, E2 = _fid_blocks()

    class FIDInception(Inception3):
        def __init__(self):
            super().__init__(num_classes=1008, aux_logits=False, transform_input=False, init_weights=False)
            self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = A(192, 32), A(256, 64), A(288, 64)
            self.Mixed_6b, self.Mixed_6c = C(768, 128), C(768, 160)
            self.Mixed_6d, self.Mixed_6e = C(768, 160), C(768, 192)
            self.Mixed_7b, self.Mixed_7c = E1(1280), E2(2048)

        def forward(self, x):
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) * 2 - 1
            for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1",
                         "Conv2d_4a_3x3", "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b",
                         "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "avgpool"):
                x = getattr(self, name)(x)
            pool = x.flatten(1)  # (B, 2048): the FID features
            return pool, F.linear(pool, self.fc.weight)  # (B, 1008) torch-fidelity's 'logits_unbiased'

    return FIDInception().eval()


def inception_weights_path(given: Path | None) -> Path:
    """The FID Inception weights: `given`, else the torch hub cache; absent → one line on how to get them."""
    if given is not None:
        if not Path(given).is_file():
            raise UserError(f"--inception-weights {given} is not a file; download {INCEPTION_URL}")
        return Path(given)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    if cached.is_file():
        return cached
    raise UserError(f"FID Inception weights not found at {cached}: download {INCEPTION_URL} there "
                    "(or pass --inception-weights FILE), or use --features clip")


def load_inception(weights: Path | None, device) -> tuple[nn.Module, str]:
    path = inception_weights_path(weights)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # not torch.save's format, truncated, or code to unpickle: never run code from the file
        what = f"--inception-weights {path}" if weights is not None else str(path)
        raise UserError(f"{what} is not a PyTorch state dict (torch.save format, like pytorch-fid's "
                        f"{INCEPTION_FILE}); download that file from {INCEPTION_URL}") from None
    if not isinstance(state, dict):
        raise UserError(f"{path} holds a {type(state).__name__}, not a state dict; download {INCEPTION_URL}")
    model = fid_inception()
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise UserError(f"{path} does not hold the FID Inception weights (missing {missing[:2]}, "
                        f"unexpected {unexpected[:2]}); download {INCEPTION_URL}")
    return model.to(device).eval(), _sha256(path)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def module_fingerprint(module: nn.Module) -> str:
    """A content hash of a module's parameters and buffers (names, shapes, values)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class Features:
    """A feature network and what the protocol must say about it."""

    name: str               # "inception", "clip", or "torchscript:FILE"
    fingerprint: str        # content hash of the weights: part of every cache key
    input_size: int | None  # the side images are resized to before the network (None: as they come)
    extract: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]  # (B,3,S,S) [0,1] → feats, logits
    is_note: str | None     # why IS is not reported (no classifier head), else None

    @property
    def protocol(self) -> dict:
        return {"name": self.name, "fingerprint": self.fingerprint, "network_input": self.input_size}


def load_features(spec: str, *, device, run: Path | None = None, inception_weights: Path | None = None,
                  clip: str | None = None, scorer=None) -> Features:
    """`inception`, `clip` (the run's CLIP, or `clip` as a load_clip spec) or a TorchScript file."""
    if spec == "inception":
        model, fp = load_inception(inception_weights, device)

        @torch.no_grad()
        def extract(x):
            feats, logits = model(x.to(device))
            return feats.float(), logits.float()

        return Features("inception", fp, 299, extract, None)
    if spec == "clip":
        scorer = scorer or load_scorer(clip, run, device)
        size = (getattr(scorer, "preprocess_cfg", None) or {}).get("size")
        return Features("clip", scorer_fingerprint(scorer), size if isinstance(size, int) else None,
                        lambda x: (image_embeddings(scorer, x), None),
                        "CLIP embeddings are not class logits: IS needs a classifier (use --features inception)")
    check_features(spec)
    return _torchscript_features(Path(spec), device)


def check_features(spec: str, inception_weights: Path | None = None) -> None:
    """What can be checked of a --features spec without loading a network: a known name, an existing
    TorchScript file, the Inception weights where they are needed."""
    if spec == "inception":
        inception_weights_path(inception_weights)
        return
    if inception_weights is not None:
        warn(f"--inception-weights {inception_weights} is unused: --features is {spec}, not inception")
    if spec == "clip":
        return
    path = Path(spec)
    if path.is_file():
        return
    if path.suffix in TORCHSCRIPT_SUFFIXES:
        raise UserError(f"--features {path}: no such TorchScript file")
    raise UserError(f"unknown --features {spec!r}: expected inception, clip or the path of a TorchScript "
                    "file (.pt)")


def _torchscript_features(path: Path, device) -> Features:
    try:
        with warnings.catch_warnings():  # torch ≥ 2.9 calls TorchScript deprecated; it still loads it
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(str(path), map_location="cpu").eval().to(device)
    except Exception as exc:  # a pickle or garbage: torch.jit.load refuses it (and never unpickles code)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if len(first) > 120:  # cut after a whole word
            cut = first.rfind(" ", 0, 120)
            first = first[:cut if cut > 60 else 120] + " …"
        raise UserError(f"--features {path} is not a TorchScript module ({first}); give a file saved with "
                        "torch.jit.save, or --features inception / clip") from None
    size = getattr(module, "input_size", None)
    size = int(size) if isinstance(size, int) and size > 0 else None
    head: dict[str, bool] = {}

    @torch.no_grad()
    def extract(x):
        x = x.to(device)
        if size is not None and x.shape[-1] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        out = module(x)
        feats, logits = (out[0], out[1]) if isinstance(out, (tuple, list)) and len(out) == 2 else (out, None)
        if not isinstance(feats, torch.Tensor) or feats.dim() != 2 or feats.shape[0] != x.shape[0] \
                or (logits is not None and (logits.dim() != 2 or logits.shape[0] != x.shape[0])):
            raise UserError(f"--features {path} must return (B, D) features or ((B, D), (B, C)) for B images")
        head["logits"] = logits is not None
        return feats.float(), None if logits is None else logits.float()

    try:  # fail here, with a clear line, not mid-evaluation
        extract(torch.zeros(2, 3, size or 64, size or 64))
    except RuntimeError as exc:
        raise UserError(f"--features {path} fails on a (2, 3, {size or 64}, {size or 64}) batch of [0, 1] images "
                        f"({str(exc).strip().splitlines()[0][:120]}); give it an int attribute input_size") from None
    note = None if head["logits"] else "the TorchScript network returns no class logits (IS needs a classifier head)"
    return Features(f"torchscript:{path.name}", _sha256(path), size, extract, note)


# --- CLIP glue ------------------------------------------------------------------------------------------------

def load_scorer(spec: str | None, run: Path | None, device):
    from dallecli.models.clip import load_clip

    return load_clip(spec, run, device)


def scorer_fingerprint(scorer) -> str:
    fp = getattr(scorer, "fingerprint", None)
    if isinstance(fp, str) and fp:
        return fp[:16]
    model = getattr(scorer, "model", None)
    if isinstance(model, nn.Module):
        return module_fingerprint(model)
    raise UserError(f"the CLIP scorer {type(scorer).__name__} has neither a fingerprint nor a model to hash")


def _pils(x: torch.Tensor) -> list[Image.Image]:
    from dallecli.imageutil import to_pil

    return [to_pil(im) for im in x]


@torch.no_grad()
def image_embeddings(scorer, x: torch.Tensor) -> torch.Tensor:
    """(B,3,S,S) in [0,1] → (B, D) unit CLIP image embeddings (the scorer preprocesses PIL images)."""
    return F.normalize(scorer.image_features(_pils(x)).float().cpu(), dim=-1)


@torch.no_grad()
def clip_scores(scorer, x: torch.Tensor, captions: list[str]) -> torch.Tensor:
    """The CLIP score of each image against its caption: 100 × cosine, floored at 0 (B,)."""
    img = image_embeddings(scorer, x)
    txt = F.normalize(scorer.text_features(list(captions)).float().cpu(), dim=-1)
    return (100 * (img * txt).sum(-1)).clamp_min(0)
