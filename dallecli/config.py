"""Configs as frozen dataclasses with a strict JSON round trip, and the run-directory layout.

Each model keeps its own config dataclass and named presets beside its code (`models/dvae.py`,
`models/prior.py`); this module holds what they share: turning a config into JSON and back,
refusing unknown or missing fields with a message that names them, and the paths of a run.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from dallecli.console import UserError

T = TypeVar("T")


def to_dict(config: Any) -> dict[str, Any]:
    """A config dataclass as plain JSON-able values (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def _coerce(tp: Any, value: Any) -> Any:
    """Bring a JSON value back to the annotated type: lists to tuples, nested dataclasses."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp) and isinstance(value, dict):
        return from_dict(tp, value)
    if origin is tuple and isinstance(value, list):
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v) for v in value)
        return tuple(_coerce(a, v) for a, v in zip(args, value))
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if arg is type(None) and value is None:
                return None
        for arg in typing.get_args(tp):
            if arg is not type(None):
                return _coerce(arg, value)
    if tp is float and isinstance(value, int):
        return float(value)
    return value


def from_dict(cls: type[T], data: dict[str, Any], where: str = "config") -> T:
    """Rebuild `cls` from `data`; unknown or missing fields are a UserError naming them."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise UserError(f"{where}: unknown field(s) {', '.join(unknown)} for {cls.__name__}; "
                        "was it written by a newer version of dalle?")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, field in fields.items():
        if name in data:
            kwargs[name] = _coerce(hints[name], data[name])
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise UserError(f"{where}: missing field '{name}' for {cls.__name__}")
    return cls(**kwargs)


def usual_mode(path: Path | str) -> None:
    """Give a file the mode every other file gets (0666 less the umask). mkstemp and safetensors create theirs
    owner-only (0600), and a manifest, a samples.jsonl or a checkpoint shared with a group or served to a
    browser should read like any other file."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temporary file beside `path`, fsync, then rename over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    usual_mode(tmp)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (renames, new files) durable; a no-op where the system cannot."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_json(path: Path, what: str = "file") -> Any:
    """Read a JSON file; a missing or corrupt one is a UserError that names it."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{what} not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{what} is not valid JSON: {path} ({exc})") from None


def read_utf8(path: Path, what: str) -> str:
    """A text file the user gave (a samples.jsonl, a captions file), as UTF-8: one UserError naming it where it is
    missing, a folder, unreadable or in another encoding (a spreadsheet's UTF-16 export, Latin-1)."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise UserError(f"{what} {path} is a folder; give a text file") from None
    except UnicodeDecodeError:
        raise UserError(f"{what} {path} is not UTF-8 text; save it as UTF-8 and rerun") from None
    except OSError as exc:
        raise UserError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


DEFAULT_RUN = Path("runs/default")


@dataclasses.dataclass(frozen=True)
class RunDir:
    """The folders of one run (DESIGN.md, "The data flow"). Every command takes `--run DIR`."""

    root: Path = DEFAULT_RUN

    @property
    def shards(self) -> Path:
        return self.root / "shards"

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    @property
    def dvae(self) -> Path:
        return self.root / "dvae"

    @property
    def codes(self) -> Path:
        return self.root / "codes"

    @property
    def prior(self) -> Path:
        return self.root / "prior"

    @property
    def clip(self) -> Path:
        return self.root / "clip"

    @property
    def samples(self) -> Path:
        return self.root / "samples"

    @property
    def eval(self) -> Path:
        return self.root / "eval"
