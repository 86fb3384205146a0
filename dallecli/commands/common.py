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
        if value is not None and not value > 0:
            raise UserError(f"--{name.replace('_', '-')} must be greater than 0 (got {value}); leave it out for "
                            "the default")
