"""`dalle demo`: the whole pipeline on built-in data, sized for a laptop."""
from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from dallecli.commands.common import DebugOpt, QuietOpt


class Data(str, Enum):
    emoji = "emoji"
    shapes = "shapes"


def command(
    data: Annotated[Data, typer.Option(help="emoji: rendered emoji with their names; shapes: the composition benchmark.")] = Data.emoji,
    minutes: Annotated[float, typer.Option(help="Time budget on two CPU cores; step counts scale with it.")] = 10.0,
    run: Annotated[Optional[Path], typer.Option(
        help="Run directory (default: runs/demo-DATA, as `make demo` uses).", show_default=False)] = None,
    fresh: Annotated[bool, typer.Option("--fresh", help="Delete the run directory and start over.")] = False,
    cpu: Annotated[bool, typer.Option("--cpu", help="Use the CPU even where a GPU is present.")] = False,
    font: Annotated[Optional[Path], typer.Option(
        help="Noto Color Emoji font file, where it is not installed in a standard place (--data emoji).",
        show_default=False)] = None,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    from dallecli.commands.common import start

    start(quiet, debug)
    from dallecli.demo import run_demo

    run_demo(data.value, minutes, run or Path(f"runs/demo-{data.value}"), fresh=fresh, cpu=cpu, font=font)
