"""Image tokens: encode image shards into code shards, preview reconstructions, check provenance.

Code shards mirror the image shards one for one (`train-000000.tar` → `train-000000.tar`), each sample
holding `KEY.codes` (the argmax codes of the EMA encoder, uint16 little-endian, row-major, §2.1),
`KEY.txt` and `KEY.json`. The manifest names the dVAE that made them by its content fingerprint:
stage 2 refuses codes from any other dVAE (DESIGN.md, "The data flow").

    OUT/manifest.json   the commit point: OUT holds a complete code set exactly when it is there
    OUT/train-000000.tar …  OUT/rejects.jsonl
    OUT/.parts/         one record per finished shard (dVAE fingerprint, source shard, count, sha256): a
                        rerun skips those made by the same dVAE from the same image shard
    OUT/.stage/         a code set being written (the first one, or one that replaces OUT's)

A new code set, or codes of another dVAE, are written into OUT/.stage and moved into OUT only when
complete (as `dalle build-shards` does), so an interrupted or failed encode never leaves OUT half
replaced; a rerun resumes in the stage. Codes of the same dVAE are completed in place. Codes that the
run's prior was trained on are replaced only with --overwrite.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from dallecli import checkpoint
from dallecli.config import read_json, write_json_atomic
from dallecli.console import UserError, counted, info, progress, summary, warn
from dallecli.data.loader import BadSample, read_caption, read_image, read_meta
from dallecli.data.records import (SHARD_RE, ShardError, install_staged, iter_records, list_shards,
                                   write_tar)
from dallecli.hardware import default_precision
from dallecli.imageutil import center_square, grid, to_pil, to_tensor
from dallecli.train.dvae_task import load_dvae, shard_image_size

MANIFEST = "manifest.json"
REJECTS = "rejects.jsonl"
PARTS = ".parts"
STAGE = ".stage"


def codes_to_bytes(codes: torch.Tensor) -> bytes:
    return codes.to(torch.int64).cpu().numpy().astype("<u2").tobytes()


def codes_to_images(model, codes: torch.Tensor, batch_size: int = 64) -> list:
    """(N, grid, grid) or (N, grid²) codes → PIL images, decoded by the dVAE (what the sampler shows)."""
    device = next(model.parameters()).device
    g = model.config.grid
    codes = codes.reshape(-1, g, g)
    out = []
    with torch.no_grad():
        for lo in range(0, len(codes), batch_size):
            out += [to_pil(x) for x in model.decode_codes(codes[lo: lo + batch_size].to(device))]
    return out


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def shard_jobs(shards: Path) -> list[tuple[str, Path]]:
    """(split, path) of every train and val image shard; none is an error."""
    jobs = [(split, p) for split in ("train", "val") for p in list_shards(shards, split)]
    if not jobs:
        raise UserError(f"no shards in {shards}; make them with `dalle build-shards`")
    return jobs


def encode_shards(dvae: Path, shards: Path, out: Path, *, batch_size: int = 64, device: str = "cpu",
                  rank: int = 0, world: int = 1, max_errors: int = 100, precision: str | None = None,
                  overwrite: bool = False, prior: Path | None = None,
                  barrier: Callable[[], None] = lambda: None) -> dict:
    """Encode every train and val shard into `result["work"]` (OUT itself, or OUT/.stage: see the module
    docstring); `write_manifest` and `install` finish the job once every process is done. Everything is
    checked before anything is written: the dVAE, the shards, their image size, and OUT (a file; image
    shards; codes that `prior` was trained on, refused unless `overwrite`). `barrier` waits for the other
    processes. Resumable: complete code shards made by the same dVAE are kept.
    The encoder runs channels-last, under bf16 autocast where `precision` (default `hardware.default_precision`) is
    bf16; the nearest-code search stays fp32. A 64 px tiny-vq encodes 4× faster that way on a native-bf16 CPU,
    the paper preset 1.24× faster than NCHW on an H100, with the same reconstruction PSNR."""
    out = Path(out)
    model, ck = load_dvae(dvae, device)
    cfg = model.config
    jobs = shard_jobs(shards)
    found = check_image_size(shards, [p for _, p in jobs], cfg.image_size, ck.path)
    if found > cfg.image_size and rank == 0:
        info(f"the images in {shards} are {found} px: each is resized whole to the dVAE's {cfg.image_size} px")
    if rank == 0 and (out / STAGE / MANIFEST).is_file():
        install(out)  # a crash cut an install short: finish it first
    barrier()
    work, note = _plan(out, shards, ck, prior, overwrite, _source_ids(shards, [p for _, p in jobs]))
    barrier()  # every process has decided before the first one changes anything
    made_out = not out.exists()
    if rank == 0:
        if note:
            note()
        _prepare(out, work, overwrite)
        resumed = len(_finished_parts(work, ck.fingerprint)) if work != out else 0
        if resumed:
            info(f"resuming the unfinished encode in {work}: {resumed} of {counted(len(jobs), 'shard')} already done")
    barrier()
    on_gpu = torch.device(device).type == "cuda"
    precision = precision or default_precision(on_gpu)
    model = model.to(memory_format=torch.channels_last)
    if on_gpu:  # cuDNN's fastest algorithms for these fixed shapes
        torch.backends.cudnn.benchmark = True
    parts = work / PARTS
    mine = jobs[rank::world]
    try:
        done_images = _encode_jobs(model, ck, mine, work, parts, batch_size, device, max_errors, precision,
                                   _source_ids(shards, [p for _, p in mine]), _listed_counts(shards))
    except BaseException:
        if world == 1 and work != out and not _finished_parts(work, ck.fingerprint):
            shutil.rmtree(work, ignore_errors=True)  # nothing worth resuming: leave nothing behind
            if made_out:
                _rmdir_if_empty(out)
        raise
    return {"checkpoint": ck, "images": done_images, "jobs": jobs, "config": cfg, "precision": precision,
            "work": work}


def _source_ids(shards: Path, paths: list[Path]) -> dict[str, str]:
    """What identifies each image shard's content: its sha256 from the shard manifest (`dalle build-shards`
    records it), else its size and modification time. A code shard is reused only for the same source."""
    listed = {}
    manifest = _json_or_none(Path(shards) / MANIFEST)
    if isinstance(manifest, dict) and isinstance(manifest.get("shards"), list):
        listed = {e.get("name"): e.get("sha256") for e in manifest["shards"] if isinstance(e, dict)}
    ids = {}
    for path in paths:
        if listed.get(path.name):
            ids[path.name] = f"sha256:{listed[path.name]}"
        else:
            st = path.stat()
            ids[path.name] = f"stat:{st.st_size}:{st.st_mtime_ns}"
    return ids


def _listed_counts(shards: Path) -> dict[str, int]:
    """Samples per image shard, as the shard manifest lists them (none where there is no manifest)."""
    manifest = _json_or_none(Path(shards) / MANIFEST)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
        return {}
    return {e["name"]: e["count"] for e in manifest["shards"]
            if isinstance(e, dict) and isinstance(e.get("name"), str) and isinstance(e.get("count"), int)}


def _json_or_none(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _encode_jobs(model, ck, mine, work: Path, parts: Path, batch_size: int, device: str, max_errors: int,
                 precision: str, sources: dict[str, str], listed: dict[str, int]) -> int:
    cfg = model.config
    done_images = 0
    with progress("encode", total=len(mine), unit="img") as bar:
        for split, path in mine:
            part = parts / f"{path.name}.json"
            record = _json_or_none(part) if part.exists() else None
            # Reused only if made by this dVAE from this very image shard (a rebuilt shard is encoded again)
            if isinstance(record, dict) and record.get("fingerprint") == ck.fingerprint \
                    and record.get("source") == sources[path.name] and (work / path.name).exists():
                bar.advance(1, rate_count=0)
                continue
            records, rejects = [], []
            batch, batch_keys = [], []

            def flush():
                if batch:
                    x = torch.stack(batch).to(device)
                    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                        codes = model.encode(x.contiguous(memory_format=torch.channels_last)).cpu()
                    for (key, caption, meta), c in zip(batch_keys, codes):
                        meta = {**meta, "grid": cfg.grid, "dvae": ck.fingerprint}
                        records.append((key, {"codes": codes_to_bytes(c), "txt": caption.encode(),
                                              "json": json.dumps(meta, sort_keys=True).encode()}))
                    batch.clear()
                    batch_keys.clear()

            consecutive = 0
            shard_errors: list[ShardError] = []
            for rec in iter_records(path, shard_errors):
                try:
                    image = read_image(rec.members)
                    caption = read_caption(rec.members)
                    meta = read_meta(rec.members)
                    consecutive = 0
                except BadSample as exc:
                    rejects.append({"shard": path.name, "key": rec.key, "reason": str(exc)})
                    consecutive += 1
                    if consecutive >= max_errors:
                        raise UserError(f"{consecutive} unreadable samples in a row in {path}; rebuild the shards")
                    continue
                batch.append(to_tensor(center_square(image, cfg.image_size)))
                batch_keys.append((rec.key, caption, meta))
                if len(batch) == batch_size:
                    flush()
                    bar.advance(0, rate_count=batch_size)
            n_tail = len(batch)
            flush()
            bar.advance(1, rate_count=n_tail)
            read = len(records) + len(rejects)
            lost = listed.get(path.name, read) - read  # a damaged tail takes the samples after it along
            rejects += [{"shard": e.shard, "key": e.key,
                         "reason": e.reason + (f"; {lost} of the {listed[path.name]} samples of this shard are lost "
                                               "(rebuild it with `dalle build-shards`)" if lost > 0 else "")}
                        for e in shard_errors]
            for r in rejects:
                warn(f"skipping {r['shard']}:{r['key']}: {r['reason']}")
            write_tar(work / path.name, records)
            done_images += len(records)
            write_json_atomic(part, {"fingerprint": ck.fingerprint, "source": sources[path.name], "split": split,
                                     "count": len(records), "sha256": _sha256(work / path.name),
                                     "rejects": rejects})
    return done_images


def check_image_size(shards: Path, paths: list[Path], size: int, dvae: Path) -> int:
    """Refuse shards whose images are smaller than the dVAE's size (`dalle train-dvae` refuses them too):
    encoding would silently upscale every image. Larger ones (built for App. A.2's random crops) are
    resized to `size` whole, one view per image. Returns their size."""
    found = shard_image_size(shards, paths)
    if found < size:
        raise UserError(f"the images in {shards} are {found} px but the dVAE {dvae} expects {size} px; "
                        f"rebuild the shards with `dalle build-shards --size {size}`, or use a dVAE "
                        f"trained at {found} px (--dvae)")
    return found


def _code_manifest_or_none(folder: Path) -> dict | None:
    manifest = _json_or_none(folder / MANIFEST)
    ok = isinstance(manifest, dict) and manifest.get("kind") == "codes" and isinstance(manifest.get("dvae"), dict)
    return manifest if ok else None


def _plan(out: Path, shards: Path, ck: checkpoint.Checkpoint, prior: Path | None, overwrite: bool,
          sources: dict[str, str]) -> tuple[Path, Callable[[], None] | None]:
    """Where to write (OUT to complete codes of this dVAE in place, else OUT/.stage), and a message to
    show; refuse what would lose something. `sources`: each image shard's identity (`_source_ids`). Reads only."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder; pass --out with a folder for the code shards "
                        "(it is made if missing)")
    if out.resolve() == Path(shards).resolve():
        raise UserError(f"the output folder {out} is the image shards folder; pass --out DIR to write the "
                        "codes elsewhere")
    stage = out / STAGE
    old = _code_manifest_or_none(out)
    if old is None:
        if out.is_dir() and not overwrite and not (out / PARTS).is_dir():
            foreign = sorted(p.name for p in out.iterdir() if SHARD_RE.match(p.name) or p.name == MANIFEST)
            if foreign:
                raise UserError(f"{out} already holds {foreign[0]}, not made by `dalle encode`; pass --out DIR "
                                "to write the codes elsewhere, or --overwrite to replace it")
        return stage, None
    made_by = old["dvae"].get("fingerprint")
    if made_by == ck.fingerprint:
        changed = _changed_shards(out, old, sources)
        trained = checkpoint.prior_trained_with(prior, "dvae_fingerprint", made_by) if changed else None
        if trained is not None and not overwrite:  # same dVAE, other images: the prior's data would change
            more = f" and {len(changed) - 1} more" if len(changed) > 1 else ""
            raise UserError(f"the image shards in {shards} changed since {out} was encoded ({changed[0]}{more}), "
                            f"and the prior {trained.path} was trained on the codes there: pass --out DIR to encode "
                            "them elsewhere, or --overwrite to replace them (then train the prior again with --fresh)")
        if trained is not None:
            return stage, lambda: warn(f"replacing the codes in {out}: the image shards changed since, and the "
                                       f"prior {trained.path} was trained on the old codes: train it again with "
                                       "--fresh")
        return (stage, None) if overwrite else (out, None)
    theirs = f"dVAE {made_by} ({old['dvae'].get('checkpoint')})"
    ours = f"dVAE {ck.fingerprint} ({ck.path})"
    trained = checkpoint.prior_trained_with(prior, "dvae_fingerprint", made_by)
    if trained is not None and not overwrite:
        raise UserError(f"{out} holds the codes of {theirs} that the prior {trained.path} was trained on; "
                        f"encoding with {ours} would replace them: pass --out DIR to write the new codes "
                        "elsewhere, or --overwrite to replace them (then train the prior again with --fresh)")
    if trained is not None:
        return stage, lambda: warn(f"replacing the codes of {theirs} in {out} with codes of {ours}; the prior "
                                   f"{trained.path} was trained on the old ones: train it again with --fresh")
    return stage, lambda: info(f"{out} holds the codes of {theirs}: replacing them with codes of {ours} "
                               "(the old ones stay until the new set is complete)")


def stale_codes(codes: Path, shards: Path) -> list[str]:
    """The image shards in `shards` added, rebuilt or removed since the codes in `codes` were encoded from
    them (none where either folder cannot tell: no manifest, no shards, no records)."""
    manifest = _code_manifest_or_none(Path(codes))
    try:
        paths = [p for _, p in shard_jobs(shards)]
    except UserError:
        return []
    return _changed_shards(Path(codes), manifest, _source_ids(shards, paths)) if manifest else []


def _changed_shards(out: Path, manifest: dict, sources: dict[str, str]) -> list[str]:
    """The image shards added, rebuilt or removed since OUT's codes were made (by the sources its .parts
    records hold); none where OUT keeps no such records."""
    recorded = {}
    for part in (out / PARTS).glob("*.json") if (out / PARTS).is_dir() else ():
        record = _json_or_none(part)
        if isinstance(record, dict):
            recorded[part.name.removesuffix(".json")] = record.get("source")
    if not recorded:
        return []
    listed = {s.get("name") for s in manifest.get("shards", []) if isinstance(s, dict)}
    return sorted({name for name, source in sources.items() if recorded.get(name) != source}
                  | {name for name in listed if name not in sources})


def _prepare(out: Path, work: Path, overwrite: bool) -> None:
    """Make the folders; start the stage afresh unless it holds this dVAE's unfinished work (then resume)."""
    stage = out / STAGE
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot make the code folder {out}: {exc.strerror or exc}; pass --out with a folder "
                        "you can write") from None
    if work != stage or overwrite:
        shutil.rmtree(stage, ignore_errors=True)  # another dVAE's unfinished replacement, or --overwrite
    work.mkdir(exist_ok=True)
    (work / PARTS).mkdir(exist_ok=True)


def _finished_parts(work: Path, fingerprint: str) -> list[Path]:
    parts = work / PARTS
    if not parts.is_dir():
        return []
    found = []
    for p in parts.glob("*.json"):
        try:
            if json.loads(p.read_text()).get("fingerprint") == fingerprint:
                found.append(p)
        except (OSError, ValueError):
            continue
    return found


def _rmdir_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass


def install(out: Path) -> None:
    """Move the complete code set in OUT/.stage into OUT (`records.install_staged`: the staged manifest.json is
    the commit point; until it has moved, a rerun calls this again and carries on)."""
    manifest = read_json(out / STAGE / MANIFEST, "code manifest")
    names = {s["name"] for s in manifest["shards"]} | ({REJECTS} if manifest.get("rejects") else set())
    install_staged(out, out / STAGE, names, lambda name: SHARD_RE.match(name) is not None or name == REJECTS,
                   folders=(PARTS,))


def write_manifest(out: Path, ck: checkpoint.Checkpoint, cfg, jobs, precision: str = "fp32") -> dict:
    """Merge the per-shard records into manifest.json (after every process has finished)."""
    shards, counts, rejects = [], {"train": 0, "val": 0}, []
    for split, path in jobs:
        part = json.loads((out / PARTS / f"{path.name}.json").read_text())
        shards.append({"name": path.name, "split": split, "count": part["count"], "sha256": part["sha256"]})
        counts[split] += part["count"]
        rejects += part["rejects"]
    manifest = {
        "kind": "codes",
        "dvae": {"fingerprint": ck.fingerprint, "checkpoint": str(ck.path), "step": ck.step, "grid": cfg.grid,
                 "vocab_size": cfg.vocab_size, "image_size": cfg.image_size, "kind": cfg.kind},
        "precision": precision,  # of the encoder's arithmetic (the codes of shards kept from a resumed run may differ)
        "counts": counts,
        "rejects": len(rejects),
        "shards": shards,
    }
    if rejects:
        (out / REJECTS).write_text("".join(json.dumps(r) + "\n" for r in rejects))
    else:
        (out / REJECTS).unlink(missing_ok=True)  # an earlier run's
    write_json_atomic(out / MANIFEST, manifest)  # last: the commit point
    return manifest


def read_code_manifest(codes: Path) -> dict:
    path = Path(codes) / MANIFEST
    if not path.exists():
        raise UserError(f"no code manifest at {path}; make the codes with `dalle encode`")
    manifest = read_json(path, "code manifest")
    if manifest.get("kind") != "codes" or "dvae" not in manifest:
        raise UserError(f"{path} is not a code manifest (made by `dalle encode`)")
    return manifest


def dvae_of_codes(codes: str | Path | None) -> Path | None:
    """The dVAE checkpoint a code folder's manifest names, where it still exists (else None): what decodes the
    codes of a prior trained on them when its run has no dVAE of its own (`encode --dvae ../other`)."""
    try:
        path = Path(read_code_manifest(Path(codes))["dvae"]["checkpoint"])
    except (UserError, KeyError, TypeError):
        return None
    if not path.is_dir():
        return None
    info(f"using {path}, the dVAE that made the codes the prior was trained on (the run has no dVAE of its own)")
    return path


def preview(dvae: Path, shards: Path, out: Path, n: int, device: str = "cpu") -> Path:
    """N val images: originals and reconstructions as PNGs, preview.jsonl and a grid (originals above)."""
    if n < 1:
        raise UserError(f"--preview must be a number of images, at least 1 (got {n})")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file, not a folder; move it away to write the preview there")
    model, ck = load_dvae(dvae, device)
    size = model.config.image_size
    paths = list_shards(shards, "val") or list_shards(shards, "train")
    if not paths:
        raise UserError(f"no shards in {shards}; make them with `dalle build-shards`")
    check_image_size(shards, paths, size, ck.path)
    images, captions = [], []
    for path in paths:
        for rec in iter_records(path, []):
            try:
                images.append(center_square(read_image(rec.members), size))
                captions.append(read_caption(rec.members))
            except BadSample:
                continue
            if len(images) == n:
                break
        if len(images) == n:
            break
    if not images:
        raise UserError(f"no readable images in {shards}")
    if len(images) < n:
        split = "val" if list_shards(shards, "val") else "train (there is no val split)"
        warn(f"--preview {n}: the {split} shards in {shards} hold {len(images)} readable image(s); previewing those")
    x = torch.stack([to_tensor(im) for im in images]).to(device)
    recons = codes_to_images(model, model.encode(x).cpu())
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (orig, rec, cap) in enumerate(zip(images, recons, captions)):
        orig.save(out / f"{i:03d}-original.png")
        rec.save(out / f"{i:03d}-reconstruction.png")
        rows.append({"caption": cap, "original": f"{i:03d}-original.png", "reconstruction": f"{i:03d}-reconstruction.png"})
    (out / "preview.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    written = {row[k] for row in rows for k in ("original", "reconstruction")}
    for old in out.glob("[0-9][0-9][0-9]*-*.png"):  # a larger earlier preview's images beyond these
        if old.name not in written:
            old.unlink()
    cols = min(8, len(images))
    blank = Image.new("RGB", (size, size), "white")
    pairs = []
    for lo in range(0, len(images), cols):  # a row of originals above a row of their reconstructions
        gap = [blank] * (cols - len(images[lo: lo + cols]))  # a short last chunk: blank cells keep the columns
        pairs += images[lo: lo + cols] + gap + recons[lo: lo + cols] + gap
    grid(pairs, cols=cols, scale=max(1, 128 // size)).save(out / "grid.png")
    mse = float(((torch.stack([to_tensor(r) for r in recons]) - x.cpu()) ** 2).mean())
    summary("encode --preview", {"images": len(images), "psnr": f"{10 * np.log10(1 / max(mse, 1e-12)):.2f} dB",
                                 "written": out})
    return out
