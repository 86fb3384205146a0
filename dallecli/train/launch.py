"""Scale-out: `--gpus N` (and `--nodes`) relaunch the same command under Accelerate's launcher.

The parent process rebuilds its own command line without `--gpus`, hands it to
`accelerate launch --multi_gpu --num_processes N -m dallecli ...` and exits with its status.
The children see DALLE_LAUNCHED=1 and run the work; Accelerate gives each its rank and device.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

from dallecli.console import UserError, info

_VALUE_FLAGS = ("--gpus", "--nodes", "--node-rank", "--main-address", "--main-port")


def launched() -> bool:
    return os.environ.get("DALLE_LAUNCHED") == "1"


ERRORS_ENV = "DALLE_ERRORS_DIR"  # set by `_launcher` for its processes: where each writes its one-line error


def report_error(message: str) -> bool:
    """A launched process hands its user error to the launcher, which prints each distinct one once (every
    process usually hits the same bad path). Returns whether the caller should print it itself: outside a
    launch, or for the first process, so the error shows at once."""
    folder = os.environ.get(ERRORS_ENV)
    if not launched() or not folder:
        return True
    rank = os.environ.get("RANK", "0")
    try:
        (Path(folder) / f"rank-{int(rank):05d}.txt").write_text(message)
    except (OSError, ValueError):
        return True
    return rank == "0"


def close_process_group() -> None:
    """Tear down torch.distributed's process group, if this process made one, before the interpreter exits:
    left to the exit, a gloo group's threads can be destroyed while still joinable and the process aborts
    ("terminate called without an active exception", SIGABRT) after its work is done, which the launcher
    reports as a failed run. Imports nothing that is not loaded already."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return
    try:
        dist.destroy_process_group()
    except Exception:  # a peer already gone: nothing left to close cleanly
        pass


def strip_flags(argv: list[str]) -> list[str]:
    """Drop the launcher's own flags from a command line (both `--flag V` and `--flag=V`)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in _VALUE_FLAGS:
            skip = True
            continue
        if any(arg.startswith(f + "=") for f in _VALUE_FLAGS):
            continue
        out.append(arg)
    return out


def launch_command(gpus: int, nodes: int, node_rank: int, main_address: str | None, main_port: int,
                   cpu: bool, argv: list[str]) -> list[str]:
    total = gpus * nodes
    cmd = [sys.executable, "-m", "dallecli.train.launch", "--num_processes", str(total),
           "--num_machines", str(nodes), "--machine_rank", str(node_rank), "--main_process_port", str(main_port),
           "--mixed_precision", "no", "--dynamo_backend", "no"]
    if total > 1:
        # Several CPU processes are launched as --multi_gpu too (Accelerate refuses --cpu with it); the
        # children pick the CPU through Accelerator(cpu=True) and talk over gloo.
        cmd.append("--multi_gpu")
    elif cpu:
        cmd.append("--cpu")
    if nodes > 1:
        if not main_address:
            raise UserError("--nodes > 1 needs --main-address (the IP of node 0) on every node")
        cmd += ["--main_process_ip", main_address]
    return cmd + ["-m", "dallecli", *strip_flags(argv)]


def maybe_relaunch(gpus: int, nodes: int = 1, node_rank: int = 0, main_address: str | None = None,
                   main_port: int = 29500, cpu: bool = False) -> None:
    """Relaunch under Accelerate when more than one process is asked for; return if this is the worker."""
    if gpus < 1 or nodes < 1:
        raise UserError(f"--gpus and --nodes must be at least 1 (got {gpus}, {nodes})")
    if not 0 <= node_rank < nodes:  # else the launch waits for a node that never joins
        raise UserError(f"--node-rank {node_rank} is not one of this job's nodes: give 0 to {nodes - 1} for --nodes "
                        f"{nodes} (0 on the node at --main-address)")
    if launched() or gpus * nodes == 1:
        return
    import torch

    if not cpu and torch.cuda.device_count() < gpus:
        raise UserError(f"--gpus {gpus} asked for, but {torch.cuda.device_count()} CUDA device(s) are visible; "
                        "lower --gpus (or pass --cpu to test with CPU processes)")
    cmd = launch_command(gpus, nodes, node_rank, main_address, main_port, cpu, sys.argv[1:])
    info(f"launching {gpus * nodes} processes: accelerate launch … -m dallecli {shlex.join(strip_flags(sys.argv[1:]))}")
    run_launch(cmd, dict(os.environ, DALLE_LAUNCHED="1"))


def run_launch(cmd: list[str], env: dict[str, str]) -> None:
    """Run the launcher command `cmd` and exit with its code. A stopped launch is said in one line here (its
    processes say nothing of it); their own errors they print themselves."""
    code = _wait(subprocess.Popen(cmd, env=env))
    if code in (130, 143):
        from dallecli.console import print_error

        print_error("interrupted" if code == 130 else "terminated")
    sys.exit(code)


def _wait(launcher: subprocess.Popen, grace_s: float = 60.0) -> int:
    """The launcher's exit code. Stopped meanwhile (SIGTERM, Ctrl-C), first stop the launch: the launcher
    passes SIGTERM on to its processes, which run in sessions of their own and would otherwise go on writing
    after this process has cleaned up (put an old samples or evaluation folder back, say)."""
    import signal

    try:
        return launcher.wait()
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            # Ctrl-C reached the launcher too (one process group): let it stop its processes as they finish
            # (a training step is saved first); a SIGTERM below only if it is still there after the grace period.
            try:
                launcher.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
        if launcher.poll() is None:
            launcher.send_signal(signal.SIGTERM)
            try:
                launcher.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                launcher.kill()
                launcher.wait()
        raise


def _launcher(argv: list[str]) -> int:
    """`accelerate launch ARGS`, run as `python -m dallecli.train.launch ARGS`. When a process fails, its own
    error line has been printed already: exit with its code (2 for a user error) instead of Accelerate's 1
    and torch-elastic's report of the failure as a traceback."""
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    import tempfile

    from dallecli.console import print_error

    args = launch_command_parser().parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="dalle-errors-") as folder:
        os.environ[ERRORS_ENV] = folder  # inherited by the processes launched below
        _quiet_elastic_after_user_error(Path(folder))
        try:
            launch_command(args)
        except ChildFailedError as exc:
            # The first process printed its own error; the others' go here, each distinct one once.
            reports = sorted(Path(folder).glob("rank-*.txt"))
            shown = {reports[0].read_text()} if reports and reports[0].name == "rank-00000.txt" else set()
            for report in reports:
                message = report.read_text()
                if message not in shown:
                    shown.add(message)
                    print_error(message)
            _, first = exc.get_first_failure()
            code = first.exitcode
            return code if 0 < code < 256 else 128 - code if code < 0 else 1  # killed by signal S: 128 + S
        except SignalException as exc:  # stopped (SIGTERM, Ctrl-C): torch-elastic has stopped the processes;
            return 128 + int(exc.sigval)  # the command that launched this one says so, in one line
    return 0


def _quiet_elastic_after_user_error(folder: Path) -> None:
    """torch-elastic logs the signals it passes on ("Received 2 death signal, shutting down workers", "Sending
    process … closing signal SIGTERM") and a process's failure ("failed (exitcode: 2) local_rank: 1 …"). The
    first are routine (a stop is said in one line by the `dalle` command that launched this one): drop them.
    Once a process has reported a user error, that error is the whole story: drop the second too. A crash
    without one (a signal, a traceback) keeps its error lines. The filter sits on the handlers, so it sees the
    records of every elastic logger, made now or later."""
    import logging

    def keep(record: logging.LogRecord) -> bool:
        if not record.name.startswith("torch.distributed.elastic"):
            return True
        if record.levelno < logging.ERROR:  # keep other warnings (rendezvous, heartbeats: why a launch hangs)
            return "signal" not in record.getMessage()
        return not any(folder.glob("rank-*.txt"))

    seen = set()
    for logger in [logging.getLogger(n) for n in list(logging.root.manager.loggerDict)] + [logging.root]:
        for handler in getattr(logger, "handlers", ()):
            if id(handler) not in seen:
                seen.add(id(handler))
                handler.addFilter(keep)


if __name__ == "__main__":
    sys.exit(_launcher(sys.argv[1:]))
