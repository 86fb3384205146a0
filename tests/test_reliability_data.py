"""Reliability, items 4–5: the data position resumes exactly, and damaged data is used or reported
sample by sample (the policy is in tests/fixtures/corrupt.py), through the real loop and tasks."""
import dataclasses
import json
import os
import signal
import time
from collections import Counter

import numpy as np
import pytest
import torch

from dallecli.console import UserError
from dallecli.data.loader import ShardIndex, make_loader, read_codes, read_image
from dallecli.train.loop import train
from tests.fixtures import tasks
from tests.fixtures.corrupt import all_bad_codes, code_fixture, image_fixture
from tests.fixtures.runs import make_prior_run, write_code_manifest


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def record_keys(task, stop_at=None):
    """Wrap a task so every batch's keys are recorded, and optionally SIGTERM ourselves mid-step `stop_at`."""
    seen = []
    count, loss = task.count, task.loss

    def counting(batch):
        seen.extend(batch.keys)
        return count(batch)

    def stopping(model, data, step, **kw):
        if step == stop_at:
            os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler would; the loop finishes this step
        return loss(model, data, step, **kw)

    task.count, task.loss = counting, stopping
    return seen


# --- 4. the data position ---------------------------------------------------------------------------------

def test_interrupted_epoch_consumes_each_key_once_2_workers_4_shards(tmp_path):
    run = make_prior_run(tmp_path / "run", n_train=48, per_shard=12)  # 4 shards
    assert len(list((run / "codes").glob("train-*.tar"))) == 4
    cfg = dataclasses.replace(tasks.PRIOR_CFG, steps=12, save_every=100)  # one epoch
    whole = record_keys(task := tasks.prior_task(run, workers=2))
    train(task, cfg, tmp_path / "whole")
    first = record_keys(task := tasks.prior_task(run, workers=2), stop_at=4)
    result = train(task, cfg, tmp_path / "part")
    assert result.stopped_by == "SIGTERM" and result.step == 5
    rest = record_keys(task := tasks.prior_task(run, workers=2))
    assert train(task, cfg, tmp_path / "part").step == 12
    expected = Counter(f"s{i:05d}" for i in range(48))
    assert Counter(whole) == expected
    assert Counter(first + rest) == expected  # no duplicates, nothing skipped
    assert first + rest == whole  # and in the same order


def test_two_processes_interrupted_and_resumed_cover_the_epoch_once(tmp_path):
    """Each rank's slice of each global batch, interrupted at a batch boundary and resumed there."""
    run = make_prior_run(tmp_path / "run", n_train=48, per_shard=12)
    index = ShardIndex(run / "codes", "train")

    def keys(start, n, rank):
        loader = make_loader(index, lambda m, rng: read_codes(m, 8), torch.stack, batch_size=4, seed=3,
                             start_batch=start, rank=rank, world=2, workers=2)
        return [k for _, batch in zip(range(n), loader) for k in batch.keys]

    per_epoch = 48 // (4 * 2)
    whole = keys(0, per_epoch, 0) + keys(0, per_epoch, 1)
    resumed = keys(0, 2, 0) + keys(2, per_epoch - 2, 0) + keys(0, 2, 1) + keys(2, per_epoch - 2, 1)
    assert Counter(whole) == Counter(resumed) == Counter(f"s{i:05d}" for i in range(48))


@pytest.mark.slow
def test_two_real_processes_interrupted_by_sigterm_resume_the_epoch_exactly(tmp_path):
    """`accelerate launch` with two CPU (gloo) processes running `dalle train-prior`, both told to stop
    by SIGTERM in the middle of step 3, then rerun: the keys used equal one uninterrupted epoch."""
    import subprocess
    import sys

    from tests.fixtures import cli

    run = make_prior_run(tmp_path / "run", n_train=48, per_shard=12)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--main_process_port", "29517", "--mixed_precision", "no", "--dynamo_backend", "no",
              str(cli.INJECT), "train-prior", "--run", str(run), "--preset", "tiny", "--precision", "fp32", "--steps", "6", "--batch-size", "4",
              "--text-len", "8", "--save-every", "100", "--eval-every", "0", "--quiet", "--cpu"]

    def go(out, **env):
        result = subprocess.run(launch + ["--out", str(run / out)], cwd=cli.ROOT, capture_output=True, text=True,
                                env=cli.cli_env(DALLE_LAUNCHED="1", **env), timeout=600)
        return result

    assert go("whole", DALLE_TEST_KEYS=tmp_path / "whole").returncode == 0
    stopped = go("part", DALLE_TEST_KEYS=tmp_path / "part", DALLE_TEST_SIGNAL_AT_STEP=f"2:{int(signal.SIGTERM)}")
    # Each rank saves and exits 143; the launcher reports that as its own failure (with its traceback).
    assert stopped.returncode != 0 and "dallecli/" not in stopped.stderr, stopped.stderr[-3000:]
    from dallecli import checkpoint
    assert checkpoint.load(run / "part", "prior").step == 3
    assert go("part", DALLE_TEST_KEYS=tmp_path / "part").returncode == 0

    def used(prefix):
        return Counter(k for rank in (0, 1) for line in (tmp_path / f"{prefix}.{rank}").read_text().splitlines()
                       for k in line.split())

    assert used("whole") == used("part") == Counter(f"s{i:05d}" for i in range(48))


# --- 5. damaged data ------------------------------------------------------------------------------------

def _check_reports(result_rejects, out, fx):
    """Every bad sample reported once with (shard, key, reason), in TrainResult and in OUT/rejects.jsonl."""
    written = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert [{k: r[k] for k in ("shard", "key", "reason")} for r in written] == result_rejects
    by_key = {}
    for r in result_rejects:
        key = r["key"] if r["shard"] in ("train-000000.tar",) or "duplicate" not in r["reason"] \
            else f"{r['key']}@{r['shard'][-5]}"
        assert key not in by_key, f"{key} reported twice"
        by_key[key] = r
    assert set(by_key) == set(fx.bad), set(by_key) ^ set(fx.bad)
    import re
    for key, pattern in fx.bad.items():
        assert re.search(pattern, by_key[key]["reason"]), (key, by_key[key]["reason"])
        assert by_key[key]["shard"].startswith("train-")


def _one_epoch(task, out, cfg_kwargs):
    used = record_keys(task)
    index = ShardIndex(task.shards if hasattr(task, "shards") else task.codes, "train")
    steps = len(index) // task.batch_size
    assert len(index) % task.batch_size == 0, "the fixture must fill whole batches"
    cfg = dataclasses.replace(tasks.DVAE_CFG, steps=steps, save_every=1000,
                                      eval_every=0, **cfg_kwargs)
    result = train(task, cfg, out)
    return used, result


def test_images_cmyk_palette_grey_16bit_rgba_used_once_broken_tiny_elongated_dups_cut_tail_reported(
        tmp_path, monkeypatch):
    """The dVAE's policy: every convertible image is used exactly once; captions are not read (so the
    caption faults are good samples here); each bad one is reported with shard, key and reason; no
    sleeping per error (time.sleep is forbidden for the run)."""
    sentinel = tmp_path / "pwned"
    fx = image_fixture(tmp_path / "shards", 16, sentinel)
    monkeypatch.setattr(time, "sleep", lambda s: pytest.fail("slept on an error"))
    used, result = _one_epoch(tasks.dvae_task(fx.folder, size=16, batch_size=13), tmp_path / "out", {})
    assert Counter(used) == Counter(fx.good)
    _check_reports(result.rejects, tmp_path / "out", fx)
    assert not sentinel.exists()


def test_captions_overlong_truncated_used_empty_whitespace_nonutf8_missing_bad_codes_dups_reported(tmp_path):
    """The prior's policy: an over-long caption is used (the tokenizer keeps text_len tokens); empty,
    whitespace-only, non-UTF-8 and missing captions, codes of the wrong length or outside the
    vocabulary, duplicate keys and a cut tar tail are reported."""
    run = make_prior_run(tmp_path / "run", n_train=8, n_val=0, per_shard=8, grid=4, vocab=32)
    sentinel = tmp_path / "pwned"
    fx = code_fixture(tmp_path / "codes", 4, 32, sentinel)
    write_code_manifest(fx.folder, 4, 32)
    task = tasks.prior_task(run, codes=fx.folder, grid=4, vocab=32, batch_size=19, cond_drop=0.0)
    used, result = _one_epoch(task, tmp_path / "out", {})
    assert Counter(used) == Counter(fx.good)
    _check_reports(result.rejects, tmp_path / "out", fx)
    text, _ = task.decode({"codes": np.zeros(16, "<u2").tobytes(), "txt": ("a red circle " * 200).encode()},
                          np.random.default_rng(0), train=False)
    assert (text != task.config.pad_id).all()  # truncated to text_len, all positions real tokens
    assert not sentinel.exists()


def test_stops_with_clear_error_after_max_errors_in_a_row(tmp_path, monkeypatch):
    run = make_prior_run(tmp_path / "run", n_train=8, n_val=0, per_shard=8, grid=4, vocab=32)
    bad = all_bad_codes(tmp_path / "bad", n=24)
    write_code_manifest(bad, 4, 32)
    monkeypatch.setattr(time, "sleep", lambda s: pytest.fail("slept on an error"))
    task = tasks.prior_task(run, codes=bad, grid=4, vocab=32, batch_size=4)
    cfg = dataclasses.replace(tasks.PRIOR_CFG, steps=100, max_errors=7)
    with pytest.raises(UserError, match=r"^7 bad samples in a row \(last: train-000000.tar:bad\d+: codes hold 1 "
                                        r"values, expected 4x4\); fix the shards or raise --max-errors$"):
        train(task, cfg, tmp_path / "out")
    assert len((tmp_path / "out" / "rejects.jsonl").read_text().splitlines()) == 7  # then it stopped


def test_consecutive_errors_are_counted_in_sample_order(tmp_path):
    """bad, bad, good, bad, bad, good…: never 3 in a row, so max_errors=3 does not stop the run
    (the count resets at each good sample, even within one batch)."""
    from dallecli.data.records import write_tar

    run = make_prior_run(tmp_path / "run", n_train=8, n_val=0, per_shard=8, grid=4, vocab=32)
    folder = tmp_path / "codes"
    folder.mkdir()
    good = np.ones(16, "<u2").tobytes()
    write_tar(folder / "train-000000.tar", [(f"k{i:02d}", {"codes": good if i % 3 == 2 else b"", "txt": b"a red circle"})
                                            for i in range(12)])
    write_code_manifest(folder, 4, 32)
    task = tasks.prior_task(run, codes=folder, grid=4, vocab=32, batch_size=6)
    from dallecli.train.prior_task import _stack_pairs

    task.loader = lambda start, rank, world: make_loader(  # unshuffled: the file's order
        ShardIndex(folder, "train"), task.decode, _stack_pairs, batch_size=6, seed=0, start_batch=start,
        shuffle=False)
    cfg = dataclasses.replace(tasks.PRIOR_CFG, steps=4, max_errors=3, eval_every=0)
    result = train(task, cfg, tmp_path / "out")
    assert result.step == 4 and len(result.rejects) == 16


def test_16bit_png_is_scaled_not_clipped_and_transparency_is_on_white():
    import io

    from PIL import Image

    a = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1024)  # 0 … 64512
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    rgb = np.asarray(read_image({"png": buf.getvalue()}))
    assert np.array_equal(rgb[..., 0], np.rint(a / 257).astype(np.uint8))
    clear = np.zeros((4, 4, 4), np.uint8)  # fully transparent black
    buf = io.BytesIO()
    Image.fromarray(clear).save(buf, format="PNG")
    assert (np.asarray(read_image({"png": buf.getvalue()})) == 255).all()


def test_shard_images_read_as_build_shards_makes_them():
    """Shards made by another tool (tars named train-NNNNNN.tar) hold any image: the loader converts each one
    exactly as `dalle build-shards` would (`images.upright_rgb8`): a dark 16-bit greyscale stays dark, CMYK,
    palette transparency, and the EXIF orientation (which the loader's own earlier conversion ignored)."""
    import io

    from PIL import Image

    from dallecli.data.images import upright_rgb8

    def encoded(im, fmt, **kw):
        buf = io.BytesIO()
        im.save(buf, format=fmt, **kw)
        return buf.getvalue()

    dark = Image.fromarray((np.arange(64, dtype=np.uint16).reshape(8, 8) * 4))  # 0 … 252 of 65535
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 200, 30, 30] + [0] * 762)
    palette.info["transparency"] = 0
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to view"
    tall = Image.new("RGB", (16, 8), (250, 0, 0))
    tall.paste((0, 0, 250), (0, 0, 4, 8))
    cases = {"16-bit dark": encoded(dark, "PNG"), "palette": encoded(palette, "PNG"),
             "cmyk": encoded(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG"),
             "exif": encoded(tall, "JPEG", exif=exif.tobytes(), quality=95)}
    for name, data in cases.items():
        ours = np.asarray(read_image({"png" if name in ("16-bit dark", "palette") else "jpg": data}))
        with Image.open(io.BytesIO(data)) as im:
            expected = np.asarray(upright_rgb8(im))
        assert np.array_equal(ours, expected), name
    assert np.asarray(read_image({"png": cases["16-bit dark"]})).max() <= 1  # 252 / 65535 · 255
    upright = read_image({"jpg": cases["exif"]})
    assert upright.size == (8, 16)  # turned: 16 wide × 8 high stored, 8 × 16 shown
    assert np.asarray(upright)[0, 4, 2] > 200  # the blue strip (stored at the left) is now at the top
