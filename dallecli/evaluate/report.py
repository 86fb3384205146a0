"""What `dalle eval` writes: metrics.json (every number beside its protocol), rich tables, PNG plots.

metrics.json:
  {"protocol": {features, resize, count, seeds, checkpoints, …},
   "blur": {"0": {"fid", "is", "is_std", "kid", "kid_std"}, "1": {…}, …},
   "clip_score": {"generated", "real"},
   "composition": {category: accuracy, "overall"} or null (not the shapes world),
   "reconstruction": {"psnr", "rfid", "codebook_usage"} or null (no dVAE),
   "rerank_sizes": {"k": {"fid", "is", "is_std", "kid", "kid_std", "clip_score", "composition"?}, …}}
A null is a number that could not be measured under this protocol; the protocol says why.
"""
from __future__ import annotations

import math
from pathlib import Path

from dallecli.config import write_json_atomic

KEYS = ("protocol", "blur", "clip_score", "composition", "reconstruction", "rerank_sizes")
PLOTS = {"blur": "fid_is_blur.png", "rerank": "rerank.png"}


def _finite(value):
    """JSON has no NaN or infinity: such a value becomes null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def write(out: Path, metrics: dict) -> dict[str, Path]:
    """metrics.json and the plots into `out`; returns what was written."""
    assert tuple(metrics) == KEYS, f"metrics keys {tuple(metrics)} != {KEYS}"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = {"metrics": out / "metrics.json"}
    write_json_atomic(written["metrics"], _finite(metrics))
    written["blur plot"] = plot_blur(metrics, out / PLOTS["blur"])
    if metrics["rerank_sizes"]:
        written["rerank plot"] = plot_rerank(metrics, out / PLOTS["rerank"])
    else:  # an earlier evaluation's plot, left where --overwrite kept the folder (its inputs are inside it)
        (out / PLOTS["rerank"]).unlink(missing_ok=True)
    return written


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _fmt(value, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _sig(value, digits: int = 4) -> str:
    """Significant digits: an FID of 3e-5 (a random feature net) is not 0.00."""
    return "—" if value is None else f"{value:.{digits}g}"


def plot_blur(metrics: dict, path: Path) -> Path:
    """§3.1's figure: FID and IS against the blur radius applied to both sets."""
    plt = _pyplot()
    radii = sorted(metrics["blur"], key=float)
    xs = [float(r) for r in radii]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    axes[0].plot(xs, [metrics["blur"][r]["fid"] for r in radii], "o-")
    axes[0].set(xlabel="blur radius", ylabel="FID (lower is better)", title="FID")
    is_ = [metrics["blur"][r]["is"] for r in radii]
    if any(v is not None for v in is_):
        std = [metrics["blur"][r]["is_std"] or 0 for r in radii]
        axes[1].errorbar(xs, [v if v is not None else float("nan") for v in is_], yerr=std, fmt="o-", capsize=3)
    else:
        axes[1].text(0.5, 0.5, "IS not measured:\nno classifier head", ha="center", va="center",
                     transform=axes[1].transAxes)
    axes[1].set(xlabel="blur radius", ylabel="IS (higher is better)", title="Inception score")
    features = metrics["protocol"]["features"]["name"]
    fig.suptitle(f"{metrics['protocol']['count']['samples']} samples, {features} features, "
                 f"{metrics['protocol']['resize']['image_size']} px")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_rerank(metrics: dict, path: Path) -> Path:
    """Fig. 9c: metrics against the number of candidates CLIP reranks."""
    plt = _pyplot()
    ks = sorted(metrics["rerank_sizes"], key=int)
    xs = [int(k) for k in ks]
    def values(key):
        if key == "composition":
            return [(metrics["rerank_sizes"][k].get("composition") or {}).get("overall") for k in ks]
        return [metrics["rerank_sizes"][k].get(key) for k in ks]

    series = [(key, label) for key, label in (("fid", "FID ↓"), ("is", "IS ↑"), ("clip_score", "CLIP score ↑"),
                                              ("composition", "composition accuracy ↑"))
              if any(v is not None for v in values(key))]  # a metric not measured has no panel
    fig, axes = plt.subplots(1, len(series), figsize=(3.4 * len(series), 3.4), squeeze=False)
    for ax, (key, label) in zip(axes[0], series):
        ax.plot(xs, [float("nan") if y is None else y for y in values(key)], "o-")
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set(xlabel="candidates reranked", title=label)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def print_tables(metrics: dict) -> None:
    """The rich tables: per blur radius, CLIP score and reconstruction, composition, rerank sizes."""
    from rich.table import Table

    from dallecli.console import out

    p = metrics["protocol"]
    t = Table(title=f"eval: {p['count']['samples']} samples vs {p['count']['references']} references, "
                    f"{p['features']['name']} features, {p['resize']['image_size']} px", title_justify="left")
    for col in ("blur", "FID ↓", "IS ↑", "KID ×100 ↓"):
        t.add_column(col, justify="right")
    for r, m in sorted(metrics["blur"].items(), key=lambda kv: float(kv[0])):
        is_ = "—" if m["is"] is None else f"{m['is']:.3f} ± {m['is_std']:.2g}"
        kid = "—" if m["kid"] is None else f"{100 * m['kid']:.3g} ± {100 * m['kid_std']:.2g}"
        t.add_row(r, _sig(m["fid"]), is_, kid)
    out.print(t)
    rows = {"CLIP score (samples)": _fmt(metrics["clip_score"]["generated"]),
            "CLIP score (real)": _fmt(metrics["clip_score"]["real"])}
    if metrics["reconstruction"]:
        r = metrics["reconstruction"]
        rows |= {"dVAE PSNR": f"{r['psnr']:.2f} dB", "dVAE rFID": _sig(r["rfid"]),
                 "codebook usage": f"{100 * r['codebook_usage']:.1f}%"}
    extra = Table(show_header=False, box=None)
    for k, v in rows.items():
        extra.add_row(k, v)
    out.print(extra)
    if metrics["composition"] is not None:
        ks = sorted(metrics["rerank_sizes"], key=int)
        ct = Table(title="composition accuracy (shapes checker)", title_justify="left")
        ct.add_column("category")
        ct.add_column("n", justify="right")
        ct.add_column("samples", justify="right")
        for k in ks:
            ct.add_column(f"best of {k}", justify="right")
        counts = p.get("composition_counts") or {}
        for cat, acc in metrics["composition"].items():
            cells = [_fmt(metrics["rerank_sizes"][k]["composition"].get(cat), 3) for k in ks]
            ct.add_row(cat, str(counts.get(cat, sum(counts.values()) if cat == "overall" else "")), _fmt(acc, 3),
                       *cells)
        out.print(ct)
    if metrics["rerank_sizes"]:
        rt = Table(title="against the number of candidates reranked (Fig. 9c)", title_justify="left")
        for col in ("k", "FID ↓", "IS ↑", "CLIP score ↑"):
            rt.add_column(col, justify="right")
        for k, m in sorted(metrics["rerank_sizes"].items(), key=lambda kv: int(kv[0])):
            rt.add_row(k, _sig(m["fid"]), _sig(m["is"]), _fmt(m["clip_score"]))
        out.print(rt)
