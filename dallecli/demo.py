"""`dalle demo`: the whole pipeline on built-in data, in minutes, resumable stage by stage.

build-shards → tokenize → train-dvae → encode → train-prior → train-clip → sample (reranked) → eval.
Each stage is the same command a user would type, called with the tiny presets; the step counts are
sized for about ten minutes on two CPU cores and scale with `--minutes`. A finished stage is recorded in
RUN/demo.json and skipped when the demo is run again.
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from dallecli.config import read_json, write_json_atomic
from dallecli.console import UserError, err, info, out, settings, summary

# Captions the emoji gallery draws: some from the data, some new combinations (§3.2's zero-shot claim).
EMOJI_PROMPTS = ["red apple", "avocado", "grinning face", "cat face", "rocket", "sun with face",
                 "an armchair shaped like an avocado", "a cat face with sunglasses"]
SHAPES_PROMPTS = ["a red circle", "a small blue square", "a large green triangle", "a yellow cross",
                  "a red square above a blue circle", "a green cross to the left of a purple triangle",
                  "a red triangle", "a yellow circle"]  # the last two are held-out pairs: zero-shot


NEXT_PROMPT = {"emoji": "a smiling cat face with heart eyes", "shapes": "a blue circle above a red square"}


@dataclass(frozen=True)
class Budget:
    """Step counts for one demo, scaled from the ten-minute plan (two CPU cores)."""

    dvae_steps: int
    prior_steps: int
    clip_steps: int
    shapes_count: int

    @classmethod
    def for_minutes(cls, minutes: float) -> "Budget":
        s = minutes / 10.0
        return cls(dvae_steps=max(20, round(DVAE_STEPS_10MIN * s)), prior_steps=max(20, round(PRIOR_STEPS_10MIN * s)),
                   clip_steps=max(10, round(CLIP_STEPS_10MIN * s)), shapes_count=max(400, round(20_000 * min(1.0, s))))


DEMO_GUIDANCE = 2.0  # classifier-free guidance for the gallery and the evaluation (the prior drops 10% of captions)
DEMO_RERANK = 8  # the evaluation's headline: the best of 8 candidates by the run's CLIP (§2.6)
DEMO_EVAL_COUNT = 100  # val captions the evaluation draws for; fewer where the val split is smaller (emoji: ~80)

# The ten-minute plan, measured on two idle CPU cores: 2/3 of the commands' default step counts, so that
# `--minutes 15` trains exactly what `dalle train-dvae`, `train-prior` and `train-clip` do by default.
DVAE_STEPS_10MIN = 1333   # tiny-vq, ~2.7 min (default 2,000)
PRIOR_STEPS_10MIN = 1467  # small, bf16, ~4.9 min (default 2,200)
CLIP_STEPS_10MIN = 333    # dalle-tiny, ~1.5 min (default 500)


def _stages(data: str, run: Path, budget: Budget, device_flags: dict,
            font: Path | None = None) -> list[tuple[str, float, Callable[[], None]]]:
    """(name, share of the time budget, action)."""
    from dallecli.commands import (build_shards, encode, eval as eval_cmd, sample, tokenize, train_clip, train_dvae,
                                   train_prior)

    quiet = settings.quiet
    prompts = EMOJI_PROMPTS if data == "emoji" else SHAPES_PROMPTS
    dvae_preset = "tiny-vq"
    return [
        ("build-shards", 0.02, lambda: build_shards.command(
            source=build_shards.SourceKind(data), run=run, count=budget.shapes_count, font=font, quiet=quiet)),
        ("tokenize", 0.01, lambda: tokenize.command(run=run, vocab_size=16384, quiet=quiet)),
        ("train-dvae", 0.27, lambda: train_dvae.command(run=run, preset=dvae_preset, steps=budget.dvae_steps,
                                                        eval_every=max(1, budget.dvae_steps // 3), quiet=quiet,
                                                        **device_flags)),
        ("encode", 0.02, lambda: encode.command(run=run, quiet=quiet, **device_flags)),
        ("train-prior", 0.48, lambda: train_prior.command(
            run=run, preset="small", steps=budget.prior_steps, schedule=train_prior.Schedule.cosine,
            eval_every=max(1, budget.prior_steps // 4), quiet=quiet, **device_flags)),
        ("train-clip", 0.15, lambda: train_clip.command(run=run, steps=budget.clip_steps, quiet=quiet, **device_flags)),
        ("sample", 0.05, lambda: sample.command(prompts=prompts, run=run, n=8, rerank=2, name="demo", guidance=DEMO_GUIDANCE,
                                                overwrite=True, quiet=quiet, **device_flags)),
        ("eval", 0.05, lambda: _evaluate(data, run, quiet, eval_cmd, device_flags)),
    ]


def _evaluate(data: str, run: Path, quiet: bool, eval_cmd, device_flags: dict) -> None:
    # All of a small val split, without a warning that it is smaller than the count asked for.
    val = read_json(run / "shards" / "manifest.json", "shard manifest").get("counts", {}).get("val")
    count = min(DEMO_EVAL_COUNT, val) if isinstance(val, int) and val >= 2 else DEMO_EVAL_COUNT
    if data == "shapes":
        # The composition table, with and without reranking (best of 4 by the run's CLIP vs the first draw).
        eval_cmd.command(run=run, name="demo", overwrite=True, count=count, features="clip", composition_count=100,
                         rerank=DEMO_RERANK, rerank_sizes=f"1,{DEMO_RERANK}", guidance=DEMO_GUIDANCE, quiet=quiet,
                         **device_flags)
    else:
        eval_cmd.command(run=run, name="demo", overwrite=True, count=count, features="clip", guidance=DEMO_GUIDANCE,
                         quiet=quiet, **device_flags)
    gallery_clip_check(run)


def gallery_clip_check(run: Path) -> dict:
    """CLIP score of the gallery's reranked samples against their own captions vs shuffled ones."""
    from PIL import Image

    from dallecli.models.clip import load_clip

    folder = run / "samples" / "demo"
    rows = [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines() if line.strip()]
    kept = [r for r in rows if r.get("kept", True)]
    images = [Image.open(folder / r["image"]).convert("RGB") for r in kept]
    captions = [r["prompt"] for r in kept]
    shuffled = captions[:]
    rng = random.Random(0)
    while len(set(captions)) > 1 and any(a == b for a, b in zip(shuffled, captions)):
        rng.shuffle(shuffled)
    scorer = load_clip(None, run, "cpu")
    own = scorer.score(images, captions).clamp(min=0).mean().item() * 100
    other = scorer.score(images, shuffled).clamp(min=0).mean().item() * 100
    result = {"clip_score_own_captions": own, "clip_score_shuffled_captions": other}
    write_json_atomic(run / "eval" / "demo" / "clip_own_vs_shuffled.json", result)
    return result


def run_demo(data: str, minutes: float, run: Path, fresh: bool = False, cpu: bool = False,
             font: Path | None = None) -> dict:
    if data not in ("emoji", "shapes"):
        raise UserError(f"--data must be emoji or shapes (got {data})")
    if not (math.isfinite(minutes) and minutes > 0):
        raise UserError(f"--minutes must be a positive number (got {minutes})")
    if run.exists() and not run.is_dir():
        raise UserError(f"--run {run} is a file, not a folder; give a folder for the demo run")
    state_path = run / "demo.json"
    if fresh and run.is_dir() and any(run.iterdir()) and not state_path.is_file():
        # --fresh deletes the folder: only one the demo made (a trained run of your own must never go)
        raise UserError(f"--fresh would delete {run}, which is not a demo run (it has no demo.json); pick "
                        "another --run for the demo, or delete that folder yourself")
    state = read_json(state_path, "demo state") if state_path.exists() and not fresh else {}
    if not isinstance(state, dict) or not isinstance(state.get("done", {}), dict):
        raise UserError(f"{state_path} is not a demo state file; rerun with --fresh to start the demo over")
    args = {"data": data, "minutes": minutes}
    if state and state.get("args") != args:
        was = state.get("args")
        was = ", ".join(f"--{k} {v}" for k, v in was.items()) if isinstance(was, dict) else repr(was)
        raise UserError(f"{run} holds a demo run made with {was}; use another --run, the same options, or --fresh "
                        "to start over")
    if fresh and run.exists():
        import shutil

        shutil.rmtree(run)
    run.mkdir(parents=True, exist_ok=True)
    if not state_path.exists() and any(run.iterdir()):
        raise UserError(f"{run} already holds files and is not a demo run (it has no demo.json); pick another "
                        "--run for the demo")
    state = {"args": args, "done": state.get("done", {})}
    write_json_atomic(state_path, state)  # at once: from here on the folder is a demo run (and --fresh may go)
    budget = Budget.for_minutes(minutes)
    stages = _stages(data, run, budget, {"cpu": cpu} if cpu else {}, font)
    pace = _expected_pace(cpu)
    if pace > 1 and len(state["done"]) < len(stages):
        info(f"this CPU has no native bf16 arithmetic (AVX512-BF16 or AMX), so the models train in fp32, about "
             f"{pace:g}× slower than the {minutes:g}-minute plan: expect about {pace * minutes:.0f} minutes")
    started = time.perf_counter()
    for i, (name, share, action) in enumerate(stages, 1):
        if name in state["done"]:
            info(f"[{i}/{len(stages)}] {name}: done earlier ({state['done'][name]:.0f} s), skipped")
            continue
        left = _minutes_left(stages, state["done"], minutes, pace)
        header = f"stage {i} of {len(stages)}: {name}  ·  about {left:.1f} min left"
        if err.is_terminal:
            err.rule(f"[bold]{header}[/]")
        else:  # a log file: one line, not a rule as wide as the (unbounded) log's width
            info(f"── {header} ──")
        t0 = time.perf_counter()
        action()
        state["done"][name] = time.perf_counter() - t0
        write_json_atomic(state_path, state)
    state["seconds"] = time.perf_counter() - started
    write_json_atomic(state_path, state)
    return _final_summary(run, data, state)


# The demo's step counts were sized on a CPU with native bf16 (AVX512-BF16); in fp32 on one without, the
# whole demo took 1.9× its plan (18.7 minutes for the 10-minute plan, on a 2-core Intel Xeon VM).
FP32_CPU_PACE = 2.0


def _expected_pace(cpu: bool) -> float:
    """How much slower than the plan this machine is expected to run, before any stage has shown it."""
    import torch

    from dallecli.hardware import default_precision

    on_gpu = torch.cuda.is_available() and not cpu
    return FP32_CPU_PACE if default_precision(on_gpu) == "fp32" else 1.0


def _minutes_left(stages: list[tuple[str, float, Callable]], done: dict[str, float], minutes: float,
                  expected_pace: float = 1.0) -> float:
    """The budget's share of the stages not done, at the pace of those done: on a machine slower than the
    one the budget was sized on (or a busy one), the estimate grows once a finished training stage shows it.
    Until then the `expected_pace` (`FP32_CPU_PACE` on a CPU without native bf16). Never below the budget:
    the small first stages finish well within their shares on any machine."""
    total = sum(share for _, share, _ in stages)
    planned = {name: share / total * minutes * 60 for name, share, _ in stages}
    finished = [name for name in planned if name in done]
    pace = expected_pace
    if sum(planned[n] for n in finished) >= 0.2 * minutes * 60:  # a training stage is among them
        pace = max(1.0, sum(done[n] for n in finished) / sum(planned[n] for n in finished))
    return sum(planned[n] for n in planned if n not in done) * pace / 60


def _final_summary(run: Path, data: str, state: dict) -> dict:
    gallery = run / "samples" / "demo" / "index.html"
    metrics_path = run / "eval" / "demo" / "metrics.json"
    metrics = read_json(metrics_path, "metrics") if metrics_path.exists() else {}
    rows: dict[str, object] = {"gallery": gallery, "grid": run / "samples" / "demo" / "grid.png",
                               "metrics": metrics_path}
    if metrics.get("composition"):
        for k, v in metrics["composition"].items():
            if isinstance(v, (int, float)):
                rows[f"composition {k}"] = f"{100 * v:.1f}%"
    clip_check = run / "eval" / "demo" / "clip_own_vs_shuffled.json"
    if clip_check.exists():
        c = read_json(clip_check)
        rows["CLIP score, own captions"] = f"{c['clip_score_own_captions']:.2f}"
        rows["CLIP score, shuffled captions"] = f"{c['clip_score_shuffled_captions']:.2f}"
    rows["time"] = f"{sum(state['done'].values()) / 60:.1f} min"
    summary(f"dalle demo ({data}): done", rows)
    out.print("\nNext, try:\n"
              f'  dalle sample "{NEXT_PROMPT[data]}" --run {run} --n 8 --rerank 2\n'
              f"  dalle eval --run {run} --features clip\n"
              f"  dalle train-prior --run {run} --steps 3000   # train longer: continues where it stopped",
              soft_wrap=True)  # whole lines to copy, also in a log file (rich wraps at 80 columns off a terminal)
    return rows
