"""Convert OpenAI's released dVAE (`encoder.pkl`, `decoder.pkl` of the `dall_e` package) to our DVAE.

The released files are whole pickled `nn.Module`s: unpickling them runs whatever the file says, so the
command asks for `--trust-pickle` first. Their classes (`dall_e.encoder.Encoder`, `dall_e.utils.Conv2d`, …)
are replaced by inert stand-ins while loading, so the `dall_e` package need not be installed and none of
its code runs; only the parameters and the few size attributes of the modules are read. Our modules
mirror the released names (`blocks.group_1.block_1.res_path.conv_1.w`), so the state_dict carries over
with an `encoder.` / `decoder.` prefix.
"""
from __future__ import annotations

import pickle
import types
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from dallecli.console import UserError
from dallecli.models.dvae import DVAE, DVAEConfig

RELEASED_GROUP_COUNT = 4  # a class constant of the released Encoder/Decoder, so absent from the pickle
RELEASED_IMAGE_SIZE = 256  # what the released dVAE was trained on; the convolutions accept any multiple of 8


class _Released(nn.Module):
    """An inert stand-in for a class of the `dall_e` package: it holds the unpickled state, nothing more."""

    def forward(self, *args, **kwargs):  # pragma: no cover - never called
        raise RuntimeError("a stand-in for OpenAI's module cannot run; convert it with convert_openai()")


_stand_ins: dict[tuple[str, str], type] = {}


def _stand_in(module: str, name: str) -> type:
    key = (module, name)
    if key not in _stand_ins:
        _stand_ins[key] = type(name, (_Released,), {"__module__": f"dallecli.released.{module}"})
    return _stand_ins[key]


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module == "dall_e" or module.startswith("dall_e."):
            return _stand_in(module, name)
        return super().find_class(module, name)


_pickle_module = types.ModuleType("dallecli_released_pickle")
_pickle_module.Unpickler = _Unpickler
_pickle_module.load = lambda f, **kwargs: _Unpickler(f, **kwargs).load()


def load_openai_pickle(path: Path, trust_pickle: bool, check_only: bool = False) -> nn.Module | None:
    """Unpickle one released module (this runs code from the file: only with `trust_pickle`). `check_only`:
    only refuse a missing file or a missing --trust-pickle (before saying that anything is unpickled)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no such file: {path}; give the encoder.pkl and decoder.pkl of OpenAI's dall_e release")
    if not trust_pickle:
        raise UserError(f"{path} is a pickled Python module, and unpickling runs code from the file; "
                        "pass --trust-pickle if you trust where it came from (OpenAI's dall_e release)")
    if check_only:
        return None
    try:
        with warnings.catch_warnings():  # legacy-format files warn that the stand-ins' source differs
            warnings.simplefilter("ignore", UserWarning)
            obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_pickle_module)
    except Exception as exc:  # a truncated or foreign file: pickle, zipfile and torch raise many types
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        raise UserError(f"cannot unpickle {path}: {type(exc).__name__}: {first}") from None
    if not isinstance(obj, _Released):
        raise UserError(f"{path} holds a {type(obj).__module__}.{type(obj).__name__}, not a module of OpenAI's "
                        "dall_e package (expected dall_e.encoder.Encoder or dall_e.decoder.Decoder)")
    return obj


def _attr(module: nn.Module, name: str, where: str) -> int:
    value = module.__dict__.get(name)
    if not isinstance(value, int):
        raise UserError(f"{where} lacks the integer attribute '{name}' of OpenAI's dall_e modules")
    return value


def convert_openai(encoder: nn.Module, decoder: nn.Module,
                   image_size: int = RELEASED_IMAGE_SIZE) -> tuple[DVAEConfig, dict[str, torch.Tensor]]:
    """Released Encoder + Decoder (the real classes or the stand-ins) → (our config, our state_dict)."""
    if type(encoder).__name__ != "Encoder" or type(decoder).__name__ != "Decoder":
        raise UserError(f"expected an Encoder then a Decoder, got {type(encoder).__name__} and "
                        f"{type(decoder).__name__}; give encoder.pkl first, decoder.pkl second")
    enc = {k: _attr(encoder, k, "the encoder") for k in ("n_hid", "n_blk_per_group", "input_channels", "vocab_size")}
    dec = {k: _attr(decoder, k, "the decoder")
           for k in ("n_init", "n_hid", "n_blk_per_group", "output_channels", "vocab_size")}
    for ours, theirs in (("n_hid", "n_hid"), ("n_blk_per_group", "n_blk_per_group"),
                         ("input_channels", "output_channels"), ("vocab_size", "vocab_size")):
        if enc[ours] != dec[theirs]:
            raise UserError(f"the encoder and decoder do not belong together: encoder {ours}={enc[ours]}, "
                            f"decoder {theirs}={dec[theirs]}")
    config = DVAEConfig(image_size=image_size, channels=enc["input_channels"], n_hid=enc["n_hid"],
                        n_blk_per_group=enc["n_blk_per_group"], groups=RELEASED_GROUP_COUNT,
                        vocab_size=enc["vocab_size"], n_init=dec["n_init"], kind="gumbel")
    weights = {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
    weights |= {f"decoder.{k}": v for k, v in decoder.state_dict().items()}
    with torch.device("meta"):
        model = DVAE(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise UserError(f"the released modules do not match our DVAE: missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]} ({len(missing)} and {len(unexpected)} in all)")
    for key, shape in expected.items():
        if weights[key].shape != shape:
            raise UserError(f"parameter {key} has shape {tuple(weights[key].shape)}, expected {tuple(shape)}")
    return config, {k: v.detach().float().contiguous() for k, v in weights.items()}
