"""Evaluation (§3.1): `dalle eval` on given samples, seconds per 1,000 images.

A run folder with N val references (64 px JPEGs in shards) and N given samples (64 px PNGs, one per prompt),
evaluated by `evaluate()` with the default feature network (the FID Inception at 299 px: random weights saved
to a file and passed as --inception-weights; the cost does not depend on the weights), the run's CLIP
(`dalle-tiny`, random) for CLIP scores, one blur radius (0), no reconstruction metrics, no reference cache
(a fresh run folder each time). Each image costs two Inception forwards (the sample and its reference); each
comparison adds a fixed cost (FID's matrix square root on 2048² covariances, KID, IS). A full 1,000-image
run takes too long for this suite, so evaluate() runs once at N = 8 and once at N = 24 and the time is
extrapolated as fixed + N · per-image (both stated). value = 1000 / (seconds per 1,000 images).
Reference: the bare Inception forward at batch 32, two forwards per evaluated image.
"""
from __future__ import annotations

import io
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.common import Result, environment, measure, median, ratio, silent

SIZES, SIDE, BATCH = (8, 24), 64, 32


def _val_shards(folder: Path, n: int, side: int, captions: list[str]) -> None:
    from dallecli.data.shards import PARTIAL, ShardWriter

    rng = np.random.default_rng(1)
    folder.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(folder, "val")
    for i in range(n):
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(small).resize((side, side), Image.BICUBIC).save(buf, "JPEG", quality=95)
        writer.add(f"{i:06d}", {"jpg": buf.getvalue(), "txt": captions[i].encode()})
    _, partial = writer.finish()
    partial.rename(partial.with_name(partial.name.removesuffix(PARTIAL)))


def evaluation() -> Result:
    from benchmarks.bench_rerank import save_random_clip, write_samples
    from dallecli.evaluate.features import fid_inception
    from dallecli.evaluate.run import EvalConfig, evaluate

    env = environment()
    with silent():
        with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp:
            tmp = Path(tmp)
            torch.manual_seed(0)
            net = fid_inception()
            weights = tmp / "inception.pth"
            torch.save(net.state_dict(), weights)
            captions = [f"a {('red', 'green', 'blue', 'yellow')[i % 4]} shape number {i}" for i in range(max(SIZES))]

            def run(n: int) -> float:
                root = tmp / f"run{n}"
                samples = write_samples(root / "samples", prompts=n, per_prompt=1, side=SIDE)
                _val_shards(root / "shards", n, SIDE, captions)
                save_random_clip(root)
                cfg = EvalConfig(name="bench", count=n, samples=samples, blur=(0,), features="inception",
                                 inception_weights=weights, reconstruction=False, batch_size=BATCH)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    t0 = time.perf_counter()
                    evaluate(root, cfg)
                    return time.perf_counter() - t0

            x = torch.rand(BATCH, 3, SIDE, SIDE)
            with torch.no_grad():
                ref_times = measure(lambda: net(x), warmup=1, reps=2, budget_s=20)
            import torchmetrics.image  # noqa: F401  (the first evaluate() should not pay for imports)
            t_small, t_large = (run(n) for n in SIZES)
    per_image = (t_large - t_small) / (SIZES[1] - SIZES[0])  # marginal seconds per sample (+ its reference)
    fixed = max(t_small - per_image * SIZES[0], 0.0)
    s_1000 = fixed + 1000 * per_image
    value = 1000 / s_1000
    reference = BATCH / median(ref_times) / 2  # two Inception forwards per evaluated image
    return Result(
        name="eval", value=value, unit="img/s", reference=reference, ratio=ratio(value, reference),
        shape={"samples": "1000 (extrapolated)", "references": "as many", "side": SIDE, "blur": [0],
               "features": "inception (299 px)", "batch": BATCH},
        config={**env, "s_per_1000_images": s_1000, "measured": f"evaluate() once at N = {SIZES[0]} and {SIZES[1]} "
                f"({t_small:.3g} s, {t_large:.3g} s); s(N) = fixed + N · per_image, extrapolated to N = 1000",
                "fixed_s": fixed, "per_image_s": per_image, "weights": "random Inception and CLIP (cost is the same)",
                "clip": "dalle-tiny", "reference_is": "the bare Inception forward, two per evaluated image "
                "(sample + reference)", "note": "one blur radius; each further radius costs another FID "
                "(the fixed part) and another feature pass over the samples"})


BENCHMARKS = {"eval": evaluation}
