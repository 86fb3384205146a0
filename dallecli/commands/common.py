"""Options every command shares, and the start-up every command does."""
from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

RunOpt = Annotated[Path, typer.Option("--run", help="Run directory: inputs are found and outputs written here.",
                                      show_default=True)]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or messages; errors and the summary still print.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show full tracebacks instead of one-line errors.")]
DEFAULT_RUN = Path("runs/default")


class Precision(str, Enum):
    """--precision of the commands that only run models (sample, encode)."""
    fp32 = "fp32"
    bf16 = "bf16"


class TrainPrecision(str, Enum):
    """--precision of the training commands: fp16 too (with gradient scaling)."""
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


def start(quiet: bool = False, debug: bool = False) -> None:
    """Apply --quiet / --debug for this process, and keep freed memory for reuse (`allocator.keep_freed_memory`)."""
    from dallecli.allocator import keep_freed_memory
    from dallecli.console import settings

    keep_freed_memory()

    settings.quiet = settings.quiet or quiet
    settings.debug = settings.debug or debug


def refuse_nonpositive(**flags: float | None) -> None:
    """One line for a count, size or rate flag given as 0 or less (None: not given, the default applies). A 0
    is refused rather than read as "the default": `--steps 0` must not train a preset's full schedule."""
    from dallecli.console import UserError

    for name, value in flags.items():
        if value is not None and not 0 < value < float("inf"):
            raise UserError(f"--{name.replace('_', '-')} must be a finite number greater than 0 (got {value}); leave "
                            "it out for the default")


def claim_new_folder(parent: Path) -> tuple[str, list[Path]]:
    """The name of a new, empty folder made under `parent` for a command's output when no name was given: the
    date and time, with -2, -3 … where another command took that name first. `mkdir` fails where the folder
    exists, so two commands started in the same second (`dalle sample a & dalle sample b`) never share a
    folder. Also returns the folders made for it (it and the missing parents, innermost first), which
    `ReplacedFolder(made=…)` removes again if the command fails."""
    from datetime import datetime

    from dallecli.console import UserError

    stem = datetime.now().strftime("%Y%m%d-%H%M%S")
    missing = [p for p in (parent, *parent.parents) if not p.exists()]
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot make the folder {parent} ({exc.strerror or exc}); check the path and its "
                        "permissions, or give another --run") from None
    for i in range(1, 1000):
        name = stem if i == 1 else f"{stem}-{i}"
        try:
            (parent / name).mkdir()
            return name, [parent / name, *missing]
        except FileExistsError:
            continue
        except OSError as exc:
            raise UserError(f"cannot make a folder in {parent} ({exc.strerror or exc}); check its permissions, "
                            "or give another --run") from None
    raise UserError(f"{parent} already holds folders {stem} … {stem}-999; give a --name")


class ReplacedFolder:
    """The output folder a command writes (a samples folder, an evaluation), and what was there before. An
    existing folder with files in it is refused unless `overwrite`; with it, the old folder waits in a hidden
    sibling while the new one is written, is deleted once the command succeeds and comes back if it fails: a
    failed command loses nothing, and leaves no half-written folder behind (so that the same command can simply
    be run again). `what` names the folder's contents in messages ("samples", "evaluation"), `flags` the
    options that choose the folder. `markers` are the files (any one of them) that a folder this command wrote
    holds: --overwrite replaces only such a folder, never one of the user's own (`--out ~/photos`).
    `active` False (a worker process of a launched run) does nothing: the launching process does it. `made`:
    the folder and its parents made empty for this command (`claim_new_folder`), which go if it fails."""

    def __init__(self, folder: Path, overwrite: bool, active: bool = True, what: str = "samples",
                 flags: str = "--name (or --out)", markers: tuple[str, ...] = ("sampling.json", "samples.jsonl"),
                 made: list[Path] | tuple = ()):
        import os

        self.folder, self.overwrite, self.active = Path(folder), overwrite, active
        self.what, self.flags, self.markers = what, flags, markers
        whole = Path(os.path.abspath(folder))  # `--out .` has no name of its own to put beside
        self.aside = whole.with_name(f".{whole.name}.replaced")
        self.moved = self.new = False
        self.made = list(made)

    def __enter__(self) -> ReplacedFolder:
        from dallecli.console import UserError

        folder = self.folder
        if not self.active:
            return self
        if folder.exists() and not folder.is_dir():
            raise UserError(f"{folder} is a file, not a folder; give another {self.flags} for the {self.what}")
        if self.aside.exists():
            raise UserError(f"an earlier command replacing {folder} was interrupted and left what was there "
                            f"before in {self.aside}: move that back or delete it, then rerun")
        if folder.is_dir() and any(folder.iterdir()):
            if not any((folder / m).exists() for m in self.markers):
                raise UserError(f"{folder} holds files but is not a {self.what} folder (no "
                                f"{' or '.join(self.markers)}), and --overwrite never replaces such a folder; "
                                f"choose a new or empty folder with {self.flags}")
            if not self.overwrite:
                raise UserError(f"{self.what} folder {folder} already exists; choose another {self.flags}, or "
                                "pass --overwrite to replace it")
            if Path.cwd().resolve().is_relative_to(folder.resolve()):
                raise UserError(f"{folder} is the current folder or holds it, so --overwrite cannot replace it; "
                                f"run the command from elsewhere or choose another {self.flags}")
            folder.rename(self.aside)
            self.moved = True
        self.new = bool(self.made) or (not self.moved and not folder.exists())
        return self

    def __exit__(self, kind, exc, tb) -> bool:
        import shutil

        ok = kind is None or (issubclass(kind, SystemExit) and exc.code in (0, None))  # a launcher exits with
        if ok:                                                                        # its workers' code
            if self.moved and self.aside.is_symlink():  # --out was a link: the link moved, not its target
                self.aside.unlink()
            elif self.moved:
                shutil.rmtree(self.aside, ignore_errors=True)
        elif self.moved or self.new:  # what the failed command wrote goes; what was there comes back
            shutil.rmtree(self.folder, ignore_errors=True)
            if self.moved:
                self.aside.rename(self.folder)
            for folder in self.made[1:]:  # the parents made for a claimed folder (a mistyped --run), if empty
                try:
                    folder.rmdir()
                except OSError:
                    break
        return False


def resumed_run(out: Path, kind: str, fresh: bool) -> tuple[dict, dict]:
    """What a rerun of a training command into `out` continues: (the latest checkpoint's model config, the run's
    train_config.json), so that options left out of the rerun (the preset, the batch size, the learning rate)
    default to the run's own rather than to the preset's. ({}, {}) when the command starts afresh or they
    cannot be read (the training loop then says what is wrong)."""
    import json

    from dallecli import checkpoint
    from dallecli.console import UserError

    if fresh or not Path(out).is_dir():
        return {}, {}
    try:
        model = checkpoint.load(out, kind).model_config  # the latest complete checkpoint in `out`
    except UserError:
        return {}, {}
    try:
        train = json.loads((Path(out) / "train_config.json").read_text())
    except (OSError, ValueError):
        train = {}
    return model, train if isinstance(train, dict) else {}
