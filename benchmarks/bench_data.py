"""Data: building shards (`dalle build-shards`) and reading them with the paper's augmentation.

build_shards  bench_build_shards.run (another helper's): our pipeline with two worker processes, against a
              plain single-process Pillow loop (open → RGB → centre crop + Lanczos resize to 256² → JPEG
              q95), both timed here, on synthetic 640×480 photos.
read_shards   the dVAE's training input path: ShardIndex + make_loader (resumable order, per-sample seeded
              augmentation) with DVAETask.decode, i.e. App. A.2's augmentation (random square crop,
              area-resize to [1.125, 1.5]× the side, random crop, random flip) and the float tensor, in one
              process (img/s per core). The shards hold 320 px JPEGs (`build-shards --size 320`) read into
              256 px, so every step of the augmentation runs; shards stored at the model's size reduce it to
              the flip. Reference: the same records read and decoded by a bare loop (seek, read, Pillow
              decode, to_tensor) without augmentation or loader.
"""
from __future__ import annotations

import io
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.common import Result, environment, measure, median, ratio, threads

STORED, SIZE, N_READ, N_BUILD = 320, 256, 192, 400


def build_shards(n: int = N_BUILD) -> Result:
    from benchmarks.bench_build_shards import run

    env = environment()
    out = run(n=n)
    value, plain = out["workers_2_img_s"], out["plain_img_s"]
    return Result(
        name="build_shards", value=value, unit="img/s", reference=plain, ratio=ratio(value, plain),
        shape={"inputs": n, "input_size": [640, 480], "output_size": 256, "format": "jpg q95", "workers": 2},
        config={**env, "details": out,
                "reference_is": "a plain one-process Pillow loop (same images, same output)",
                "note": "value: our whole pipeline with 2 worker processes; details hold 1 worker and CPU times "
                        "per image (compare those on a loaded machine); targets there: one worker ≥ 0.8× plain, "
                        "two ≥ 1.7× one"})


def _photo_shards(folder: Path, n: int, size: int) -> None:
    """n photo-like JPEGs of size² (q95, as build-shards writes them) with captions, in one train shard."""
    from dallecli.data.shards import PARTIAL, ShardWriter

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    writer = ShardWriter(folder, "train")
    for i in range(n):
        a, b, c = rng.uniform(0.01, 0.05, 3)
        base = np.stack([np.sin(xx * a + i), np.cos(yy * b - i), np.sin((xx + yy) * c)], -1)
        img = (127.5 + 100 * base + rng.normal(0, 12, (size, size, 3))).clip(0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "JPEG", quality=95)
        writer.add(f"{i:06d}", {"jpg": buf.getvalue(), "txt": f"a synthetic photo number {i}".encode()})
    _, partial = writer.finish()
    partial.rename(partial.with_name(partial.name.removesuffix(PARTIAL)))


def read_shards(n: int = N_READ, batch: int = 16) -> Result:
    from dallecli.data.loader import ShardIndex, make_loader
    from dallecli.imageutil import to_tensor
    from dallecli.models.dvae import PRESETS
    from dallecli.train.dvae_task import DVAETask, schedule_for

    env = environment()
    with tempfile.TemporaryDirectory(prefix="bench-read-shards-") as tmp:
        folder = Path(tmp)
        _photo_shards(folder, n, STORED)
        task = DVAETask(config=replace(PRESETS["paper"], image_size=SIZE), shards=folder, schedule=schedule_for(1),
                        batch_size=batch, seed=0, workers=0)
        index = ShardIndex(folder, "train")
        batches = n // batch

        def ours():
            it = iter(make_loader(index, task.decode, torch.stack, batch_size=batch, seed=0, workers=0))
            for _ in range(batches):
                b = next(it)
                assert b.data.shape == (batch, 3, SIZE, SIZE), b.data.shape
            del it

        def plain():
            for i in range(batches * batch):
                _, members = index.read(i)
                with Image.open(io.BytesIO(members["jpg"])) as im:
                    to_tensor(im.convert("RGB"))

        with threads(1):  # one core, as in a DataLoader worker (which sets torch's threads to 1)
            ref_times = measure(plain, warmup=1, reps=3, budget_s=20)
            times = measure(ours, warmup=1, reps=3, budget_s=20)
    value, reference = batches * batch / median(times), batches * batch / median(ref_times)
    return Result(
        name="read_shards", value=value, unit="img/s", reference=reference, ratio=ratio(value, reference),
        shape={"images": batches * batch, "stored": STORED, "output": SIZE, "batch": batch, "workers": 0},
        config={**env, "per": "core (one process, workers=0, torch threads 1 as in a loader worker)", "s_all": times, "reference_s_all": ref_times,
                "best_ratio": min(ref_times) / min(times),
                "augmentation": "App. A.2 via DVAETask.decode (imageutil.dvae_augment): crop, area-resize, crop, flip",
                "reference_is": "a bare loop: read the member, Pillow decode, to_tensor (no augmentation, no loader)"})


BENCHMARKS = {
    "build_shards": build_shards,
    "read_shards": read_shards,
}
