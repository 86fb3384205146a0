"""Reliability, items 10–11: `dalle build-shards` killed at any point and rerun gives byte-identical
shards; a failed write (disk full) is one clear error that leaves the previous checkpoint and shards
intact, and the rerun completes."""
import dataclasses
import errno
import os
import random
import re
import signal

import pytest
import torch

from dallecli import checkpoint
from dallecli.console import UserError
from dallecli.data import records
from dallecli.train.loop import train
from tests.fixtures import cli, tasks
from tests.fixtures.runs import make_prior_run

BUILD = ["build-shards", "--source", "shapes", "--count", 300, "--per-shard", 50, "--quiet"]


def outputs(run, folder="shards"):
    """Every file build-shards leaves in RUN/shards (or its build in progress, RUN/shards/.unfinished), by
    name (its hidden working files excluded)."""
    folder = run / folder
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if not p.name.startswith(".")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run = tmp_path_factory.mktemp("shards") / "reference"
    result = cli.run(BUILD + ["--run", run])
    assert result.returncode == 0, result.stderr[-3000:]
    files = outputs(run)
    assert sum(name.endswith(".tar") for name in files) == 7 and "manifest.json" in files
    return files


def kill_then_rerun(tmp_path, **hook):
    run = tmp_path / "run"
    killed = cli.run(BUILD + ["--run", run], **hook)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (run / "shards" / "manifest.json").exists()
    rerun = cli.run(BUILD + ["--run", run])
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert not (run / "shards" / ".unfinished").exists()
    return outputs(run)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(3))
def test_killed_mid_shard_and_rerun_gives_identical_bytes(reference, tmp_path, seed):
    n = random.Random(seed).randrange(1, 300)
    assert kill_then_rerun(tmp_path, DALLE_TEST_SHARD_KILL_AFTER=n) == reference


@pytest.mark.slow
@pytest.mark.parametrize("commit", [2, 4])
def test_killed_between_state_commit_and_rename_and_rerun_gives_identical_bytes(reference, tmp_path, commit):
    assert kill_then_rerun(tmp_path, DALLE_TEST_SHARD_KILL_AT_COMMIT=commit) == reference


@pytest.mark.slow
def test_killed_from_outside_at_a_random_time_and_rerun_gives_identical_bytes(reference, tmp_path):
    import time

    run = tmp_path / "run"
    proc = cli.start(BUILD + ["--run", run])
    try:
        cli.wait_for(lambda: any((run / "shards" / ".unfinished").glob("*.partial")),
                     proc, poll=0.005)
        time.sleep(random.Random(0).uniform(0, 0.3))
        cli.kill_group(proc)
        proc.wait(timeout=30)
    finally:
        cli.kill_group(proc)
    rerun = cli.run(BUILD + ["--run", run])
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert outputs(run) == reference


@pytest.mark.slow
def test_disk_full_during_build_keeps_finished_shards_and_the_rerun_completes(reference, tmp_path):
    run = tmp_path / "run"
    failed = cli.run(BUILD + ["--run", run], DALLE_TEST_SHARD_ENOSPC_AFTER=120)
    assert failed.returncode != 0 and "No space left on device" in failed.stderr
    assert not records.list_shards(run / "shards", "train")           # no reader takes half a build for shards
    finished = {name: data for name, data in outputs(run, "shards/.unfinished").items() if name.endswith(".tar")}
    assert len(finished) == 2 and all(data == reference[name] for name, data in finished.items())
    rerun = cli.run(BUILD + ["--run", run])
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert outputs(run) == reference


@pytest.mark.slow
def test_disk_full_during_build_is_one_clear_error(tmp_path):
    failed = cli.run(BUILD + ["--run", tmp_path / "run"], DALLE_TEST_SHARD_ENOSPC_AFTER=120)
    assert cli.matches("No space left on device", cli.error_message(failed))


# --- 11. a failed write during training or encoding --------------------------------------------------------

def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch, code):
    """Disk full (ENOSPC) or an unwritable folder (EROFS; chmod does not stop root, so the error is injected)."""
    torch.set_num_threads(1)
    run = make_prior_run(tmp_path / "run", n_train=16, n_val=0, per_shard=8)
    out = tmp_path / "prior"
    cfg = dataclasses.replace(tasks.PRIOR_CFG, steps=8, save_every=4, keep=1,
                                       eval_every=0)
    train(tasks.prior_task(run), dataclasses.replace(cfg, steps=4), out)
    before = {p.name: p.read_bytes() for p in (out / "step-00000004").iterdir()}
    real = checkpoint.save_file

    def failing(tensors, path, metadata=None):
        real(tensors, path, metadata=metadata)
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(checkpoint, "save_file", failing)
    with pytest.raises(UserError, match=rf"^cannot write checkpoint .*step-00000008: {os.strerror(code)} "
                                        r"\(disk full or not writable\?\); the previous checkpoint .*step-00000004 "
                                        r"is intact; free space .* rerun the same command to resume$") as info:
        train(tasks.prior_task(run), cfg, out)
    assert isinstance(info.value, OSError)
    monkeypatch.undo()
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl", "step-00000004",
                                                      "train_config.json"]
    assert {p.name: p.read_bytes() for p in (out / "step-00000004").iterdir()} == before
    assert train(tasks.prior_task(run), cfg, out).step == 8  # and the rerun resumes


def test_disk_full_while_logging_metrics_is_one_clear_error(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    run = make_prior_run(tmp_path / "run", n_train=16, n_val=0, per_shard=8)
    import builtins

    real_open = builtins.open

    def failing_open(file, mode="r", *args, **kwargs):
        if str(file).endswith("metrics.jsonl") and "a" in mode:
            enospc()
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", failing_open)
    cfg = dataclasses.replace(tasks.PRIOR_CFG, steps=2, eval_every=0)
    with pytest.raises(UserError, match=r"cannot write .*metrics\.jsonl: No space left on device"):
        train(tasks.prior_task(run), cfg, tmp_path / "prior")


def test_disk_full_while_writing_a_shard_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "train-000000.tar"
    records.write_tar(path, [("a", {"txt": b"old"})])
    old = path.read_bytes()
    monkeypatch.setattr(records.os, "fsync", enospc)
    with pytest.raises(records.ShardWriteError, match=r"cannot write shard .*train-000000\.tar: No space left on "
                                                      r"device .* already written are intact"):
        records.write_tar(path, [("a", {"txt": b"new" * 1000})])
    monkeypatch.undo()
    assert path.read_bytes() == old
    assert [p.name for p in tmp_path.iterdir()] == ["train-000000.tar"]


@pytest.mark.slow
def test_build_workers_do_not_outlive_a_killed_build(tmp_path):
    import time

    run = tmp_path / "run"
    proc = cli.start(BUILD + ["--run", run, "--workers", 2], DALLE_TEST_SHARD_KILL_AFTER=100)
    try:
        proc.wait(timeout=120)
        end = time.monotonic() + 30
        while cli.survivors(proc) and time.monotonic() < end:
            time.sleep(0.2)
        assert cli.survivors(proc) == []
    finally:
        cli.kill_group(proc)


def test_disk_full_while_encoding_is_one_clear_error_and_old_code_shards_stay(tmp_path, capfd, monkeypatch):
    import tarfile

    from dallecli.config import to_dict
    from dallecli.models.dvae import DVAE, DVAEConfig
    from tests.fixtures.runs import make_dvae_run

    torch.set_num_threads(1)
    run = make_dvae_run(tmp_path / "run", n_train=8, n_val=0, per_shard=4, size=16)
    config = DVAEConfig(image_size=16, n_hid=8, n_blk_per_group=1, groups=3, vocab_size=32, n_init=8)
    for step in (1, 2):  # two different dVAEs
        torch.manual_seed(step)
        checkpoint.save(run / f"dvae{step}", step, kind="dvae", model_config=to_dict(config),
                        weights=DVAE(config).state_dict())
    assert cli.run_inprocess(["encode", "--run", run, "--dvae", run / "dvae1"], capfd).returncode == 0
    before = {p.name: p.read_bytes() for p in (run / "codes").glob("*.tar")}
    monkeypatch.setattr(tarfile.TarFile, "addfile", enospc)
    message = cli.error_message(cli.run_inprocess(["encode", "--run", run, "--dvae", run / "dvae2"], capfd))
    assert cli.matches(r"cannot write shard .*train-000000\.tar: No space left on device", message), message
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in (run / "codes").glob("*.tar")} == before
    assert not [p for p in (run / "codes").iterdir() if p.name.startswith(".train")]


def test_real_write_errors_from_safetensors_and_torch_are_clear(tmp_path):
    """A genuine kernel write error (a file-size limit: EFBIG), not an injected exception: safetensors
    reports it as a SafetensorError and torch.save as a RuntimeError when they open the file themselves;
    both must come out as one CheckpointWriteError, with the previous checkpoint intact."""
    import json
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import json, resource, signal, torch
        from dallecli import checkpoint
        root = {str(tmp_path / "ck")!r}
        small = {{"w": torch.zeros(10)}}
        checkpoint.save(root, 1, kind="prior", model_config={{}}, weights=small, training_state={{"step": 1}})
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
        out = []
        for step, weights, state in ((2, {{"w": torch.zeros(50_000)}}, {{"step": 2}}),
                                     (3, small, {{"step": 3, "big": torch.zeros(50_000)}})):
            try:
                checkpoint.save(root, step, kind="prior", model_config={{}}, weights=weights, training_state=state)
                out.append(None)
            except checkpoint.CheckpointWriteError as exc:
                out.append(str(exc))
        print(json.dumps(out))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=cli.ROOT,
                            env=cli.cli_env(), timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    for message in json.loads(result.stdout.strip().splitlines()[-1]):
        assert message and re.search(r"cannot write checkpoint .*: File too large .*step-00000001 is intact", message)
    assert [s for s, _ in checkpoint.complete_steps(tmp_path / "ck")] == [1]
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["step-00000001"]


@pytest.mark.slow
def test_real_write_error_during_training_is_one_line_and_resumable(tmp_path):
    run = make_prior_run(tmp_path / "run")
    args = ["train-prior", "--run", run, "--preset", "tiny", "--precision", "fp32", "--batch-size", 4, "--text-len", 8, "--save-every", 3, "--eval-every", 0,
            "--quiet"]
    assert cli.run(args + ["--steps", 3]).returncode == 0
    before = {p.name: p.read_bytes() for p in (run / "prior" / "step-00000003").iterdir()}
    failed = cli.run(args + ["--steps", 6], DALLE_TEST_FSIZE_LIMIT=1_000_000)  # the weights are ~3.6 MB
    assert cli.matches(r"cannot write checkpoint .*step-00000006: File too large .*step-00000003 is intact",
                       cli.error_message(failed))
    assert {p.name: p.read_bytes() for p in (run / "prior" / "step-00000003").iterdir()} == before
    assert cli.run(args + ["--steps", 6]).returncode == 0
