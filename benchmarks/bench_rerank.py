"""CLIP reranking (§2.6): `rerank_samples` over a sample folder, images/s.

A folder of 64 px PNG samples (8 candidates for each of 32 prompts) and its samples.jsonl, scored by the
shipped `dalle-tiny` CLIP (random weights, saved as a run's CLIP checkpoint and loaded by `load_clip`: the
cost does not depend on the weights). The whole job is timed: reading samples.jsonl, opening every image,
preprocessing, the image and text towers, ranking, writing the file back. Reference: the same scorer's
`image_features` on the images already in memory (preprocessing + image tower only).
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.common import Result, environment, measure, median, ratio, silent

PROMPTS, PER_PROMPT, SIDE = 32, 8, 64


def save_random_clip(run: Path, name: str = "dalle-tiny") -> None:
    """RUN/clip/step-…: a random-weight CLIP of a shipped architecture, as `dalle train-clip` would save it."""
    from dallecli import checkpoint
    from dallecli.models.clip import architecture, default_preprocess, model_from_config

    cfg = architecture(name)
    torch.manual_seed(0)
    net = model_from_config(cfg)
    checkpoint.save(run / "clip", 1, kind="clip", weights=net.state_dict(),
                    model_config={"name": name, "model_cfg": cfg, "preprocess_cfg": default_preprocess(cfg)})


def write_samples(folder: Path, prompts: int = PROMPTS, per_prompt: int = PER_PROMPT, side: int = SIDE) -> Path:
    """PNG samples (smooth random blobs) and their samples.jsonl, as `dalle sample` writes them."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(prompts):
        for j in range(per_prompt):
            small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            name = f"{i:03d}-{j:03d}.png"
            Image.fromarray(small).resize((side, side), Image.BICUBIC).save(folder / name)
            rows.append({"prompt": f"a {('red', 'green', 'blue', 'yellow')[i % 4]} shape number {i}", "image": name,
                         "seed": i * per_prompt + j, "index": j, "logprob": 0.0, "prompt_index": i})
    path = folder / "samples.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def rerank() -> Result:
    from dallecli.models.clip import load_clip
    from dallecli.rerank import rerank_samples

    env = environment()
    with silent():
        with tempfile.TemporaryDirectory(prefix="bench-rerank-") as tmp:
            run = Path(tmp)
            save_random_clip(run)
            path = write_samples(run / "samples")
            scorer = load_clip(None, run, "cpu")
            images = [Image.open(p).convert("RGB") for p in sorted((run / "samples").glob("*.png"))]
            n = len(images)
            ref_times = measure(lambda: scorer.image_features(images), warmup=1, reps=3, budget_s=15)
            times = measure(lambda: rerank_samples(path, scorer, keep=1), warmup=1, reps=3, budget_s=20)
    value, reference = n / median(times), n / median(ref_times)
    return Result(
        name="rerank", value=value, unit="img/s", reference=reference, ratio=ratio(value, reference),
        shape={"images": n, "prompts": PROMPTS, "per_prompt": PER_PROMPT, "side": SIDE, "clip": "dalle-tiny",
               "clip_batch": scorer.batch_size},
        config={**env, "s_all": times, "reference_s_all": ref_times,
                "best_ratio": min(ref_times) / min(times), "weights": "random (cost is the same)",
                "reference_is": "scorer.image_features on the images in memory (preprocess + image tower)"})


BENCHMARKS = {"rerank": rerank}
