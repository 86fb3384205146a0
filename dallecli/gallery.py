"""A samples folder's gallery: grid.png (one row per prompt, best first) and a self-contained index.html that
opens from disk, without a server. Written by `dalle sample`, and again by `dalle rerank` in the new order."""
from __future__ import annotations

import html
from pathlib import Path


def write_gallery(out: Path, rows: list[dict]) -> None:
    """grid.png (one row per prompt, the kept or best-ranked first) and a self-contained index.html."""
    from PIL import Image

    from dallecli.imageutil import grid as make_grid

    by_prompt: dict[int, list[dict]] = {}
    for r in rows:
        by_prompt.setdefault(r.get("prompt_index", 0), []).append(r)
    ordered = []
    for i in sorted(by_prompt):
        group = sorted(by_prompt[i], key=lambda r: (r.get("rank", 0), r["index"]))
        ordered.append(group)
    cols = max(len(g) for g in ordered)
    images, captions = [], []
    for group in ordered:
        for k in range(cols):
            if k < len(group):
                images.append(Image.open(out / group[k]["image"]).convert("RGB"))
                score = f" {group[k]['clip_score']:.2f}" if "clip_score" in group[k] else ""
                captions.append((group[k]["prompt"] if k == 0 else "") + score)
            else:
                images.append(Image.new("RGB", images[0].size, "white"))
                captions.append("")
    scale = max(1, 128 // images[0].size[0])
    make_grid(images, cols=cols, captions=captions, scale=scale).save(out / "grid.png")
    cards = []
    for group in ordered:
        figs = "".join(
            f'<figure class="{"kept" if r.get("kept") else ""}"><img src="{html.escape(r["image"])}" '
            f'alt="{html.escape(r["prompt"])}"><figcaption>seed {r["seed"]}'
            + (f' · rank {r["rank"]} · clip {r["clip_score"]:.3f}' if "rank" in r else "")
            + f' · logp {r["logprob"]:.1f}</figcaption></figure>' for r in group)
        cards.append(f'<section><h2>{html.escape(group[0]["prompt"])}</h2><div class="row">{figs}</div></section>')
    page = ("<!doctype html><meta charset=utf-8><title>dalle samples</title><style>"
            "body{font-family:sans-serif;margin:2em;background:#fafafa}h2{font-size:1.1em}"
            ".row{display:flex;flex-wrap:wrap;gap:8px}figure{margin:0;text-align:center;font-size:.75em;color:#555}"
            "img{width:128px;height:128px;image-rendering:pixelated;border:1px solid #ddd}"
            ".kept img{border:2px solid #2a2}</style><h1>dalle samples</h1>"
            f"<p>{len(rows)} images · <a href=grid.png>grid.png</a> · <a href=samples.jsonl>samples.jsonl</a></p>"
            + "".join(cards))
    (out / "index.html").write_text(page)
