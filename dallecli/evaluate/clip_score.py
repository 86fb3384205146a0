"""CLIP score for `dalle eval`: max(100·cos(image embedding, caption embedding), 0) per image, for the samples
and for the real val images (the latter cached under RUN/eval/cache beside the real set's features)."""
from __future__ import annotations

from pathlib import Path

import torch

from dallecli.evaluate import features as nets
from dallecli.evaluate import fid as F_
from dallecli.evaluate.fid import ImageSet
from dallecli.evaluate.inputs import Candidate, References


def sample_scores(scorer, features, pool: list[Candidate], pool_feats: torch.Tensor, comp_pool: list[Candidate],
                  size: int, run_opts: dict) -> dict[int, float]:
    """Each candidate's CLIP score, max(100·cos(image, its prompt), 0), by uid. With CLIP as the FID
    features, the pool's features are its embeddings already."""
    emb = {}
    everyone = pool + comp_pool
    if features.name == "clip":
        emb.update({c.uid: pool_feats[j] for j, c in enumerate(pool)})
        everyone = comp_pool
    if everyone:
        e, = F_.over_batches(ImageSet([c.image for c in everyone], size, 0),
                             lambda x, i: (nets.image_embeddings(scorer, x),), description="CLIP", **run_opts)
        emb.update({c.uid: e[j] for j, c in enumerate(everyone)})
    text_emb = text_embeddings(scorer, sorted({c.prompt for c in pool + comp_pool}))
    prompt_of = {c.uid: c.prompt for c in pool + comp_pool}
    return {uid: float((100 * (v @ text_emb[prompt_of[uid]])).clamp_min(0)) for uid, v in emb.items()}


def text_embeddings(scorer, prompts: list[str], batch: int = 256) -> dict[str, torch.Tensor]:
    """Unit-length text embeddings by prompt, on the CPU."""
    out = {}
    with torch.no_grad():
        for lo in range(0, len(prompts), batch):
            chunk = prompts[lo: lo + batch]
            t = torch.nn.functional.normalize(scorer.text_features(chunk).float().cpu(), dim=-1)
            out.update(zip(chunk, t))
    return out


def real_score(scorer, refs: References, size: int, features, cache: Path, base: dict, run_opts: dict,
               main: bool, real) -> float:
    """The mean CLIP score of the real val images against their captions; computed once per CLIP and protocol
    (`base`) and cached (written by the main process only). `real(0)` gives the real set's blur-0 features,
    which are CLIP embeddings already when CLIP is the FID network."""
    key = F_.cache_key(kind="clip_score", clip=nets.scorer_fingerprint(scorer), **base)
    hit = F_.load_cached(cache, key)
    if hit is not None:
        return float(hit["scores"].mean())
    if features.name == "clip":
        img = real(0)[0]
    else:
        img, = F_.over_batches(ImageSet(refs.images, size, 0), lambda x, i: (nets.image_embeddings(scorer, x),),
                               description="CLIP references", **run_opts)
    text = text_embeddings(scorer, refs.captions)
    scores = (100 * (img * torch.stack([text[c] for c in refs.captions])).sum(-1)).clamp_min(0)
    if main:
        F_.save_cached(cache, key, {"scores": scores}, {**base, "clip": nets.scorer_fingerprint(scorer)})
    return float(scores.mean())
