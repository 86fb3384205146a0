"""`dalle eval`: generate (or read) samples for val captions and measure them (§3.1).

1. References: the first `count` readable val images of the run's shards and their captions.
2. Samples: `sample_to_folder` on those captions (or `--captions FILE`), or a given samples.jsonl. With
   `rerank_sizes`, each prompt gets max(sizes) candidates; the best of the first k by CLIP score is the
   sample at rerank size k (Fig. 9c). In the shapes world, captions of test-seen and test-zeroshot renders
   are generated too, for the composition table.
3. For each blur radius r (both sets blurred alike): FID, IS, KID (fid.py) from features of one network
   (features.py); the real set's features are cached under RUN/eval/cache/.
4. CLIP score of samples and of the real images; composition accuracy (shapes world); the dVAE's
   reconstruction PSNR, rFID and codebook usage.
Every number is written with its protocol (report.py): FIDs compare only under the same protocol.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch

from dallecli.config import RunDir, read_utf8
from dallecli.console import UserError, info, warn
from dallecli.evaluate import clip_score as cs
from dallecli.evaluate import features as nets
from dallecli.evaluate import fid as F_
from dallecli.evaluate.fid import ImageRef, ImageSet
from dallecli.evaluate.inputs import (Candidate, References, mark_selected, read_references, read_samples,
                                      select, shapes_world)

CATEGORIES = ("seen_single", "zeroshot_single", "relation_seen", "relation_zeroshot")
DEFAULT_COUNT = 1000  # §3.1 uses 30,000 MS-COCO captions; 1,000 keeps a small run's eval short
# Fewer images than this in either set: one warning that FID / KID are noisy and biased upward. 50, not 100:
# `dalle demo` compares its ~80 emoji val images (100 shapes) in a normal run, which should stay quiet.
FEW_IMAGES = 50


@dataclass(frozen=True)
class EvalConfig:
    name: str | None = None             # RUN/eval/NAME; None: the date and time
    count: int | None = None            # captions and val images; None: DEFAULT_COUNT
    captions: Path | None = None        # prompts from a file (one per line) instead of the val captions
    samples: Path | None = None         # evaluate these samples instead of generating
    composition_samples: Path | None = None  # shapes world: samples of the test-split captions
    blur: tuple[float, ...] = (0, 1, 2, 4, 8)  # §3.1: Gaussian blur radii applied to both sets
    features: str = "inception"         # inception | clip | FILE.pt (TorchScript)
    inception_weights: Path | None = None
    clip: str | None = None             # load_clip spec for CLIP score (and reranking); None: the run's
    rerank: int | None = None           # the headline metrics use the best of the first k candidates
    rerank_sizes: tuple[int, ...] = ()  # Fig. 9c: metrics against the number of candidates reranked
    composition_count: int = 200        # shapes world: captions rendered per test split
    size: int | None = None             # comparison side; None: the smaller of the samples' and references'
    batch_size: int = 32
    workers: int = 0                    # image decoding + blur processes per GPU process
    seed: int = 0
    max_missing: float = 0.05           # stop when more of the listed sample images than this are missing
    shards: Path | None = None
    prior: Path | None = None
    dvae: Path | None = None
    reconstruction: bool = True
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    guidance: float = 1.0

    def validate(self) -> None:
        if self.name is not None and (self.name in ("", "cache") or self.name.startswith(".") or "/" in self.name
                                      or "\\" in self.name):
            raise UserError(f"--name {self.name!r} is not usable: give a plain folder name for RUN/eval/NAME, not "
                            "'cache' (RUN/eval/cache keeps the reference features), no '/' and no leading '.'")
        if self.count is not None and self.count < 2:
            raise UserError(f"--count must be at least 2 (FID compares two Gaussians), got {self.count}")
        if not self.blur or any(r < 0 or not math.isfinite(r) for r in self.blur) or len(set(self.blur)) != len(self.blur):
            raise UserError(f"--blur must list distinct radii >= 0 (e.g. 0,1,2,4,8), got {list(self.blur)}")
        if any(k < 1 for k in self.rerank_sizes) or (self.rerank is not None and self.rerank < 1):
            raise UserError("--rerank and --rerank-sizes must be at least 1")
        if self.batch_size < 1 or self.workers < 0 or self.composition_count < 0:
            raise UserError("--batch-size must be >= 1, --workers and --composition-count >= 0")
        if not 0 <= self.max_missing < 1:
            raise UserError(f"--max-missing must be a fraction in [0, 1), got {self.max_missing}")
        if self.size is not None and self.size < 8:
            raise UserError(f"--size must be at least 8 px, got {self.size}")
        for flag, path in (("--samples", self.samples), ("--captions", self.captions),
                           ("--composition-samples", self.composition_samples)):
            if path is not None and Path(path).is_dir():
                raise UserError(f"{flag} {path} is a folder; give a text file with one caption per line"
                                if flag == "--captions" else f"{flag} {path} is a folder without a samples.jsonl")
            if path is not None and not Path(path).is_file():
                raise UserError(f"{flag} {path}: no such file")
        from dallecli.sample import SamplingConfig, check_seed

        SamplingConfig(self.temperature, self.top_k, self.top_p, self.guidance).validate()
        check_seed(self.seed)
        nets.check_features(self.features, self.inception_weights)  # names and files; evaluate() loads them


def _generate(run: Path, prompts: list[str], out: Path, cfg: EvalConfig, n: int, state) -> Path:
    """Draw n candidates per prompt with the lead's sampler (all processes share the prompts)."""
    import inspect

    from dallecli import sample

    world = state.num_processes if state is not None else 1
    rerank = n if n > 1 else None
    kwargs = dict(n=n, rerank=rerank, seed=cfg.seed, batch_size=cfg.batch_size, prior=cfg.prior, dvae=cfg.dvae,
                  clip=cfg.clip, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                  guidance=cfg.guidance, quiet=True)
    accepted = set(inspect.signature(sample.sample_to_folder).parameters)
    if "device" in accepted:
        kwargs["device"] = state.device if state is not None else "cpu"
    if world > 1:  # each process draws its prompts; the main one merges and reranks
        if not {"rank", "world"} <= accepted:
            raise UserError("this sampler cannot split prompts across processes: run dalle eval with --gpus 1")
        sample.sample_to_folder(run, prompts, out, **{**kwargs, "rerank": None}, rank=state.process_index,
                                world=world)
        state.wait_for_everyone()
        if state.is_main_process:
            sample.merge_parts(out, world)
            sample.finish_folder(out, prompts, n, rerank, cfg.clip, run, quiet=True)
        state.wait_for_everyone()
        return out / "samples.jsonl"
    return Path(sample.sample_to_folder(run, prompts, out, **kwargs))


# --- the evaluation ------------------------------------------------------------------------------------------

def evaluate(run: Path, cfg: EvalConfig, state=None) -> tuple[Path, dict] | None:
    """Run the evaluation; on the main process return (RUN/eval/NAME, the metrics written there), else None.

    `state`: accelerate's PartialState (or anything with its process_index, num_processes, is_main_process,
    device, wait_for_everyone); None: one process on the CPU."""
    from dallecli.evaluate import report

    cfg.validate()
    rd = RunDir(Path(run))
    main = state is None or state.is_main_process
    device = state.device if state is not None else torch.device("cpu")
    name = cfg.name or datetime.now().strftime("%Y%m%d-%H%M%S")
    if state is not None and state.num_processes > 1:  # one folder for all: the main process's clock
        from accelerate.utils import broadcast_object_list

        name = broadcast_object_list([name])[0]
    out, cache = rd.eval / name, rd.eval / "cache"
    shards = Path(cfg.shards or rd.shards)

    count = DEFAULT_COUNT if cfg.count is None else cfg.count
    refs = read_references(shards, count, flag=f"--count (default {count})" if cfg.count is None else f"--count {count}")
    seed_world = shapes_world(shards, refs.captions)
    prompts = refs.captions
    if cfg.captions is not None:
        if Path(cfg.captions).is_dir():
            raise UserError(f"--captions {cfg.captions} is a folder; give a text file with one caption per line")
        prompts = [ln.strip() for ln in read_utf8(cfg.captions, "captions file").splitlines() if ln.strip()][: count]
        if len(prompts) < 2:
            raise UserError(f"--captions {cfg.captions} holds {len(prompts)} caption(s); at least 2 are needed")
    # The networks before any sampling: a bad --features, --inception-weights or --clip fails in seconds,
    # before hundreds of images are drawn into `out`.
    scorer, clip_note = _scorer(cfg, rd.root, device)
    features = nets.load_features(cfg.features, device=device, run=rd.root, inception_weights=cfg.inception_weights,
                                  clip=cfg.clip, scorer=scorer if cfg.features == "clip" else None)
    n_draw = max((*cfg.rerank_sizes, cfg.rerank or 1))
    samples_path, comp_path, groups, comp_groups, listing = _samples(rd, prompts, out, cfg, n_draw, seed_world, state)
    if not groups:
        raise UserError(f"{samples_path} lists no usable sample; give a samples.jsonl of `dalle sample` or "
                        "`dalle rerank`")
    have = min(len(g) for g in groups)
    sizes = sorted(k for k in cfg.rerank_sizes if k <= have)
    if len(sizes) < len(cfg.rerank_sizes):
        warn(f"the samples hold {have} candidate(s) per prompt: rerank sizes above {have} skipped")
    main_k = cfg.rerank if cfg.rerank is not None else (1 if cfg.samples is None and n_draw > 1 else None)
    if main_k is not None and main_k > have:
        raise UserError(f"--rerank {main_k} needs {main_k} candidates per prompt; the samples hold {have}")

    # One comparison size for both sets; candidates used in any selection.
    k_max = max([*sizes, main_k or 1])
    pool = [c for g in groups for c in (g if main_k is None else g[:k_max])]
    sample_sides = Counter(_side(c.image) for c in pool)
    size = cfg.size or min(sample_sides.most_common(1)[0][0], refs.sides.most_common(1)[0][0])
    comp_pool = [c for g in comp_groups for c in (g if main_k is None else g[:k_max])]

    run_opts = dict(batch_size=cfg.batch_size, workers=cfg.workers, state=state)
    base = {"features": features.fingerprint, "feature_net": features.name, "size": size, "data": refs.identity}

    memo: dict[float, tuple] = {}

    def real(radius: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The reference features at `radius`: memoised, else cached on disk, else extracted. Every
        process looks each key up once (no process can see the file before all have looked)."""
        if radius in memo:
            return memo[radius]
        key = F_.cache_key(kind="features", radius=radius, **base)
        hit = F_.load_cached(cache, key)
        if hit is not None:
            memo[radius] = hit["features"], hit.get("logits")
            return memo[radius]
        feats, logits = F_.over_batches(ImageSet(refs.images, size, radius),
                                        lambda x, i: features.extract(x), description=f"references r={radius:g}",
                                        **run_opts)
        if main:
            F_.save_cached(cache, key, {"features": feats, **({"logits": logits} if logits is not None else {})},
                           {**base, "radius": radius})
        memo[radius] = feats, logits
        return feats, logits

    def fake(cands: list[Candidate], radius: float, what: str):
        return F_.over_batches(ImageSet([c.image for c in cands], size, radius),
                               lambda x, i: features.extract(x), description=f"{what} r={radius:g}", **run_opts)

    # Blur-0 features of every candidate that any selection may use; their CLIP scores likewise.
    pool_feats, pool_logits = fake(pool, 0, "samples")
    row = {c.uid: j for j, c in enumerate(pool)}
    our_score = None if scorer is None else cs.sample_scores(scorer, features, pool, pool_feats, comp_pool, size,
                                                             run_opts)
    file_scores = all(c.score is not None for c in pool + comp_pool)
    rank_score = {c.uid: c.score for c in pool + comp_pool} if file_scores else our_score

    chosen = select(groups, main_k, rank_score)
    comp_chosen = select(comp_groups, main_k, rank_score)
    if len(chosen) < 2:
        raise UserError(f"{len(chosen)} sample(s) selected from {samples_path}; FID needs at least 2")
    if main and main_k is None and len(chosen) < len(pool):
        info(f"measuring the {len(chosen)} samples marked kept in {samples_path.name} (of {len(pool)} there); "
             "--rerank K measures the best of K per prompt instead")
    if main and cfg.samples is None:  # drawn here: "kept" says which candidates the metrics below measure
        mark_selected(samples_path, chosen)
        if comp_path is not None:
            mark_selected(Path(comp_path), comp_chosen, uid_start=10**9)
    if main and min(len(chosen), len(refs.images)) < FEW_IMAGES:
        warn(f"FID and KID from {len(chosen)} samples and {len(refs.images)} references are noisy and biased "
             "upward (the fewer the images, the higher): compare them only between evaluations of equal counts")

    per_blur = {}
    for radius in cfg.blur:
        r_feats, _ = real(radius)
        if radius == 0:
            idx = torch.tensor([row[c.uid] for c in chosen])
            f_feats, f_logits = pool_feats[idx], None if pool_logits is None else pool_logits[idx]
        else:
            f_feats, f_logits = fake(chosen, radius, "samples")
        if main:
            per_blur[_key(radius)] = _set_metrics(r_feats, f_feats, f_logits, cfg.seed)

    clip_score = {"generated": None, "real": None}
    if scorer is not None:
        clip_score["generated"] = _mean(our_score[c.uid] for c in chosen)
        clip_score["real"] = cs.real_score(scorer, refs, size, features, cache, base, run_opts, main, real)

    composition, comp_counts = None, None
    if seed_world is not None and main:
        checks = _checker()
        composition, comp_counts = _composition(chosen + comp_chosen, checks)

    rerank = {}
    r0 = real(0)[0] if sizes else None  # every process: it may be a collective extraction
    if sizes and main:
        for k in sizes:
            pick = select(groups, k, rank_score)
            idx = torch.tensor([row[c.uid] for c in pick])
            m = _set_metrics(r0, pool_feats[idx], None if pool_logits is None else pool_logits[idx], cfg.seed)
            m["clip_score"] = _mean(our_score[c.uid] for c in pick) if our_score else None
            if seed_world is not None:
                m["composition"] = _composition(pick + select(comp_groups, k, rank_score), checks)[0]
            rerank[str(k)] = m

    reconstruction, recon_fp = None, None
    if cfg.reconstruction:
        reconstruction, recon_fp = _reconstruction(cfg, rd, refs, size, features, real, run_opts, main)

    if not main:
        state.wait_for_everyone()  # leave only once the main process has written the results
        return None
    protocol = {
        "features": features.protocol,
        "resize": {"image_size": size, "samples_from": sorted(sample_sides), "references_from": sorted(refs.sides),
                   "method": "centre square crop, PIL bicubic up / Lanczos down to image_size, then the blur; "
                             "the network's own resize to network_input"},
        "count": {"samples": len(chosen), "references": len(refs.images), "prompts": len(groups),
                  "listed": listing["listed"], "missing": listing["missing"],
                  "composition": len(chosen) + len(comp_chosen) if composition else 0},
        "seeds": {"generation": cfg.seed if cfg.samples is None else None, "statistics": cfg.seed},
        # "dvae": the one that decoded the samples drawn here (the prior's own: `sample.load_pipeline` checks it);
        # the reconstruction metrics use the run's latest (or --dvae), which may be a later one
        "checkpoints": {**_prior_fingerprints(cfg.prior or rd.prior if cfg.samples is None else None),
                        "dvae_reconstruction": recon_fp,
                        "clip": nets.scorer_fingerprint(scorer) if scorer is not None else None,
                        "features": features.fingerprint},
        "blur": "Pillow ImageFilter.GaussianBlur(radius) of both sets at image_size (§3.1)",
        "kid": {"subsets": F_.KID_SUBSETS, "subset_size": next(iter(per_blur.values()))["kid_subset_size"],
                "kernel": "(x·y/d + 1)^3"},
        "inception_score": {"splits": F_.IS_SPLITS, "logits": None if features.is_note else "the network's head",
                            "null_because": features.is_note},
        "clip_score": {"definition": "mean of max(100·cos(image, caption), 0)",
                       "model": getattr(scorer, "name", cfg.clip or "RUN/clip") if scorer is not None else None,
                       "null_because": clip_note},
        "selection": {"rerank": main_k, "rerank_sizes": sizes,
                      "scores": None if not (main_k or sizes) else
                      "samples.jsonl clip_score" if file_scores else "the eval CLIP (the same as the CLIP score's)",
                      "rule": "the best CLIP score among the first k candidates of each prompt" if main_k else
                              "the kept candidates when marked, else all"},
        "samples": str(samples_path), "composition_samples": str(comp_path) if comp_path else None,
        "composition_counts": comp_counts, "blur_radii": list(cfg.blur),
        # how the samples were drawn, where eval drew them (given samples: their folder's sampling.json)
        "sampling": None if cfg.samples is not None else {
            "temperature": cfg.temperature, "top_k": cfg.top_k, "top_p": cfg.top_p, "guidance": cfg.guidance,
            "candidates_per_prompt": n_draw, "seed": cfg.seed},
    }
    for m in per_blur.values():
        m.pop("kid_subset_size", None)
    for m in rerank.values():
        m.pop("kid_subset_size", None)
    metrics = {"protocol": protocol, "blur": per_blur, "clip_score": clip_score, "composition": composition,
               "reconstruction": reconstruction, "rerank_sizes": rerank}
    report.write(out, metrics)
    if state is not None:
        state.wait_for_everyone()
    return out, metrics


# --- pieces --------------------------------------------------------------------------------------------------

def _samples(rd: RunDir, prompts: list[str], out: Path, cfg: EvalConfig, n_draw: int, seed_world: int | None,
             state) -> tuple[Path, Path | None, list[list[Candidate]], list[list[Candidate]], dict]:
    """The samples to measure: given (`--samples`, `--composition-samples`), or drawn here, n_draw per prompt
    (shapes world: the test splits' captions too, for the composition table). Returns (samples.jsonl,
    the composition samples.jsonl or None, their candidates grouped per prompt, the listing counts)."""
    if cfg.samples is not None:
        samples_path, comp_path = Path(cfg.samples), cfg.composition_samples
    else:
        samples_path = _generate(rd.root, prompts, out / "samples", cfg, n_draw, state)
        comp_path = None
        if seed_world is not None and cfg.composition_count:
            from dallecli.data.shapes import iter_scenes

            test = [cap for split in ("test-seen", "test-zeroshot")  # captions do not depend on the size
                    for _, _, cap, _ in iter_scenes(split, cfg.composition_count, seed_world, 32)]
            comp_path = _generate(rd.root, test, out / "samples-composition", cfg, n_draw, state)
    groups, listing = read_samples(samples_path, cfg.max_missing)
    comp_groups: list[list[Candidate]] = []
    if comp_path is not None:
        comp_groups, comp_listing = read_samples(Path(comp_path), cfg.max_missing, uid_start=10**9)
        listing = {k: listing[k] + comp_listing[k] for k in listing}
    return samples_path, comp_path, groups, comp_groups, listing


def _key(radius: float) -> str:
    return str(int(radius)) if float(radius).is_integer() else str(radius)


def _mean(values) -> float:
    values = list(values)
    return float(sum(values) / len(values)) if values else None


def _side(ref: ImageRef) -> int:
    from PIL import Image

    try:
        with Image.open(ref.path) as im:
            return min(im.size)
    except OSError as exc:
        raise UserError(f"cannot read the sample image {ref.path} ({exc})") from None


def _set_metrics(real: torch.Tensor, fake: torch.Tensor, logits: torch.Tensor | None, seed: int) -> dict:
    kid_mean, kid_std, subset = F_.kid(real, fake, seed)
    is_mean, is_std = (None, None) if logits is None else F_.inception_score(logits, seed)[:2]
    return {"fid": F_.fid(real, fake), "is": is_mean, "is_std": is_std, "kid": kid_mean, "kid_std": kid_std,
            "kid_subset_size": subset}


def _scorer(cfg: EvalConfig, run: Path, device):
    """The CLIP for CLIP scores and reranking; without one, those metrics are null (with the reason)."""
    try:
        return nets.load_scorer(cfg.clip, run, device), None
    except (UserError, ImportError) as exc:
        if cfg.features == "clip" or cfg.clip is not None:
            raise UserError(f"no CLIP for --features clip / --clip: {exc}") from None
        warn(f"no CLIP model ({exc}): CLIP scores are skipped")
        return None, str(exc)


def _checker():
    """Memoised shapes checks: one verdict per candidate image."""
    from dallecli.evaluate.shapes_check import check

    memo: dict[int, bool] = {}

    def ok(c: Candidate) -> bool:
        if c.uid not in memo:
            from dallecli.imageutil import center_square

            image = c.image.open()
            if image.size[0] != image.size[1] or image.size[0] not in (32, 64, 128, 256):
                image = center_square(image, 64)
            memo[c.uid] = bool(check(image, c.prompt)[0])
        return memo[c.uid]

    return ok


def _composition(cands: list[Candidate], ok) -> tuple[dict, dict]:
    """GenEval-style accuracy per category over the samples whose prompt is a shapes caption; "overall" is the
    share of all those samples judged correct (each sample counts alike: GenEval's overall averages the
    categories instead)."""
    from dallecli.evaluate.shapes_check import category

    hits, totals = Counter(), Counter()
    for c in cands:
        try:
            cat = category(c.prompt)
        except ValueError:
            continue
        totals[cat] += 1
        hits[cat] += ok(c)
    acc = {cat: (hits[cat] / totals[cat] if totals[cat] else None) for cat in CATEGORIES}
    n = sum(totals.values())
    acc["overall"] = sum(hits.values()) / n if n else None
    return acc, {cat: totals[cat] for cat in CATEGORIES}


def _prior_fingerprints(path: Path | None) -> dict[str, str | None]:
    """{"prior", "dvae"}: the fingerprints of the prior checkpoint at `path` and of the dVAE it was trained on
    (the one that decodes its samples); None where there is no prior (given samples) or it cannot be read."""
    from dallecli import checkpoint

    try:
        ck = checkpoint.load(path, "prior") if path is not None else None
    except UserError:
        ck = None
    return {"prior": ck.fingerprint if ck else None, "dvae": ck.meta.get("dvae_fingerprint") if ck else None}


def _reconstruction(cfg: EvalConfig, rd: RunDir, refs: References, size: int, features, real, run_opts: dict,
                    main: bool):
    """§2.1's dVAE on the real val images: PSNR, reconstruction FID, share of the codebook used."""
    from dallecli import checkpoint
    from dallecli.imageutil import center_square, to_pil, to_tensor

    path = Path(cfg.dvae or rd.dvae)
    try:
        checkpoint.resolve(path, "dvae")
    except UserError as exc:
        if cfg.dvae is not None:
            raise
        info(f"no dVAE at {path}: reconstruction metrics skipped ({exc})")
        return None, None
    from dallecli.train.dvae_task import load_dvae

    model, ck = load_dvae(path, run_opts["state"].device if run_opts["state"] is not None else "cpu")
    side = model.config.image_size

    @torch.no_grad()
    def fn(x, idx):
        x = x.to(next(model.parameters()).device)
        codes = model.encode(x)  # (B, grid, grid)
        rec = model.decode_codes(codes).float().clamp(0, 1)  # (B, 3, side, side)
        mse = (rec - x).square().flatten(1).mean(1).clamp_min(1e-10)
        # The reconstruction as a sample would be: 8-bit, then brought to the comparison size.
        small = torch.stack([to_tensor(center_square(to_pil(r), size)) for r in rec.cpu()])
        return features.extract(small)[0], -10 * torch.log10(mse), codes.flatten(1)

    feats, psnr, codes = F_.over_batches(ImageSet(refs.images, side, 0), fn, description="dVAE", **run_opts)
    r0, _ = real(0)
    if not main:
        return None, ck.fingerprint
    used = torch.unique(codes).numel()
    return {"psnr": float(psnr.mean()), "rfid": F_.fid(r0, feats),
            "codebook_usage": used / model.config.vocab_size}, ck.fingerprint
