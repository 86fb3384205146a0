"""Several processes: DDP equals one process, FSDP equals DDP (and saves the same checkpoints), PowerSGD
compresses and still learns, bad flag combinations are refused.

The two-process runs are `accelerate launch` of the real `dalle train-prior` (through
tests/fixtures/inject.py, which logs every step) as two CPU processes over gloo. All of them read one
data set whose captions encode to the same number of tokens, with caption, BPE and residual dropout off:
then each process's loss is over as many text tokens as the other's, the mean of the two processes'
losses is the loss of their joint batch, and one process with the joint batch must give the same numbers.
"""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dallecli import checkpoint
from dallecli.console import UserError
from tests.fixtures import cli
from tests.fixtures.runs import CAPTIONS, code_records, make_dvae_run, make_tokenizer, write_code_manifest

STEPS = 6


def common(steps: int = STEPS) -> list:
    return ["--preset", "tiny", "--precision", "fp32", "--steps", steps, "--text-len", 8, "--save-every", 3,
            "--eval-every", 3, "--warmup", 0, "--dropout", 0, "--cond-drop", 0, "--bpe-dropout", 0, "--keep", 10]


def free_port() -> str:
    with socket.socket() as s:  # a fixed port may still be held by an earlier run
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def make_run(run: Path, n_train: int = 48, n_val: int = 8, per_shard: int = 12, grid: int = 8,
             vocab: int = 64) -> Path:
    """Tokenizer and code shards whose captions differ in length (the text loss is averaged over the tokens
    of the whole global batch, however it is split among processes)."""
    from dallecli.data.records import write_tar
    from dallecli.text import Tokenizer

    run.mkdir(parents=True)
    tok = Tokenizer.load(make_tokenizer(run))
    captions = CAPTIONS
    assert len({len(tok.encode(c)) for c in captions}) > 1, "the fixture needs captions of different lengths"
    codes = run / "codes"
    codes.mkdir()

    def records(n, seed, prefix):
        out = code_records(n, grid, vocab, seed, prefix)
        for i, (_, members) in enumerate(out):
            members["txt"] = captions[i % len(captions)].encode()
        return out

    train = records(n_train, 0, "s")
    for s in range(0, n_train, per_shard):
        write_tar(codes / f"train-{s // per_shard:06d}.tar", train[s: s + per_shard])
    write_tar(codes / "val-000000.tar", records(n_val, 1, "v"))
    write_code_manifest(codes, grid, vocab)
    return run


def launch(run: Path, out: str, *args, processes: int = 2, **env) -> subprocess.CompletedProcess:
    """(Each process records its random state as every loss starts, in RUN/noise-OUT.RANK.)"""
    """`dalle train-prior` as `processes` CPU processes (a parent of several would relaunch this way)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
           "--num_machines", "1", "--main_process_port", free_port(), "--mixed_precision", "no",
           "--dynamo_backend", "no", str(cli.INJECT), "train-prior", "--run", str(run), "--out", str(run / out),
           "--cpu", *map(str, args)]
    env = cli.cli_env(DALLE_LAUNCHED="1", DALLE_TEST_NOISE=run / f"noise-{out}", **env)
    result = subprocess.run(cmd, cwd=cli.ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def metrics(folder: Path, split: str = "train") -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())
            if r["split"] == split}


def ck_at(folder: Path, step: int) -> checkpoint.Checkpoint:
    return checkpoint.load(checkpoint.step_dir(folder, step), "prior")


def assert_close(a, b, where: str = "", atol: float = 1e-6, rtol: float = 1e-5) -> None:
    """Nested dicts/lists of tensors and plain values: same structure, keys, dtypes and shapes; values close."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        if a.is_floating_point():
            torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m: f"{where}: {m}")
        else:
            assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {set(a) ^ set(b)}"
        for k in a:
            assert_close(a[k], b[k], f"{where}.{k}", atol, rtol)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close(x, y, f"{where}[{i}]", atol, rtol)
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=rtol, abs=atol), where
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_same_checkpoint(a: checkpoint.Checkpoint, b: checkpoint.Checkpoint, **tol) -> None:
    assert a.step == b.step and a.has_ema() and b.has_ema()
    assert_close(a.weights(ema=False), b.weights(ema=False), "weights", **tol)
    assert_close(a.ema_weights(), b.ema_weights(), "ema", **tol)
    assert_close(a.training_state(), b.training_state(), "training_state", **tol)  # optimizer, RNG, counters


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The data (made once) and the reference runs, each made when a test first asks for it."""
    run = make_run(tmp_path_factory.mktemp("distributed") / "run")
    made = {}
    recipes = {
        "one": lambda: cli.run(["train-prior", "--run", run, "--out", run / "one", "--cpu", "--batch-size", 8,
                                *common()]),
        "ddp": lambda: launch(run, "ddp", "--batch-size", 4, *common()),
        "fsdp": lambda: launch(run, "fsdp", "--batch-size", 4, "--strategy", "fsdp", *common()),
    }

    def get(name: str) -> Path:
        if name not in made:
            result = recipes[name]()
            assert result.returncode == 0, result.stderr[-4000:]
            made[name] = run / name
        return made[name]

    return run, get


# --- DDP --------------------------------------------------------------------------------------------------

def test_two_ddp_processes_match_one_process_with_the_same_global_batch(runs):
    _, get = runs
    one, ddp = get("one"), get("ddp")
    a, b = metrics(one), metrics(ddp)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    for step in a:  # the logged loss of two processes is their mean: the loss of the joint batch
        for key in ("loss", "text_loss", "image_loss", "grad_norm"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-4), (step, key)
    for step, val in metrics(one, "val").items():  # of the (EMA) weights, on every process alike
        assert metrics(ddp, "val")[step]["val_loss"] == pytest.approx(val["val_loss"], rel=1e-4)
    assert_close(ck_at(one, STEPS).weights(ema=False), ck_at(ddp, STEPS).weights(ema=False), "weights",
                 atol=1e-5, rtol=1e-4)
    assert a[STEPS]["loss"] < a[1]["loss"]


# --- FSDP -------------------------------------------------------------------------------------------------

def test_fsdp_matches_ddp_and_saves_the_same_checkpoints(runs):
    from dallecli.models.prior import PriorTransformer
    from dallecli.train.prior_task import load_prior

    _, get = runs
    ddp, fsdp = get("ddp"), get("fsdp")
    a, b = metrics(ddp), metrics(fsdp)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    for step in a:
        for key in ("loss", "text_loss", "image_loss", "grad_norm"):  # the norm clipped by: the global one
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-5), (step, key)
    for step, val in metrics(ddp, "val").items():  # evaluated with the EMA weights swapped in, sharded
        assert metrics(fsdp, "val")[step]["val_loss"] == pytest.approx(val["val_loss"], rel=1e-5)
    for step in (3, STEPS):  # weights, EMA of the whole weights, optimizer state in DDP's own format
        assert_same_checkpoint(ck_at(ddp, step), ck_at(fsdp, step))
    model, ck = load_prior(fsdp)  # a plain model takes the checkpoint: every key and shape fits
    plain = PriorTransformer(model.config).state_dict()
    assert {k: v.shape for k, v in ck.weights(ema=False).items()} == {k: v.shape for k, v in plain.items()}
    assert ck.fingerprint == checkpoint.load(ddp, "prior").fingerprint


def resume_from_step_3(run: Path, source: Path, name: str) -> Path:
    target = run / name
    target.mkdir()
    shutil.copytree(checkpoint.step_dir(source, 3), checkpoint.step_dir(target, 3))
    return target


def test_fsdp_resumes_exactly(runs):
    """An FSDP run resumed from its step-3 checkpoint ends where the uninterrupted one ends."""
    run, get = runs
    fsdp = get("fsdp")
    target = resume_from_step_3(run, fsdp, "fsdp-resumed")
    launch(run, target.name, "--batch-size", 4, "--strategy", "fsdp", *common())
    assert_same_checkpoint(ck_at(fsdp, STEPS), ck_at(target, STEPS))
    a, b = metrics(fsdp), metrics(target)
    assert sorted(b) == list(range(4, STEPS + 1))
    assert all(b[s]["loss"] == pytest.approx(a[s]["loss"], rel=1e-5) for s in b)
    for rank in (0, 1):  # each process's noise after the resume is what it drew uninterrupted
        assert noise(run, "fsdp-resumed", rank) == {u: d for u, d in noise(run, "fsdp", rank).items() if u >= 3}


def noise(run: Path, out: str, rank: int) -> dict[int, str]:
    lines = (run / f"noise-{out}.{rank}").read_text().split("\n")
    return {int(u): d for u, d in (line.split() for line in lines if line)}


@pytest.mark.slow
def test_a_skipped_last_micro_batch_still_exchanges_the_gradients(tmp_path):
    """The last micro-batch of a step used to be the one that all-reduces the gradients; where it had no
    readable sample (on any process, so every process skips it) none did, and the processes' weights parted.
    Now the last micro-batch with data exchanges them: the weights stay equal on both processes."""
    from dallecli.data.loader import ResumableSampler, ShardIndex
    from dallecli.data.records import iter_records, write_tar

    run = make_run(tmp_path / "run")
    index = ShardIndex(run / "codes", "train")
    # --batch-size 2, 2 processes, --global-batch 8: 2 micro-batches per step. Step 1's second one is the
    # loader's global batch 1; process 0 takes its first 2 indices: make both unreadable.
    order = ResumableSampler(len(index), 2, 0, world=2).order(0)
    bad = {index.entries[i].key for i in order[4:6].tolist()}
    for path in sorted((run / "codes").glob("train-*.tar")):
        records = [(r.key, {**r.members, "codes": b"\x00" * 3} if r.key in bad else r.members)
                   for r in iter_records(path)]
        write_tar(path, records)
    result = launch(run, "skipped", "--batch-size", 2, "--global-batch", 8, *common(steps=3),
                    DALLE_TEST_WEIGHTS=run / "weights-skipped")  # DDP: every process holds whole weights
    assert "skipping" in result.stderr  # the bad samples were met (and reported)
    zero, one = (run / f"weights-skipped.{r}" for r in (0, 1))
    assert zero.read_text() == one.read_text() and len(zero.read_text().splitlines()) >= 5


def test_each_process_draws_its_own_noise(runs):
    """The in-model noise (the dVAE's relaxation, dropout) differs between processes at every step: one stream
    for all would give the whole global batch one process's noise."""
    run, get = runs
    get("ddp")
    zero, one = noise(run, "ddp", 0), noise(run, "ddp", 1)
    assert sorted(zero) == sorted(one) == list(range(STEPS))
    assert all(zero[u] != one[u] for u in zero) and len(set(zero.values())) == STEPS


@pytest.mark.slow
def test_fsdp_resumes_a_ddp_checkpoint_through_the_gpus_relaunch(runs):
    """`--gpus 2 --cpu --strategy fsdp`, as a user types it, resumes DDP's step-3 checkpoint and ends where
    the DDP run ends: the two strategies' checkpoints are interchangeable."""
    run, get = runs
    ddp = get("ddp")
    target = resume_from_step_3(run, ddp, "ddp-then-fsdp")
    result = cli.run(["train-prior", "--run", run, "--out", target, "--gpus", 2, "--cpu", "--main-port", free_port(),
                      "--batch-size", 4, "--strategy", "fsdp", *common()])
    assert result.returncode == 0, result.stderr[-4000:]
    assert_same_checkpoint(ck_at(ddp, STEPS), ck_at(target, STEPS))
    assert metrics(target)[STEPS]["loss"] == pytest.approx(metrics(ddp)[STEPS]["loss"], rel=1e-5)


@pytest.mark.slow
def test_global_batch_under_gpus_counts_every_process(runs):
    """`--gpus 2 --global-batch 16 --batch-size 4` accumulates 2 micro-batches per process (2 × 4 × 2 = 16),
    not 4 (the launched processes' command line has no --gpus: the count comes from the launcher), and trains
    what one process does with the same global batch (4 micro-batches of 4)."""
    run, get = runs
    one = cli.run(["train-prior", "--run", run, "--out", run / "one-accum", "--cpu", "--batch-size", 4,
                   "--global-batch", 16, *common()])
    assert one.returncode == 0, one.stderr[-4000:]
    two = cli.run(["train-prior", "--run", run, "--out", run / "two-accum", "--gpus", 2, "--cpu", "--main-port",
                   free_port(), "--batch-size", 4, "--global-batch", 16, *common()])
    assert two.returncode == 0, two.stderr[-4000:]
    accum = {name: json.loads((run / name / "train_config.json").read_text())["grad_accum"]
             for name in ("one-accum", "two-accum")}
    assert accum == {"one-accum": 4, "two-accum": 2}
    a, b = metrics(run / "one-accum"), metrics(run / "two-accum")
    assert STEPS in b  # the relaunched processes log every --log-every steps (the test hook reaches only this one)
    assert all(b[s]["loss"] == pytest.approx(a[s]["loss"], rel=1e-5) for s in b)
    bad = cli.run(["train-prior", "--run", run, "--out", run / "bad", "--gpus", 2, "--cpu", "--batch-size", 4,
                   "--global-batch", 12, *common()])
    assert bad.returncode == 2 and "(4 × 2)" in bad.stderr and "launching" not in bad.stderr, bad.stderr[-2000:]


# --- PowerSGD ---------------------------------------------------------------------------------------------

def test_powersgd_compresses_after_the_exact_start_and_the_loss_falls(runs):
    run, get = runs
    ddp = get("ddp")
    steps = 12
    result = launch(run, "powersgd", "--batch-size", 4, "--powersgd-rank", 2, *common(steps))
    assert cli.matches("PowerSGD rank 2: exact gradient all-reduce for 2 more steps", result.stderr)
    m, exact = metrics(run / "powersgd"), metrics(ddp)
    assert sorted(m) == list(range(1, steps + 1))
    for step in (1, 2):  # the exact all-reduce: DDP's numbers
        assert "powersgd_ratio" not in m[step]
        assert m[step]["loss"] == pytest.approx(exact[step]["loss"], rel=1e-5)
    for step in range(3, steps + 1):  # then compressed: fewer numbers sent, other updates
        assert m[step]["powersgd_ratio"] > 2
    assert m[4]["loss"] != pytest.approx(exact[4]["loss"], rel=1e-6)
    first, last = (sum(m[s]["loss"] for s in steps_) / 3 for steps_ in ((1, 2, 3), (steps - 2, steps - 1, steps)))
    assert last < first
    assert checkpoint.load(run / "powersgd", "prior").step == steps


@pytest.mark.slow
def test_powersgd_whose_exact_start_outlasts_the_run_says_so(runs):
    """--warmup 10 on a 6-step run: the exact all-reduce covers every step; a warning says that nothing is
    compressed (instead of "exact for 10 more steps, then compressed")."""
    run, _ = runs
    result = launch(run, "powersgd-short", "--batch-size", 4, "--powersgd-rank", 2, *common(), "--warmup", 10)
    assert cli.matches(r"--powersgd-rank 2: the first 10 steps use the exact all-reduce, and 6 are left to train, "
                       r"so nothing is compressed", result.stderr), result.stderr[-2000:]
    assert "then compressed" not in result.stderr
    assert all("powersgd_ratio" not in m for m in metrics(run / "powersgd-short").values())


# --- flags ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args,pattern", [
    (["--strategy", "zero3"], "--strategy must be ddp or fsdp (got zero3)"),
    (["--powersgd-rank", "0"], "--powersgd-rank must be at least 1 (got 0)"),
    (["--strategy", "fsdp", "--powersgd-rank", "2"], "--powersgd-rank needs --strategy ddp"),
    (["--strategy", "fsdp", "--precision", "fp16"], "--precision fp16 with --strategy fsdp is not supported; use bf16"),
    (["--strategy", "fsdp", "--precision", "fp16", "--gpus", "2"], "--precision fp16 with --strategy fsdp"),
])
def test_bad_flags_are_one_line_errors(tmp_path, capfd, args, pattern):
    result = cli.run_inprocess(["train-prior", "--run", tmp_path / "missing", "--cpu", *args], capfd)
    assert pattern in cli.one_error_line(result), result.stderr


def test_train_config_is_checked_too():
    from dallecli.train.loop import TrainConfig, check_config

    for cfg, pattern in ((TrainConfig(strategy="zero3"), "--strategy must be ddp or fsdp"),
                         (TrainConfig(powersgd_rank=0), "--powersgd-rank must be at least 1"),
                         (TrainConfig(strategy="fsdp", powersgd_rank=1), "--powersgd-rank needs --strategy ddp"),
                         (TrainConfig(strategy="fsdp", precision="fp16"), "not supported; use bf16")):
        with pytest.raises(UserError, match=pattern.replace("-", r"\-")):
            check_config(cfg)


def test_one_process_trains_plainly_and_says_so(tmp_path, capfd):
    """One process: nothing to shard or compress; the run is the plain one, with an info line each."""
    import dataclasses

    from dallecli.train.loop import train
    from tests.fixtures import tasks

    run = make_run(tmp_path / "run")
    cfg = dataclasses.replace(tasks.PRIOR_CFG, steps=2, save_every=2, eval_every=0)
    train(tasks.prior_task(run), cfg, tmp_path / "plain")
    capfd.readouterr()
    for name, change in (("fsdp", {"strategy": "fsdp"}), ("powersgd", {"powersgd_rank": 2})):
        train(tasks.prior_task(run), dataclasses.replace(cfg, **change), tmp_path / name)
        err = capfd.readouterr().err
        assert cli.matches({"fsdp": "--strategy fsdp with one process: nothing to shard",
                            "powersgd": "--powersgd-rank with one process: no gradients are exchanged"}[name], err)
        cli.assert_same_run(tmp_path / "plain", tmp_path / name)


def test_powersgd_start():
    from dallecli.train.distributed import powersgd_start

    assert powersgd_start(steps=8, warmup=0, resumed_at=0) == 2  # the hook's minimum
    assert powersgd_start(steps=3000, warmup=100, resumed_at=0) == 300  # a tenth of the run
    assert powersgd_start(steps=430_000, warmup=5000, resumed_at=0) == 5000  # never inside the warm-up
    assert powersgd_start(steps=100_000, warmup=2000, resumed_at=0) == 2000
    assert powersgd_start(steps=100_000, warmup=0, resumed_at=0) == 1000  # at most PowerSGDState's default
    assert powersgd_start(steps=3000, warmup=100, resumed_at=200) == 100  # counted from the checkpoint
    assert powersgd_start(steps=3000, warmup=100, resumed_at=2000) == 2


def test_close_process_group_tears_down_what_the_process_made(tmp_path):
    """`dalle` closes a launched worker's process group before exiting (left to the interpreter's exit, a gloo
    group could abort the process after its work was done); with none made, it does nothing."""
    import torch.distributed as dist

    from dallecli.train.launch import close_process_group

    close_process_group()  # nothing to close: no error
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    assert dist.is_initialized()
    close_process_group()
    assert not dist.is_initialized()


@pytest.mark.slow
def test_a_user_error_in_launched_processes_exits_2_without_a_traceback(tmp_path):
    """With --gpus N the processes' own one-line error is the report, printed once (not once per process),
    and the launcher exits with its code (2), not Accelerate's 1 after torch-elastic's ChildFailedError
    traceback."""
    from dallecli.config import to_dict
    from dallecli.models.dvae import DVAE, PRESETS

    # A dVAE whose config passes the check before launching and whose weights fail in the launched processes.
    folder = checkpoint.save(tmp_path / "dvae", 1, kind="dvae", model_config=to_dict(PRESETS["tiny"]),
                             weights=DVAE(PRESETS["tiny"]).state_dict())
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    make_dvae_run(tmp_path / "run")
    done = cli.run(["encode", "--run", tmp_path / "run", "--dvae", tmp_path / "dvae", "--gpus", "2", "--cpu"],
                   timeout=180)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "launching 2 processes" in done.stderr, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "ChildFailedError" not in done.stderr, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "corrupt or truncated" in errors[0], done.stderr[-3000:]  # once


@pytest.mark.parametrize("args, message", [
    (["train-prior"], "no tokenizer at"),
    (["train-dvae"], "no shard folder at"),
    (["train-clip"], "no shard folder at"),
    (["encode"], "no dvae checkpoint at"),
    (["sample", "a red circle", "--n", "0"], "--n and --batch-size must be at least 1"),
    (["sample", "a red circle"], "no prior checkpoint at"),
])
def test_missing_inputs_fail_before_launching(tmp_path, capfd, monkeypatch, args, message):
    """`--gpus N` checks the run's inputs and the options first: a missing one is an error in seconds, before
    N processes start (it used to come from every process after the launch)."""
    from dallecli.train import launch

    def refuse(*a, **k):
        raise AssertionError("launched before the inputs were checked")

    monkeypatch.delenv("DALLE_LAUNCHED", raising=False)
    monkeypatch.setattr(launch, "maybe_relaunch", refuse)
    result = cli.run_inprocess([*args, "--run", tmp_path / "run", "--gpus", "2", "--cpu"], capfd)
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_a_launched_process_hands_its_error_to_the_launcher(tmp_path, monkeypatch):
    from dallecli.train.launch import ERRORS_ENV, report_error

    monkeypatch.delenv("DALLE_LAUNCHED", raising=False)
    assert report_error("not launched: printed here") is True
    monkeypatch.setenv("DALLE_LAUNCHED", "1")
    monkeypatch.setenv(ERRORS_ENV, str(tmp_path))
    monkeypatch.setenv("RANK", "1")
    assert report_error("bad path") is False  # the launcher prints it, once for all processes
    monkeypatch.setenv("RANK", "0")
    assert report_error("bad path") is True  # the first process prints at once
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank-00000.txt", "rank-00001.txt"]
    assert (tmp_path / "rank-00001.txt").read_text() == "bad path"


@pytest.mark.slow
def test_processes_stopped_because_another_failed_stay_quiet(tmp_path):
    """One process fails with a user error while the other is still working: the launcher stops the other
    (SIGTERM), and the output is the failing process's one line, not that line and an `error: terminated`
    and torch-elastic's log of the failure and of the signal."""
    script = tmp_path / "one_fails.py"
    script.write_text(
        "import os, time\n"
        "from dallecli import cli\n"
        "from dallecli.console import UserError\n"
        "def work():\n"
        "    if os.environ['RANK'] == '1':\n"
        "        time.sleep(1)\n"
        "        raise UserError('process one found a bad file')\n"
        "    time.sleep(120)\n"
        "cli._run = work\n"
        "cli.main()\n")
    cmd = [sys.executable, "-m", "dallecli.train.launch", "--num_processes", "2", "--num_machines", "1",
           "--machine_rank", "0", "--main_process_port", free_port(), "--mixed_precision", "no",
           "--dynamo_backend", "no", "--multi_gpu", str(script)]
    done = subprocess.run(cmd, env=cli.cli_env(DALLE_LAUNCHED="1"), capture_output=True, text=True, timeout=120,
                          cwd=cli.ROOT)
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: process one found a bad file"], done.stderr[-3000:]
    assert "closing signal" not in done.stderr and "failed (exitcode" not in done.stderr, done.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGTERM to the command", "Ctrl-C to its process group",
                                 "SIGTERM to the launcher alone"])
def test_a_stopped_launch_stops_its_processes_before_putting_the_old_folder_back(tmp_path, how):
    """SIGTERM to a `--gpus N` command, or Ctrl-C: the launched processes (in sessions of their own) are stopped
    first, then the old folder comes back, and nothing writes into it afterwards; one line (`error:
    terminated` / `error: interrupted`) from the command, none from the processes or the launcher (no
    traceback, no torch-elastic log of the signals)."""
    import os
    import signal
    import time

    folder = tmp_path / "eval" / "x"
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text("old")
    worker = tmp_path / "worker.py"
    worker.write_text(  # a `dalle` command that writes into the folder as it goes
        "import os, time, pathlib\n"
        "from dallecli import cli\n"
        f"folder = pathlib.Path({str(folder)!r})\n"
        "def work():\n"
        "    for i in range(300):\n"
        "        folder.mkdir(parents=True, exist_ok=True)\n"
        "        (folder / f\"new-{os.environ['RANK']}-{i}.txt\").write_text('x')\n"
        "        time.sleep(0.2)\n"
        "cli._run = work\n"
        "cli.main()\n")
    top = tmp_path / "top.py"
    top.write_text(
        "import os, subprocess, sys, pathlib\n"
        "from dallecli import cli\n"
        "from dallecli.commands.common import ReplacedFolder\n"
        "from dallecli.train.launch import run_launch\n"
        "def work():\n"
        f"    with ReplacedFolder(pathlib.Path({str(folder)!r}), overwrite=True, what='evaluation',\n"
        "                        markers=('metrics.json',)):\n"
        "        run_launch([sys.executable, '-m', 'dallecli.train.launch', '--num_processes',\n"
        f"            '2', '--num_machines', '1', '--machine_rank', '0', '--main_process_port', {free_port()!r},\n"
        "            '--mixed_precision', 'no', '--dynamo_backend', 'no', '--multi_gpu', sys.argv[1]],\n"
        "            dict(os.environ, DALLE_LAUNCHED='1'))\n"
        "cli._run = work\n"
        "cli.main()\n")
    proc = subprocess.Popen([sys.executable, str(top), str(worker)], env=cli.cli_env(), cwd=cli.ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=cli.default_sigint)
    try:
        deadline = time.time() + 90
        while not list(folder.glob("new-1-*")) and time.time() < deadline:
            time.sleep(0.2)
        assert list(folder.glob("new-1-*")), "the launched processes never started"
        if how == "SIGTERM to the command":
            os.kill(proc.pid, signal.SIGTERM)
        elif how.startswith("Ctrl-C"):
            os.killpg(proc.pid, signal.SIGINT)
        else:  # a scheduler's kill of one process: the command that launched it reports the stop
            launcher = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
            assert len(launcher) == 1
            os.kill(int(launcher[0]), signal.SIGTERM)
        _, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    code, line = (143, "error: terminated") if how.startswith("SIGTERM") else (130, "error: interrupted")
    assert proc.returncode == code, err[-3000:]
    time.sleep(1.0)  # a process still running would write within 0.2 s
    assert sorted(p.name for p in folder.iterdir()) == ["metrics.json"], err[-3000:]
    assert not (folder.parent / ".x.replaced").exists()
    assert [ln for ln in err.splitlines() if ln.strip()] == [line], err[-3000:]


@pytest.mark.parametrize("node_rank", [2, -1])
def test_a_node_rank_outside_the_job_is_refused_before_launching(monkeypatch, node_rank):
    """`--nodes 2 --node-rank 5` used to launch and wait forever for a node that never joins."""
    from dallecli.train.launch import maybe_relaunch

    monkeypatch.delenv("DALLE_LAUNCHED", raising=False)
    with pytest.raises(UserError, match=f"--node-rank {node_rank} is not one of this job's nodes: give 0 to 1"):
        maybe_relaunch(2, nodes=2, node_rank=node_rank, main_address="127.0.0.1", cpu=True)
