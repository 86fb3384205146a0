"""Reliability, items 8–9: non-finite steps are skipped without touching any state and never reach a
checkpoint; two runs with the same seed are bitwise identical, and match a checked-in golden trace.

The golden trace (tests/golden/losses_20_steps.json) is compared bit for bit on the torch version and CPU
capability it was recorded with (torch 2.14.1, CPU, one thread); elsewhere within rtol 1e-4. Rewrite it
after an intended numerical change with `DALLE_WRITE_GOLDEN=1 pytest tests/test_reliability_numeric.py`.
"""
import dataclasses
import json
import math
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from dallecli import checkpoint
from dallecli.console import UserError
from dallecli.train.loop import train
from dallecli.train.schedule import learning_rate
from dallecli.train.state import first_nonfinite
from tests.fixtures import tasks
from tests.fixtures.cli import losses, tensors_equal
from tests.fixtures.runs import make_dvae_run, make_prior_run

GOLDEN = Path(__file__).parent / "golden" / "losses_20_steps.json"
CFG = dataclasses.replace(tasks.PRIOR_CFG, steps=8, schedule="cosine", warmup=3, save_every=1, eval_every=0,
                          max_nonfinite=3)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def run(tmp_path):
    return make_prior_run(tmp_path / "run", n_train=32, n_val=0, per_shard=16)


def poisoned(task, nan_at=(), inf_grad_at=(), corrupt_at=(), start=0):
    """Inject a NaN loss, an infinite gradient (the loss stays finite) or NaN weights at given steps (counted
    from `start`, the step the run resumes at: the loss itself is told updates, which skipped steps do not
    advance)."""
    loss, calls = task.loss, iter(range(start, 1 << 30))

    def poisoned_loss(model, data, updates, **kw):
        step = next(calls)  # one micro-batch per step here
        if step in corrupt_at:
            with torch.no_grad():
                next(model.parameters()).view(-1)[0] = math.nan
        value, parts = loss(model, data, updates, **kw)
        if step in nan_at:
            value = value * math.nan
        if step in inf_grad_at:  # + 0·sqrt(0): the value stays finite, the gradient is not
            value = value + 0.0 * torch.sqrt((next(model.parameters()) * 0).sum())
        return value, parts

    task.loss = poisoned_loss
    return task


def lrs(folder):
    return [r["lr"] for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())
            if r["split"] == "train"]


@pytest.mark.parametrize("fault", ["nan_loss", "inf_gradient"])
def test_nonfinite_step_leaves_weights_optimizer_ema_and_schedule_unchanged(run, tmp_path, fault):
    clean = tmp_path / "clean"
    train(tasks.prior_task(run), dataclasses.replace(CFG, steps=2), clean)
    hit = tmp_path / "hit"
    shutil.copytree(clean, hit)
    kw = {"nan_at": (2,)} if fault == "nan_loss" else {"inf_grad_at": (2,)}
    train(poisoned(tasks.prior_task(run), **kw, start=2), dataclasses.replace(CFG, steps=3), hit)
    before, after = checkpoint.load(clean, "prior"), checkpoint.load(hit, "prior")
    assert after.step == 3
    tensors_equal(before.weights(ema=False), after.weights(ema=False), "weights")
    tensors_equal(before.ema_weights(), after.ema_weights(), "ema")
    sa, sb = before.training_state(), after.training_state()
    tensors_equal(sa["optimizer"]["state"], sb["optimizer"]["state"], "optimizer")  # moments, AdamW's step counts
    for ga, gb in zip(sa["optimizer"]["param_groups"], sb["optimizer"]["param_groups"]):
        assert {**ga, "lr": None} == {**gb, "lr": None}  # lr is set afresh at every step
    assert (sb["halvings"], sb["best"], sb["bad_evals"]) == (sa["halvings"], sa["best"], sa["bad_evals"])
    assert sb["scaler"] == sa["scaler"]
    assert sb["nonfinite"] == sa["nonfinite"] + 1 == 1  # the counter
    # The schedule did not move: the next update gets the learning rate the skipped one would have had.
    train(tasks.prior_task(run), dataclasses.replace(CFG, steps=5), hit)
    assert lrs(hit)[2:4] == [learning_rate(CFG, 2)] * 2
    assert lrs(hit)[4] == learning_rate(CFG, 3)
    assert json.loads((hit / "metrics.jsonl").read_text().splitlines()[-1])["skipped"] == 1


def test_aborts_after_m_in_a_row_only_and_the_streak_survives_a_resume(run, tmp_path):
    out = tmp_path / "out"
    # Two in a row, one good, two in a row: never 3 in a row.
    result = train(poisoned(tasks.prior_task(run), nan_at=(1, 2, 4, 5)), dataclasses.replace(CFG, steps=6), out)
    assert result.step == 6 and checkpoint.load(out, "prior").training_state()["nonfinite"] == 4
    # The streak of 2 (steps 5 and 6) is saved: one more non-finite step after resuming makes 3.
    with pytest.raises(UserError, match=r"^3 non-finite steps in a row at step 7; .*intact"):
        train(poisoned(tasks.prior_task(run), nan_at=(6,), start=6), CFG, out)
    assert checkpoint.load(out, "prior").step == 6


def all_finite(folder: Path) -> None:
    for step, path in checkpoint.complete_steps(folder):
        ck = checkpoint.load(path, "prior")
        tree = {"weights": ck.weights(ema=False), "ema": ck.ema_weights(), "state": ck.training_state()}
        assert first_nonfinite(tree) is None, (step, first_nonfinite(tree))


def test_no_checkpoint_ever_holds_nan_or_inf(run, tmp_path):
    out = tmp_path / "out"
    train(poisoned(tasks.prior_task(run), nan_at=(1, 3), inf_grad_at=(4,)), dataclasses.replace(CFG, steps=6), out)
    assert [s for s, _ in checkpoint.complete_steps(out)] == [1, 2, 3, 4, 5, 6]
    all_finite(out)
    # Weights that turn NaN (here: corrupted in place at step 8) are refused at the next save.
    with pytest.raises(UserError, match=r"refusing to save step 8: weights\.\S+ holds NaN or Inf; the last "
                                        r"checkpoint \(.*step-00000007\) is intact"):
        train(poisoned(tasks.prior_task(run), corrupt_at=(7,), start=6), dataclasses.replace(CFG, max_nonfinite=5),
              out)
    assert checkpoint.latest(out).name == "step-00000007"
    all_finite(out)


# --- 9. determinism --------------------------------------------------------------------------------------

def trace(tmp_path, model, name, workers=0):
    if model == "prior":
        run = make_prior_run(tmp_path / f"in-{name}", n_train=32, n_val=0, per_shard=16)
        task, cfg = tasks.prior_task(run, workers=workers), tasks.PRIOR_CFG
    else:
        run = make_dvae_run(tmp_path / f"in-{name}", n_train=16, n_val=0, per_shard=8, size=16)
        task, cfg = tasks.dvae_task(run / "shards", size=16, workers=workers, steps=20), tasks.DVAE_CFG
    cfg = dataclasses.replace(cfg, steps=20, save_every=100, eval_every=0)
    train(task, cfg, tmp_path / name)
    return [losses(tmp_path / name)[s] for s in range(1, 21)]


def bits(values):
    return [struct.pack("<d", v).hex() for v in values]


@pytest.mark.parametrize("model", ["prior", "dvae"])
def test_two_fresh_runs_with_one_seed_are_bitwise_identical(tmp_path, model):
    a = trace(tmp_path, model, "a")
    b = trace(tmp_path, model, "b", workers=2)  # the number of data workers does not matter either
    assert bits(a) == bits(b)
    assert all(math.isfinite(v) for v in a)


def cpu_kind() -> str:
    """The processor, as far as it decides which kernels run: vendor, family and model, and the instruction
    sets oneDNN picks kernels by. Machines with one torch.backends.cpu capability ("AVX512") but another CPU
    (an AMD one with AVX512-BF16, an Intel one without) differ in the last bits of a loss."""
    try:
        block = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
    except OSError:
        import platform

        return platform.processor() or platform.machine()
    fields = dict(line.split(":", 1) for line in block.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    isa = sorted(set(fields.get("flags", "").split()) & {"avx512_bf16", "avx512_fp16", "avx512_vnni", "avx_vnni",
                                                           "amx_bf16", "amx_tile", "amx_int8"})
    return " ".join([fields.get("vendor_id", "?"), f"family {fields.get('cpu family', '?')}",
                     f"model {fields.get('model', '?')}", *isa])


def test_golden_20_step_losses(tmp_path):
    got = {model: trace(tmp_path, model, model) for model in ("prior", "dvae")}
    env = {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "cpu": cpu_kind(), "threads": 1}
    if os.environ.get("DALLE_WRITE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps({**env, "note": "20 training steps of tests/fixtures tiny prior and dVAE, "
                                      "seed 0; see tests/test_reliability_numeric.py", **got}, indent=1) + "\n")
    golden = json.loads(GOLDEN.read_text())
    exact = all(golden.get(k) == env[k] for k in ("torch", "cpu_capability", "cpu"))
    for model in ("prior", "dvae"):
        if exact:  # bitwise on the recorded torch version and processor
            assert bits(got[model]) == bits(golden[model]), model
        else:  # other torch versions or CPUs reorder float sums
            np.testing.assert_allclose(got[model], golden[model], rtol=1e-4, err_msg=model)
