"""GPU checks and timings in one go (H100 / H200): what benchmarks/gpu.sh runs.

    python -m benchmarks.gpu_bench [--out DIR] [--budget-s 400] [--smoke]

Sections, cheapest and most certain first; each one in try/except (a failure is printed and recorded, the
rest still runs), each skipped when the time budget would not let it finish:
  1. ceilings: bf16 (and fp16) GEMM TFLOP/s, 8192³; device-to-device copy bandwidth (read + write bytes / s)
  2. prior training at `base` (d 1024, 24 layers, 16 heads, stream 1280), bf16 autocast, eager
  3. the same in fp16 with per-resblock gradient scaling (train/precision.py ResblockScaler), eager
  4. cached sampling at `base`, batch 1 / 16 / 64 / 256, eager: images/s beside the bandwidth bound
     (the prior held in bf16, as `dalle sample` holds it on a GPU)
  5. dVAE encode at the `paper` preset (256 px → 32×32 × 8192), bf16: img/s, FLOP utilisation
  6. prior training compiled (regional: torch.compile of each transformer block; identical blocks share one
     compiled graph, so it compiles once)
  7. cached sampling compiled, batch 1 / 16 / 64: `generate_codes(compiled=True)`, a fixed-shape decode step
     (dallecli.models.prior.StaticDecoder) compiled with mode="reduce-overhead": one CUDA graph per step
Utilisation figures divide by the GEMM rate of section 1 (the issue's "ceilings"); FLOPs: the prior's
6·N + 12·L·d·T per token (dallecli.models.prior.flops_per_token), the dVAE's by FlopCounterMode.

Sampling bound (written down): one image = a prefill, then 1,023 decode steps. Decode step j (cache length
ℓ = text_len + 1 + j, attending over ℓ + 1 positions) must read every weight once and the whole K/V cache once:
    bytes_j = P · s_w + 2 · L · B · (ℓ + 1) · d · s_kv
with P the parameters a step multiplies by (blocks + image head), s_w = 2 their bytes as stored (bf16),
s_kv = 2 (bf16 cache), L layers, d width, B batch. The bound is
Σ_j bytes_j ÷ the measured copy bandwidth; images/s bound = B ÷ that time (prefill and sampling ignored).

Writes DIR/gpu_results.jsonl (one JSON object per result, the CPU suite's format) as it goes and
DIR/gpu_results.json at the end; prints a table last. `--smoke` runs every section on tiny shapes (on the
CPU when there is no GPU) to check the script itself.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import sys
import time
import traceback
from pathlib import Path

T0 = time.monotonic()
RESULTS: list[dict] = []
ARGS: argparse.Namespace
CEIL: dict[str, float] = {}


# --- bookkeeping ---------------------------------------------------------------------------------------------

def left() -> float:
    return ARGS.budget_s - (time.monotonic() - T0)


def record(name, value, unit, *, reference=None, ratio=None, shape=None, config=None, target=None, met=None):
    row = {"name": name, "value": _round(value), "unit": unit, "reference": _round(reference),
           "ratio": _round(ratio), "shape": shape or {}, "config": {**(config or {}), "target": target,
                                                                      "meets_target": met}}
    RESULTS.append(row)
    with open(ARGS.out / "gpu_results.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    flag = "" if met is None else ("  [target met]" if met else "  [TARGET MISSED]")
    ratio_txt = f"  ratio {ratio:.3g}" if ratio is not None else ""
    print(f"  -> {name}: {value:.4g} {unit}{ratio_txt}{flag}", flush=True)


def failure(name, message):
    RESULTS.append({"name": name, "error": message})
    with open(ARGS.out / "gpu_results.jsonl", "a") as f:
        f.write(json.dumps({"name": name, "error": message}) + "\n")


def section(name: str, need_s: float, fn, *args) -> None:
    """Run one section: skipped if fewer than `need_s` seconds are left; exceptions printed and recorded."""
    if left() < need_s:
        print(f"\n== {name}: SKIPPED ({left():.0f} s left, needs ~{need_s:.0f} s)", flush=True)
        failure(name, f"skipped: {left():.0f} s of the budget left, needs ~{need_s:.0f} s")
        return
    print(f"\n== {name} ({time.monotonic() - T0:.0f} s elapsed)", flush=True)
    t = time.monotonic()
    try:
        fn(*args)
    except Exception as exc:  # noqa: BLE001  (report and go on to the next section)
        lines = traceback.format_exc().strip().splitlines()
        print(f"  FAILED: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
        print("    " + "\n    ".join(lines[-6:]), flush=True)
        failure(name, f"{type(exc).__name__}: {str(exc)[:300]}")
    finally:
        free()
    print(f"   ({time.monotonic() - t:.0f} s)", flush=True)


def compile_stats() -> dict:
    """Dynamo's counts so far: distinct graphs compiled and graph breaks (a recompiling decode shows here)."""
    from torch._dynamo.utils import counters

    return {"unique_graphs": counters["stats"].get("unique_graphs", 0),
            "graph_breaks": sum(counters["graph_break"].values())}


def free() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, *, warmup: int, steps: int, budget_s: float) -> tuple[float, int]:
    """(seconds per call, calls timed): warm-up calls, then up to `steps` calls or `budget_s` seconds."""
    for _ in range(warmup):
        fn()
    sync()
    t0, n = time.perf_counter(), 0
    while n < steps:
        fn()
        n += 1
        if n >= 2 and time.perf_counter() - t0 > budget_s:
            break
    sync()
    return (time.perf_counter() - t0) / n, n


def _round(x):
    if isinstance(x, float):
        return None if not math.isfinite(x) else float(f"{x:.5g}")
    return x


def device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# --- configurations ------------------------------------------------------------------------------------------

def prior_config():
    from dallecli.models.prior import PRESETS

    return PRESETS["tiny"] if ARGS.smoke else PRESETS["base"]


def dvae_config():
    from dallecli.models.dvae import PRESETS

    return PRESETS["tiny"] if ARGS.smoke else PRESETS["paper"]


# --- 0. what the machine has -----------------------------------------------------------------------------------

def preflight() -> None:
    import shutil

    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_memory_gb=round(p.total_memory / 1e9, 1), sm_count=p.multi_processor_count,
                    capability=f"{p.major}.{p.minor}")
    missing = []
    for module in ("numpy", "rich", "triton"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    info["missing_modules"] = missing
    info["c_compiler"] = shutil.which("cc") or shutil.which("gcc")  # triton builds its launcher with it
    try:
        import dallecli  # noqa: F401
        info["dallecli"] = "importable"
    except ImportError as exc:
        info["dallecli"] = f"NOT importable ({exc}): run from the repo root with PYTHONPATH=. or pip install -e ."
    for k, v in info.items():
        print(f"  {k}: {v}")
    if "rich" in missing:
        print("  note: dallecli.console needs rich: sampling and the dVAE sections will fail (pip install rich)")
    if not info["c_compiler"]:
        print("  note: no C compiler: torch.compile (triton) will likely fail; eager sections are unaffected")
    if not torch.cuda.is_available() and not ARGS.smoke:
        raise SystemExit("no CUDA device: this script is for a GPU (use --smoke to check it on the CPU)")
    ARGS.info = info


# --- 1. ceilings ---------------------------------------------------------------------------------------------

def ceilings() -> None:
    import torch

    dev = device()
    n = 1024 if ARGS.smoke else 8192
    for dtype, key in ((torch.bfloat16, "bf16"), (torch.float16, "fp16")):
        a = torch.randn(n, n, device=dev, dtype=dtype)
        b = torch.randn(n, n, device=dev, dtype=dtype)
        seconds, reps = timed(lambda: a @ b, warmup=3, steps=20, budget_s=10)
        CEIL[key] = 2 * n**3 / seconds / 1e12
        record(f"gpu_matmul_{key}", CEIL[key], "TFLOP/s", shape={"m": n, "n": n, "k": n, "dtype": key},
               config={"reps": reps, "flops": "2·n³"})
        del a, b
    numel = (1 << 24) if ARGS.smoke else (1 << 30)  # 2 GiB of bf16 per buffer on the GPU
    x = torch.empty(numel, device=dev, dtype=torch.bfloat16).normal_()
    y = torch.empty_like(x)
    seconds, reps = timed(lambda: y.copy_(x), warmup=3, steps=20, budget_s=10)
    CEIL["copy_gbs"] = 2 * x.numel() * x.element_size() / seconds / 1e9
    record("gpu_copy_bandwidth", CEIL["copy_gbs"], "GB/s", shape={"bytes": x.numel() * x.element_size()},
           config={"reps": reps, "counted": "bytes read + bytes written per second (device to device)"})


def _peak(key: str = "bf16") -> float:
    """The measured GEMM rate in FLOP/s (datasheet-free); nan when section 1 did not run."""
    return CEIL.get(key, float("nan")) * 1e12


# --- 2, 3, 6. prior training -----------------------------------------------------------------------------------

def prior_train(mode: str) -> None:
    """mode: bf16 | fp16-resblock | bf16-compiled."""
    import torch

    from benchmarks.common import fake_batch
    from dallecli.models.prior import PriorTransformer, flops_per_token, num_params, param_groups, prior_loss

    dev, cfg = device(), prior_config()
    batch = 2 if ARGS.smoke else ARGS.train_batch
    torch.backends.cuda.matmul.allow_tf32 = True  # the fp32 heads on tensor cores (as train-prior on a GPU)
    torch.manual_seed(0)
    model = PriorTransformer(cfg).to(dev).train()
    from dallecli.train.schedule import adamw

    optimizer = adamw(param_groups(model, 0.01), lr=1e-4)  # fused, as train/loop.py builds it
    dtype = torch.float16 if mode.startswith("fp16") else torch.bfloat16
    scaler = None
    if mode == "fp16-resblock":
        from dallecli.train.precision import ResblockScaler

        scaler = ResblockScaler()
        scaler.wrap(model)
    if mode.endswith("compiled"):
        for block in model.blocks:
            block.compile()
    text, image = (t.to(dev) for t in fake_batch(cfg, batch))
    skipped = []

    def step():
        with torch.autocast(dev.type, dtype=dtype):
            text_logits, image_logits = model(text, image)
            loss, _ = prior_loss(text_logits, image_logits, text, image, cfg.pad_id)
        loss.backward()
        if scaler is not None:
            finite = scaler.unscale_(model)
            if finite:
                optimizer.step()
            else:
                skipped.append(1)
            scaler.update(finite)
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    t = time.monotonic()
    step()  # the first step (compiles, when compiled)
    sync()
    first_s = time.monotonic() - t
    free()
    seconds, steps = timed(step, warmup=1, steps=2 if ARGS.smoke else 12, budget_s=min(25, max(left() - 60, 5)))
    peak_mem = torch.cuda.max_memory_allocated() / 1e9 if dev.type == "cuda" else None
    tok_s = batch * cfg.seq_len / seconds
    flops = flops_per_token(cfg)
    peak = _peak("fp16" if dtype == torch.float16 else "bf16")
    mfu = tok_s * flops / peak
    target = {"bf16": 0.43, "bf16-compiled": 0.50}.get(mode)
    record(f"gpu_prior_train_base_{mode}", tok_s, "tok/s", reference=peak / 1e12, ratio=mfu,
           shape={"preset": "base", "seq_len": cfg.seq_len, "d_model": cfg.d_model, "n_layers": cfg.n_layers,
                  "n_heads": cfg.n_heads, "batch": batch},
           config={"mode": mode, "params": num_params(model), "s_per_step": seconds, "steps": steps,
                   "first_step_s": first_s, "peak_memory_gb": peak_mem, "flops_per_token": flops,
                   "mfu": mfu, "ratio_is": "MFU: tok/s × (6·N + 12·L·d·T) ÷ the measured GEMM rate",
                   "skipped_nonfinite_steps": len(skipped),
                   "compile": "torch.compile of each block (regional)" if mode.endswith("compiled") else None,
                   **(compile_stats() if mode.endswith("compiled") else {})},
           target=f"MFU ≥ {target:.0%}" if target else None, met=(mfu >= target) if target else None)


# --- 4, 7. sampling ------------------------------------------------------------------------------------------------

def bandwidth_bound_s(cfg, batch: int, n_params_step: int, weight_bytes: int = 2, kv_bytes: int = 2) -> float:
    """Seconds to read the weights and the whole K/V cache once per decode step, over one image (see top)."""
    L, d = cfg.n_layers, cfg.d_model
    steps = cfg.image_len - 1
    first = cfg.text_len + 2  # positions attended by decode step 0: text + BOS + image token 0
    positions = steps * first + steps * (steps - 1) // 2  # Σ_j (first + j)
    total = steps * n_params_step * weight_bytes + 2 * L * batch * d * kv_bytes * positions
    return total / (CEIL.get("copy_gbs", float("nan")) * 1e9)


def sampling(compiled: bool) -> None:
    import torch

    from benchmarks.common import fake_batch
    from dallecli.models.prior import PriorTransformer
    from dallecli.sample import SamplingConfig, generate_codes

    dev, cfg = device(), prior_config()
    torch.manual_seed(0)
    model = PriorTransformer(cfg).to(dev).eval()
    if dev.type == "cuda":
        model = model.to(torch.bfloat16)  # as the sampler holds it on a GPU (sample.load_pipeline)
    n_step = sum(p.numel() for p in model.blocks.parameters()) + model.image_head.weight.numel()
    batches = (1, 2) if ARGS.smoke else ARGS.sample_batches
    if compiled:  # the fixed-shape step reads the whole cache: it is for small batches
        batches = [b for b in batches if b <= 64]
    eager = {r["config"]["batch"]: r["value"] for r in RESULTS
             if "error" not in r and r["name"].startswith("gpu_sample_eager_")}
    sampling_cfg = SamplingConfig()
    for batch in batches:
        need = 40 if batch <= 64 else 60
        if left() < need:
            print(f"  batch {batch}: skipped ({left():.0f} s left)")
            failure(f"gpu_sample_{'compiled' if compiled else 'eager'}_b{batch}", "skipped: out of time")
            continue
        try:
            text = fake_batch(cfg, batch, seed=1)[0].to(dev)
            seeds = list(range(batch))
            # Warm-up (and compile): the last few tokens only, through an image prompt.
            prompt = torch.randint(0, cfg.image_vocab, (batch, cfg.image_len - 4), device=dev)
            t = time.monotonic()
            generate_codes(model, text, seeds, sampling_cfg, prompt=prompt, compiled=compiled)
            sync()
            warm_s = time.monotonic() - t
            t = time.perf_counter()
            generate_codes(model, text, seeds, sampling_cfg, compiled=compiled)
            sync()
            seconds = time.perf_counter() - t
        except torch.OutOfMemoryError as exc:
            print(f"  batch {batch}: out of memory ({str(exc)[:120]})")
            failure(f"gpu_sample_b{batch}", "out of memory")
            free()
            continue
        img_s = batch / seconds
        bound = batch / bandwidth_bound_s(cfg, batch, n_step)
        name = f"gpu_sample_{'compiled' if compiled else 'eager'}_b{batch}"
        config = {"batch": batch, "s_per_batch": seconds, "warmup_s": warm_s, "bound_img_s": bound,
                  "ratio_is": "images/s ÷ the bandwidth bound (weights + K/V, bf16, read once per step)",
                  "weights": str(next(model.parameters()).dtype),
                  "tok_s": batch * cfg.image_len / seconds,
                  "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9 if dev.type == "cuda" else None}
        target, met = None, None
        if compiled:
            config.update(compile_stats())
        if compiled and batch in eager:
            config["speedup_vs_eager"] = img_s / eager[batch]
            if batch <= 16:
                target, met = "≥ 2× eager", config["speedup_vs_eager"] >= 2
        if batch >= 64:
            target = (target + "; " if target else "") + "≥ 50% of the bandwidth bound"
            met = (met is not False) and img_s / bound >= 0.5
        record(name, img_s, "img/s", reference=bound, ratio=img_s / bound,
               shape={"preset": "base", "image_tokens": cfg.image_len, "batch": batch},
               config=config, target=target, met=met)
        del text
        free()


# --- 5. dVAE encode -----------------------------------------------------------------------------------------------

def dvae_encode() -> None:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from dallecli.models.dvae import DVAE

    dev, cfg = device(), dvae_config()
    batch = 4 if ARGS.smoke else ARGS.encode_batch
    torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN time its convolution algorithms (as encode)
    torch.manual_seed(0)
    model = DVAE(cfg).to(dev).eval()
    x = torch.rand(batch, 3, cfg.image_size, cfg.image_size, device=dev)

    def encode():
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            return model.encode(x)

    with FlopCounterMode(display=False) as counter:
        encode()
    flops = counter.get_total_flops()
    for layout in ("contiguous", "channels_last", "channels_last_compiled"):
        if layout == "channels_last":
            model = model.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        if layout.endswith("compiled"):  # fuses the ReLUs and pools around the convolutions
            if left() < 60:
                failure(f"gpu_dvae_encode_paper_{layout}", "skipped: out of time")
                continue
            compiled = torch.compile(model.encode)

            def encode():
                with torch.autocast(dev.type, dtype=torch.bfloat16):
                    return compiled(x)
        try:
            seconds, reps = timed(encode, warmup=2, steps=3 if ARGS.smoke else 20, budget_s=15)
        except Exception as exc:  # noqa: BLE001  (the compiled variant may fail where eager works)
            failure(f"gpu_dvae_encode_paper_{layout}", f"{type(exc).__name__}: {str(exc)[:200]}")
            continue
        util = flops / seconds / _peak()
        record(f"gpu_dvae_encode_paper_{layout}", batch / seconds, "img/s", reference=_peak() / 1e12, ratio=util,
               shape={"preset": "paper", "image_size": cfg.image_size, "grid": cfg.grid, "batch": batch},
               config={"flops_per_image": flops / batch, "flop_count": "FlopCounterMode", "utilisation": util,
                       "ratio_is": "FLOP/s ÷ the measured bf16 GEMM rate", "reps": reps, "precision": "bf16 autocast"},
               target="≥ 30% of the GEMM rate", met=util >= 0.30)


# --- the table --------------------------------------------------------------------------------------------------

def table() -> None:
    print("\n" + "=" * 100)
    print(f"GPU benchmarks: {ARGS.info.get('gpu', 'no GPU')}, torch {ARGS.info.get('torch')}, "
          f"{time.monotonic() - T0:.0f} s")
    print(f"{'name':<40} {'value':>12} {'unit':<9} {'ratio':>8}  target")
    for r in RESULTS:
        if "error" in r:
            print(f"{r['name']:<40} {'—':>12} {'':<9} {'':>8}  {r['error'][:60]}")
            continue
        c = r["config"]
        ratio = f"{r['ratio']:.3g}" if r["ratio"] is not None else ""
        target = c.get("target") or ""
        if c.get("meets_target") is not None:
            target += "  met" if c["meets_target"] else "  MISSED"
        extra = f"  (×{c['speedup_vs_eager']:.2f} eager)" if c.get("speedup_vs_eager") else ""
        print(f"{r['name']:<40} {r['value']:>12.4g} {r['unit']:<9} {ratio:>8}  {target}{extra}")
    print("ratio: MFU / utilisation for training and encode (÷ measured GEMM rate), fraction of the bandwidth "
          "bound for sampling")
    print(f"results: {ARGS.out / 'gpu_results.json'}")


def main(argv=None) -> int:
    global ARGS
    parser = argparse.ArgumentParser(description="GPU benchmarks (see benchmarks/gpu_bench.py)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu-results"))
    parser.add_argument("--budget-s", type=float, default=400.0, help="stop starting sections after this")
    parser.add_argument("--train-batch", type=int, default=16)
    parser.add_argument("--encode-batch", type=int, default=64)
    parser.add_argument("--sample-batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16, 64, 256])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, CPU allowed: checks the script")
    parser.add_argument("--skip", default="", help="comma-separated section numbers to skip, e.g. 6,7")
    ARGS = parser.parse_args(argv)
    ARGS.out.mkdir(parents=True, exist_ok=True)
    (ARGS.out / "gpu_results.jsonl").write_text("")
    ARGS.info = {}
    import torch._dynamo

    for knob in ("cache_size_limit", "recompile_limit"):  # 24 blocks × shapes must not hit the default of 8
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 64)
    skip = {s.strip() for s in ARGS.skip.split(",") if s.strip()}
    plan = [
        ("1", "ceilings: GEMM rate and copy bandwidth", 20, ceilings, ()),
        ("2", "prior training, base, bf16 eager", 45, prior_train, ("bf16",)),
        ("3", "prior training, base, fp16 + per-resblock scaling, eager", 45, prior_train, ("fp16-resblock",)),
        ("4", "sampling, base, eager", 60, sampling, (False,)),
        ("5", "dVAE encode, paper preset, bf16", 30, dvae_encode, ()),
        ("6", "prior training, base, bf16 compiled", 100, prior_train, ("bf16-compiled",)),
        ("7", "sampling, base, compiled", 100, sampling, (True,)),
    ]
    try:
        preflight()
        for number, title, need, fn, args in plan:
            if number in skip:
                continue
            section(f"{number}. {title}", need, fn, *args)
    except KeyboardInterrupt:  # gpu.sh's timeout sends SIGINT: keep what we have and print it
        print("\ninterrupted (time limit): printing what was measured", flush=True)
        failure("interrupted", "the time limit stopped the run")
    finally:
        with contextlib.suppress(Exception):
            (ARGS.out / "gpu_results.json").write_text(json.dumps({"machine": ARGS.info, "results": RESULTS},
                                                                  indent=1))
        table()
    return 0 if all("error" not in r for r in RESULTS) else 1


if __name__ == "__main__":
    sys.exit(main())
