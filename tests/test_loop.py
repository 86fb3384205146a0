"""The shared training loop on a toy task: loss falls, exact resume, non-finite steps skipped, data order."""
import io
import json
import math
import re
import shutil
import tarfile
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from dallecli import checkpoint
from dallecli.console import UserError
from dallecli.data.loader import BadSample, ShardIndex, make_loader, read_codes
from dallecli.train.loop import TrainConfig, train
from dallecli.train.schedule import cosine, ema_decay_at, learning_rate


def write_shard(path, samples):
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def make_code_shards(folder, n=48, per_shard=12, grid=2, split="train"):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    samples = []
    for i in range(n):
        codes = rng.integers(0, 16, size=grid * grid).astype("<u2").tobytes()
        samples.append((f"s{i:04d}", {"codes": codes, "txt": f"caption {i}".encode()}))
    for s in range(0, n, per_shard):
        write_shard(folder / f"{split}-{s // per_shard:06d}.tar", samples[s: s + per_shard])
    return folder


class ToyTask:
    """Predict the sum of the codes from the codes: a model, data and loss the loop can run."""

    kind, unit = "prior", "img"

    def __init__(self, folder, batch_size=4, workers=0, poison_step=None):
        self.folder, self.batch_size, self.workers, self.poison_step = folder, batch_size, workers, poison_step
        self.seen: list[str] = []

    def model_config(self):
        return {"width": 8}

    def meta(self):
        return {}

    def build_model(self):
        return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Dropout(0.1), nn.Linear(8, 1))

    def param_groups(self, model, wd):
        return [{"params": list(model.parameters()), "weight_decay": wd}]

    def loader(self, start_batch, rank, world):
        index = ShardIndex(self.folder, "train")
        return make_loader(index, lambda m, rng: read_codes(m, 2).float().flatten() / 16, torch.stack,
                           batch_size=self.batch_size, seed=1, start_batch=start_batch, rank=rank, world=world,
                           workers=self.workers)

    def count(self, batch):
        self.seen.extend(batch.keys)
        return len(batch.keys)

    def loss(self, model, x, step):
        target = x.sum(dim=1, keepdim=True)
        loss = ((model(x) - target) ** 2).mean()
        if step == self.poison_step:
            loss = loss * math.nan
        return loss, {}

    def evaluate(self, model, step):
        return {"val_loss": 0.0}

    def check_resume(self, ck):
        pass


CFG = TrainConfig(steps=30, batch_size=4, lr=3e-2, betas=(0.9, 0.99), ema_decay=0.9, save_every=10,
                  eval_every=15, log_every=1, keep=5, seed=3)


def losses(folder):
    return [r["loss"] for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())
            if r["split"] == "train"]


def test_loss_falls_and_checkpoints(tmp_path):
    shards = make_code_shards(tmp_path / "shards")
    result = train(ToyTask(shards), CFG, tmp_path / "run")
    assert result.step == 30
    assert [s for s, _ in checkpoint.complete_steps(tmp_path / "run")] == [10, 20, 30]
    trace = losses(tmp_path / "run")
    assert len(trace) == 30 and np.mean(trace[-5:]) < np.mean(trace[:5])
    ck = checkpoint.load(tmp_path / "run", "prior")
    assert ck.has_ema() and ck.training_state()["data_position"] == 30


def test_resume_is_exact(tmp_path):
    shards = make_code_shards(tmp_path / "shards")
    full = tmp_path / "full"
    train(ToyTask(shards), CFG, full)
    part = tmp_path / "part"
    shutil.copytree(full, part)  # as if killed right after step 20 was saved
    shutil.rmtree(part / "step-00000030")
    train(ToyTask(shards), CFG, part)  # rerunning continues from the latest checkpoint
    assert losses(part) == losses(full)
    a, b = checkpoint.load(full, "prior"), checkpoint.load(part, "prior")
    for k, v in a.weights(ema=False).items():
        assert torch.equal(v, b.weights(ema=False)[k])
    for k, v in a.weights(ema=True).items():
        assert torch.equal(v, b.weights(ema=True)[k])
    sa, sb = a.training_state()["optimizer"]["state"], b.training_state()["optimizer"]["state"]
    for k in sa:
        assert torch.equal(sa[k]["exp_avg_sq"], sb[k]["exp_avg_sq"])


def test_resume_refuses_another_shape(tmp_path):
    shards = make_code_shards(tmp_path / "shards")
    train(ToyTask(shards), replace(CFG, steps=10), tmp_path / "run")
    task = ToyTask(shards)
    task.model_config = lambda: {"width": 16}
    with pytest.raises(UserError, match="width: checkpoint 8 != now 16"):
        train(task, CFG, tmp_path / "run")


def test_nonfinite_step_is_skipped(tmp_path, capfd):
    shards = make_code_shards(tmp_path / "shards")
    cfg = replace(CFG, steps=6, save_every=100, ema_decay=None)
    # Stop right before the poisoned step, then run it: weights and optimizer must not change.
    train(ToyTask(shards), replace(cfg, steps=3), tmp_path / "run")
    before = checkpoint.load(tmp_path / "run", "prior")
    train(ToyTask(shards, poison_step=3), replace(cfg, steps=4), tmp_path / "run")
    after = checkpoint.load(tmp_path / "run", "prior")
    for k, v in before.weights().items():
        assert torch.equal(v, after.weights()[k])
    assert after.training_state()["nonfinite"] == 1
    assert re.search(r"skipped updates\s+1\b", capfd.readouterr().out)  # said in the summary
    sa, sb = before.training_state()["optimizer"]["state"], after.training_state()["optimizer"]["state"]
    assert all(torch.equal(sa[k]["exp_avg"], sb[k]["exp_avg"]) for k in sa)


def test_the_task_schedules_keep_the_clock_of_updates(tmp_path):
    """A skipped step moves neither the learning rate nor the task's own schedules (the dVAE's τ and β): the
    loss is told the updates made so far, not the steps."""
    class Recording(ToyTask):
        clock: list[int] = []

        def loss(self, model, x, updates):
            self.clock.append(updates)
            loss, parts = super().loss(model, x, updates)
            return (loss * math.nan if len(self.clock) == 3 else loss), parts  # the third step is skipped

    train(Recording(make_code_shards(tmp_path / "shards")), replace(CFG, steps=5, ema_decay=None), tmp_path / "run")
    assert Recording.clock == [0, 1, 2, 2, 3]


def test_a_second_ctrl_c_stops_at_once_and_names_the_checkpoint_left(tmp_path, capfd):
    import os
    import signal

    class Interrupted(ToyTask):
        calls = 0

        def loss(self, model, x, updates):
            Interrupted.calls += 1
            if Interrupted.calls == 4:  # in step 4, after step 2's checkpoint
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGINT)
            return super().loss(model, x, updates)

    with pytest.raises(KeyboardInterrupt):
        train(Interrupted(make_code_shards(tmp_path / "shards")), replace(CFG, steps=6, save_every=2),
              tmp_path / "run")
    err = " ".join(capfd.readouterr().err.split())
    assert "stopped at once by a second Ctrl-C: the last checkpoint" in err and "step-00000002) is intact" in err
    assert checkpoint.latest(tmp_path / "run").name == "step-00000002"


def test_fresh_replaces_every_checkpoint_of_the_earlier_run_at_its_first_save(tmp_path):
    """The earlier run saved every 2 steps, the new one every 5: its steps 2 and 4 had stayed beside the new
    run's 5 (only checkpoints above the new step were removed)."""
    shards = make_code_shards(tmp_path / "shards")
    train(ToyTask(shards), replace(CFG, steps=6, save_every=2, ema_decay=None), tmp_path / "run")
    assert [s for s, _ in checkpoint.complete_steps(tmp_path / "run")] == [2, 4, 6]
    train(ToyTask(shards), replace(CFG, steps=7, save_every=5, ema_decay=None), tmp_path / "run", fresh=True)
    assert [s for s, _ in checkpoint.complete_steps(tmp_path / "run")] == [5, 7]


class Crash(Exception):
    pass


def test_a_run_stopped_before_it_saved_leaves_the_run_files_of_the_checkpoint_it_started_from(tmp_path):
    """train_config.json and the logs describe the latest checkpoint: a rerun with other settings (or a --fresh
    one) that dies before its first save must not hand its settings to the next rerun, nor wipe the logs."""
    shards = make_code_shards(tmp_path / "shards")
    out = tmp_path / "run"
    first = replace(CFG, steps=10, save_every=10, eval_every=0, ema_decay=None)
    train(ToyTask(shards), first, out)
    files = {name: (out / name).read_bytes() for name in ("train_config.json",)}
    for fresh in (False, True):
        task = ToyTask(shards)
        real_loss = task.loss

        def crashing(model, x, step, real_loss=real_loss):
            if step >= 13:
                raise Crash
            return real_loss(model, x, step)

        task.loss = crashing
        logged = (out / "metrics.jsonl").read_bytes()
        with pytest.raises(Crash):
            train(task, replace(first, steps=40, save_every=20, batch_size=8, lr=1e-3), out, fresh=fresh)
        assert json.loads((out / "train_config.json").read_text())["batch_size"] == 4
        assert (out / "train_config.json").read_bytes() == files["train_config.json"]
        if fresh:  # the earlier run's rows stay until the new run saves
            assert (out / "metrics.jsonl").read_bytes() == logged and (out / ".fresh-metrics.jsonl").is_file()
        else:  # a resume appends its rows (the next resume cuts them back to its step)
            assert len(losses(out)) == 13
    # A --fresh run that saves: its own settings and logs replace the earlier run's at that save
    train(ToyTask(shards), replace(first, steps=3, save_every=3, batch_size=8), out, fresh=True)
    assert json.loads((out / "train_config.json").read_text())["batch_size"] == 8
    assert len(losses(out)) == 3 and not list(out.glob(".fresh-*"))
    assert train(ToyTask(shards), replace(first, steps=4, save_every=3, batch_size=8), out).step == 4
    assert len(losses(out)) == 4


def test_nonfinite_in_a_row_aborts(tmp_path):
    shards = make_code_shards(tmp_path / "shards")
    task = ToyTask(shards)
    task.loss = lambda model, x, step: (model(x).sum() * math.inf, {})
    with pytest.raises(UserError, match="non-finite steps in a row"):
        train(task, replace(CFG, max_nonfinite=3), tmp_path / "run")


@pytest.mark.parametrize("workers", [0, 2])
def test_data_order_resumes_exactly(tmp_path, workers):
    """Keys consumed by an interrupted and resumed epoch equal an uninterrupted epoch's, any workers."""
    shards = make_code_shards(tmp_path / "shards", n=48, per_shard=12)
    index = ShardIndex(shards, "train")
    decode = lambda m, rng: read_codes(m, 2)  # noqa: E731

    def keys(start, n_batches, rank=0, world=1):
        loader = make_loader(index, decode, torch.stack, batch_size=4, seed=7, start_batch=start, rank=rank,
                             world=world, workers=workers)
        out = []
        for i, batch in zip(range(n_batches), loader):
            out.extend(batch.keys)
        return out

    epoch = keys(0, 12)
    assert sorted(epoch) == sorted(f"s{i:04d}" for i in range(48))  # each sample exactly once
    assert keys(0, 5) + keys(5, 7) == epoch
    # Two processes split each global batch: together they see the same multiset.
    two = keys(0, 6, rank=0, world=2) + keys(0, 6, rank=1, world=2)
    assert sorted(two) == sorted(epoch)


def _worker_signals(members, rng):
    import signal

    return torch.tensor([signal.getsignal(signal.SIGINT) == signal.SIG_IGN,
                         signal.getsignal(signal.SIGTERM) == signal.SIG_IGN])


def test_data_workers_leave_the_stop_signals_to_the_main_process(tmp_path):
    """Ctrl-C and a scheduler's SIGTERM reach the whole process group: the workers ignore both, so that the
    main process can finish its step with their batches (and none dies holding the loader's shared lock)."""
    index = ShardIndex(make_code_shards(tmp_path / "shards", n=8, per_shard=8), "train")
    batch = next(iter(make_loader(index, _worker_signals, torch.stack, batch_size=4, seed=0, workers=1)))
    assert batch.data.all(), batch.data


def test_bad_samples_are_reported_not_fatal(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    good = (b"\x01\x00" * 4)
    write_shard(folder / "train-000000.tar", [("a", {"codes": good}), ("b", {"codes": b"\x01"}),
                                              ("c", {"codes": good}), ("d", {"codes": good})])
    index = ShardIndex(folder, "train")

    def decode(m, rng):
        return read_codes(m, 2)

    batch = next(iter(make_loader(index, decode, torch.stack, batch_size=4, seed=0, shuffle=False)))
    assert batch.keys == ["a", "c", "d"]
    assert batch.errors == [{"shard": "train-000000.tar", "key": "b", "reason": "codes hold 0 values, expected 2x2"}]
    with pytest.raises(BadSample):
        read_codes({}, 2)


def test_schedules():
    assert cosine(0, 100, 1.0, 0.0) == 1.0 and abs(cosine(100, 100, 1.0, 0.0)) < 1e-12
    assert cosine(500, 100, 1.0, 0.25) == 0.25
    cfg = TrainConfig(steps=100, lr=1.0, warmup=10, schedule="plateau")
    assert learning_rate(cfg, 0) == pytest.approx(0.1) and learning_rate(cfg, 50, halvings=2) == 0.25
    assert ema_decay_at(0.999, 0) < 0.2 and ema_decay_at(0.999, 10**6) == 0.999


def test_mfu_is_reported_only_where_a_peak_is_measured():
    from dallecli.models.prior import PRESETS, flops_per_token
    from dallecli.hardware import matmul_peak, model_flops_utilisation

    assert matmul_peak(torch.device("cpu")) is None  # no MFU on a CPU: no "mfu" field is logged
    # 2 processes × 1e15 FLOP/s peak; 1e5 tokens/s in all at 1e10 FLOPs per token = 50%
    assert model_flops_utilisation(1e5, 1e10, 2, 1e15) == pytest.approx(0.5)
    from dallecli.train.prior_task import PriorTask

    assert PriorTask.flops_per_unit.fget(type("T", (), {"config": PRESETS["base"]})()) == flops_per_token(PRESETS["base"])


@pytest.mark.parametrize("args", [["train-dvae", "--steps", "0"], ["train-dvae", "--batch-size", "0"],
                                  ["train-dvae", "--lr", "0"], ["train-prior", "--batch-size", "0"],
                                  ["train-prior", "--steps", "0"], ["train-prior", "--global-batch", "0"],
                                  ["train-clip", "--lr", "0"], ["train-prior", "--lr", "inf"],
                                  ["train-dvae", "--lr", "inf"], ["train-clip", "--lr", "inf"]])
def test_zero_is_refused_not_read_as_the_default(args, tmp_path):
    """`--steps 0` once trained a preset's full 2,000 steps: a 0 was taken for "not given"."""
    from typer.testing import CliRunner

    from dallecli.cli import app

    result = CliRunner().invoke(app, [*args, "--run", str(tmp_path / "run"), "-q"])
    assert isinstance(result.exception, UserError), result.output
    assert f"{args[1]} must be a finite number greater than 0" in str(result.exception)
    assert not (tmp_path / "run").exists()  # refused before anything is written


@pytest.mark.parametrize("args, message", [
    (["train-prior", "--dropout", "2"], "--dropout must be in [0, 1) (got 2.0)"),
    (["train-prior", "--ema-decay", "2"], "--ema-decay must be in [0, 1) (got 2.0"),
    (["train-prior", "--warmup", "-5"], "--warmup must be ≥ 0 (got -5)"),
    (["train-clip", "--weight-decay", "-1"], "--weight-decay must be ≥ 0 (got -1.0)"),
])
def test_rates_outside_their_range_are_refused(args, message, tmp_path):
    """These trained on (or failed with a traceback, for --dropout 2) instead of one line before anything ran."""
    from typer.testing import CliRunner

    from dallecli.cli import app

    result = CliRunner().invoke(app, [*args, "--run", str(tmp_path / "run"), "-q"])
    assert isinstance(result.exception, UserError) and message in str(result.exception), result.output
    assert not (tmp_path / "run").exists()


def test_train_config_refuses_what_the_loop_cannot_use():
    from dallecli.train.config import check_config

    for changes, message in (({"ema_decay": 1.5}, "--ema-decay must be in [0, 1)"), ({"warmup": -1}, "--warmup"),
                             ({"weight_decay": -0.1}, "--weight-decay"), ({"grad_clip": 0.0}, "gradient clip")):
        with pytest.raises(UserError, match=message.replace("[", r"\[").replace(")", r"\)")):
            check_config(replace(CFG, **changes))


def test_a_cpu_run_projected_to_take_too_long_is_warned_about_once(tmp_path, monkeypatch, capfd):
    """A CPU run whose remaining steps would take longer than CPU_LONG_RUN_S at the speed of its first steps
    gets one warning naming the time and the way out (--steps, a smaller preset); a short one gets none."""
    from dallecli.train import loop

    shards = make_code_shards(tmp_path / "shards")
    train(ToyTask(shards), CFG, tmp_path / "short")
    assert "at this speed" not in capfd.readouterr().err
    monkeypatch.setattr(loop, "CPU_LONG_RUN_S", 0.0)
    train(ToyTask(shards), CFG, tmp_path / "long")
    err = capfd.readouterr().err.replace("\n", " ")
    assert err.count("at this speed the remaining 19 steps take about") == 1 and "--steps N" in err
    assert loop._duration(3 * 365 * 86400) == "3 years" and loop._duration(3 * 86400) == "3 days"
    assert loop._duration(5400) == "1.5 hours"


def test_code_bytes_are_uint16_little_endian_row_major():
    from dallecli.codes import codes_to_bytes

    codes = torch.arange(12).view(3, 4)[:, :3] * 1000 + 7  # (3, 3), values above 255, not symmetric
    raw = codes_to_bytes(codes)
    assert raw[:4] == (7).to_bytes(2, "little") + (1007).to_bytes(2, "little")  # (0, 0) then (0, 1)
    assert torch.equal(read_codes({"codes": raw}, 3), codes)


def test_resume_is_exact_with_accumulation(tmp_path):
    shards = make_code_shards(tmp_path / "shards")
    cfg = replace(CFG, steps=20, grad_accum=2)
    train(ToyTask(shards), cfg, tmp_path / "full")
    shutil.copytree(tmp_path / "full", tmp_path / "part")
    shutil.rmtree(tmp_path / "part" / "step-00000020")
    train(ToyTask(shards), cfg, tmp_path / "part")
    assert losses(tmp_path / "part") == losses(tmp_path / "full")


def test_a_nan_loss_with_finite_gradients_is_skipped(tmp_path):
    class NanLoss(ToyTask):
        def loss(self, model, x, step):
            loss, parts = super().loss(model, x, step)
            if step == 3:
                loss = loss + torch.tensor(math.nan)  # outside the graph: every gradient stays finite
            return loss, parts

    shards = make_code_shards(tmp_path / "shards")
    cfg = replace(CFG, steps=6, save_every=100, ema_decay=None)
    train(ToyTask(shards), replace(cfg, steps=3), tmp_path / "run")
    before = checkpoint.load(tmp_path / "run", "prior")
    train(NanLoss(shards), replace(cfg, steps=4), tmp_path / "run")
    after = checkpoint.load(tmp_path / "run", "prior")
    for k, v in before.weights().items():
        assert torch.equal(v, after.weights()[k])
    assert after.training_state()["nonfinite"] == 1


def test_update_ema_takes_a_small_step_towards_the_weights():
    from dallecli.train.state import update_ema

    ema = {"w": torch.zeros(3), "n": torch.zeros(2, dtype=torch.long)}
    update_ema(ema, {"w": torch.ones(3), "n": torch.tensor([4, 5])}, decay=0.9)
    torch.testing.assert_close(ema["w"], torch.full((3,), 0.1))
    assert ema["n"].tolist() == [4, 5]
