"""How fast `dalle build-shards` turns photos into shards, against the plain Pillow loop it wraps.

`run(n)` writes n photo-like JPEGs of 640×480 (+ captions) to a temporary folder, then measures:
  plain      a single-process loop: open → RGB → centre crop + Lanczos resize to 256² → JPEG q95 in memory
  workers_1  our whole pipeline (listing, captions, filters, decode/resize/encode, tar writing, manifest)
  workers_2  the same with two worker processes
Targets: workers_1 ≥ 80% of plain (the bookkeeping costs little per core); workers_2 ≥ 1.7× workers_1.
Wall-clock rates depend on whatever else runs on the machine, so CPU time per image is reported too
(this process and its worker processes): on a shared machine, compare those. `two_workers_ideal` is the
speed-up that CPU time allows on two otherwise idle cores: one worker's CPU per image over half of the
CPU per image that the two-worker run spends in all its processes (main included).

    python -m benchmarks.bench_build_shards [n]
"""
from __future__ import annotations

import io
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def make_photos(folder: Path, n: int, size: tuple[int, int] = (640, 480), seed: int = 0) -> None:
    """Smooth gradients with texture and noise: compresses like a photo (~60–90 KB at q90), unlike pure noise."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for i in range(n):
        a, b, c = rng.uniform(0.005, 0.03, 3)
        base = np.stack([np.sin(xx * a + i), np.cos(yy * b - i), np.sin((xx + yy) * c)], -1)
        img = (127.5 + 100 * base + rng.normal(0, 12, (h, w, 3))).clip(0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"photo{i:05d}.jpg", quality=90)
        (folder / f"photo{i:05d}.txt").write_text(f"a synthetic photo number {i} with soft colour bands")


def plain_loop(files: list[Path], size: int = 256) -> float:
    """img/s of the simplest correct loop, one process."""
    t0 = time.perf_counter()
    for path in files:
        img = Image.open(path).convert("RGB")
        w, h = img.size
        s = min(w, h)
        box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
        out = img.resize((size, size), Image.Resampling.LANCZOS, box=box)
        buf = io.BytesIO()
        out.save(buf, "JPEG", quality=95)
    return len(files) / (time.perf_counter() - t0)


def pipeline(src: Path, out: Path, workers: int) -> float:
    from dallecli.console import settings
    from dallecli.data.images import ImageConfig
    from dallecli.data.shards import BuildConfig, build
    from dallecli.data.sources import PrepareConfig, SourceSpec

    config = BuildConfig(source=SourceSpec(kind="folder", path=str(src)),
                         prepare=PrepareConfig(image=ImageConfig(size=256, format="jpg", quality=95)))
    quiet, settings.quiet = settings.quiet, True
    try:
        t0 = time.perf_counter()
        manifest = build(config, out, workers=workers, overwrite=True)
        elapsed = time.perf_counter() - t0
    finally:
        settings.quiet = quiet
    return manifest["counts"]["inputs"] / elapsed


def _cpu() -> tuple[float, float]:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime


def _timed(fn, *args) -> tuple[float, float, float]:
    """(img/s, ms of main-process CPU per image, ms of worker CPU per image) — per image of n."""
    (m0, k0) = _cpu()
    rate = fn(*args)
    (m1, k1) = _cpu()
    return rate, m1 - m0, k1 - k0


def run(n: int = 2000) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-build-shards-") as tmp:
        src = Path(tmp) / "photos"
        src.mkdir()
        make_photos(src, n)
        files = sorted(src.glob("*.jpg"))
        plain_loop(files[:50])                       # warm the page cache and Pillow
        plain, plain_cpu, _ = _timed(plain_loop, files)
        one, one_cpu, _ = _timed(pipeline, src, Path(tmp) / "w1", 1)
        two, two_main, two_workers = _timed(pipeline, src, Path(tmp) / "w2", 2)
    ms = 1000.0 / n
    return {
        "n": n,
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "plain_img_s": round(plain, 1),
        "workers_1_img_s": round(one, 1),
        "workers_2_img_s": round(two, 1),
        "per_core_vs_plain": round(one / plain, 3),        # target ≥ 0.8
        "two_vs_one_worker": round(two / one, 3),         # target ≥ 1.7
        "cpu_ms_per_img": {"plain": round(plain_cpu * ms, 2), "workers_1": round(one_cpu * ms, 2),
                           "workers_2_main": round(two_main * ms, 2), "workers_2_workers": round(two_workers * ms, 2)},
        "per_core_vs_plain_cpu": round(plain_cpu / one_cpu, 3),
        "two_workers_ideal": round(one_cpu / ((two_main + two_workers) / 2), 3),
    }


if __name__ == "__main__":
    print(json.dumps(run(int(sys.argv[1]) if len(sys.argv) > 1 else 2000), indent=2))
