"""The `dalle` command line: one thin command per stage of the pipeline (DESIGN.md, "The command line").

Each command lives in `dallecli/commands/<name>.py` as a plain typed function; this module only
registers them, so that `dalle --help` imports nothing heavy.
"""
from __future__ import annotations

import importlib
import sys
from typing import Annotated

import typer

from dallecli import __version__

app = typer.Typer(
    name="dalle",
    help="DALL·E from the command line: build shards, train the dVAE and the transformer, sample, rerank, evaluate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # click's plain help: rich's option table squeezes the descriptions and cuts long names ("--checkpoint-act…")
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# (command name, module under dallecli.commands, one-line help). Order is the pipeline's order.
COMMANDS = [
    ("demo", "demo", "Run the whole pipeline on built-in data (emoji or shapes) in about ten minutes."),
    ("build-shards", "build_shards", "Build train/val image shards from a folder, a manifest, WebDataset shards, emoji or shapes."),
    ("tokenize", "tokenize", "Train the caption BPE tokenizer (§2.2) on the train shards' captions."),
    ("train-dvae", "train_dvae", "Train the discrete VAE (stage 1) on the image shards."),
    ("encode", "encode", "Encode the image shards into code shards with the trained dVAE (or --preview reconstructions)."),
    ("convert-dvae", "convert_dvae", "Convert OpenAI's released dVAE (encoder.pkl, decoder.pkl) into a dVAE checkpoint."),
    ("train-prior", "train_prior", "Train the transformer (stage 2) on caption tokens and image codes."),
    ("train-clip", "train_clip", "Train the contrastive model (CLIP, through open_clip) that reranks samples."),
    ("sample", "sample", "Draw images for captions (with optional CLIP reranking, guidance, image prompts)."),
    ("rerank", "rerank", "Score samples against their prompts with a CLIP and rank them (samples.jsonl + ranked.png)."),
    ("eval", "eval", "Evaluate samples: FID / IS / KID under Gaussian blur (§3.1), CLIP score, composition, reconstruction."),


]


def _register() -> None:
    for name, module, help_text in COMMANDS:
        func = importlib.import_module(f"dallecli.commands.{module}").command
        app.command(name, help=help_text, short_help=help_text)(func)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"dalle {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or messages.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Full tracebacks instead of one-line errors.")] = False,
) -> None:
    from dallecli.commands.common import start

    start(quiet, debug)


_register()


def main() -> None:
    """Entry point: user errors, bad flags included, become one red line and exit code 2; Ctrl-C exits with 130."""
    from dallecli.console import UserError, print_error, settings

    _terminate_as_exit()
    try:
        code = _run()
    except Terminated:
        if not _launched():  # under --gpus N the `dalle` command that launched this process says it, once
            print_error("terminated")
        sys.exit(143)
    except UserError as exc:
        if settings.debug:
            raise
        from dallecli.train.launch import report_error

        if report_error(str(exc)):  # under --gpus N, the launcher prints each distinct error once
            print_error(str(exc))
        sys.exit(exc.exit_code)
    except (KeyboardInterrupt, typer.Abort):
        if not _launched():
            print_error("interrupted")
        sys.exit(130)
    except Exception as exc:
        if not _is_click_error(exc):
            raise
        if type(exc).__name__ == "NoArgsIsHelpError":  # `dalle` alone: the help, as before
            exc.show()
        else:  # an unknown flag, a value of the wrong type or out of range
            ctx = getattr(exc, "ctx", None)
            where = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            print_error(exc.format_message().rstrip(".") + where)
        sys.exit(exc.exit_code)
    if code == 130 and not _launched():  # typer turns Ctrl-C (KeyboardInterrupt) into Exit(130), returned here
        print_error("interrupted")
    if isinstance(code, int) and code:  # typer.Exit(code) under standalone_mode=False returns the code
        sys.exit(code)


def _launched() -> bool:
    from dallecli.train.launch import launched

    return launched()


class Terminated(SystemExit):
    """SIGTERM, raised where the process is, so that `finally` and context managers clean up (a samples
    folder put back, a staging folder left resumable) instead of the process vanishing mid-write."""


def _terminate_as_exit() -> None:
    import signal

    def handler(signum, frame):
        raise Terminated(143)

    def interrupt(signum, frame):
        # Ctrl-C stops the command; more of them would break into the clean-up it triggers (a folder put
        # back, worker processes joined, exit handlers) and end in a traceback: they are ignored from here.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise KeyboardInterrupt

    try:  # the training loop installs its own handlers (finish the step, save) and restores these after
        signal.signal(signal.SIGTERM, handler)
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where SIGINT is ignored
            signal.signal(signal.SIGINT, interrupt)
    except ValueError:  # not the main thread (an embedding application): leave signals alone
        pass


def _run():
    from dallecli.train.launch import close_process_group

    try:
        return app(prog_name="dalle", standalone_mode=False)  # click's usage errors come here, not as a box
    finally:
        close_process_group()  # a launched worker's gloo / NCCL group, before the interpreter's exit


def _is_click_error(exc: Exception) -> bool:
    """click's ClickException, from click itself or the copy typer carries (typer._click): by its interface."""
    return hasattr(exc, "format_message") and isinstance(getattr(exc, "exit_code", None), int) and hasattr(exc, "show")


if __name__ == "__main__":
    main()
