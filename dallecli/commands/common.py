"""Options every command shares, and the start-up every command does."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

RunOpt = Annotated[Path, typer.Option("--run", help="Run directory: inputs are found and outputs written here.",
                                      show_default=True)]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or messages; errors and the summary still print.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show full tracebacks instead of one-line errors.")]
DEFAULT_RUN = Path("runs/default")


def start(quiet: bool = False, debug: bool = False) -> None:
    """Apply --quiet / --debug for this process."""
    from dallecli.console import settings

    settings.quiet = settings.quiet or quiet
    settings.debug = settings.debug or debug


def default_precision(on_gpu: bool) -> str:
    """The training precision when --precision is not given: bf16 on a GPU, and on a CPU with native bf16
    arithmetic (AVX512-BF16 / AMX), where autocast makes the tiny models' training steps 1.8–2.2× faster than
    fp32 and trains them as well; fp32 on other CPUs, where bf16 is emulated and slow."""
    if on_gpu:
        return "bf16"
    from dallecli.train.loop import cpu_has_bf16

    return "bf16" if cpu_has_bf16() else "fp32"
