"""`dalle build-shards`: every source, every kind of bad input, the error-rate stop, exact resume."""
from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import re
import subprocess
import sys
import tarfile
import threading
import time
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from dallecli.commands.build_shards import command
from dallecli.console import UserError, settings
from dallecli.data import shards as shards_mod
from dallecli.data import workers as workers_mod
from dallecli.data.records import iter_records, list_shards
from dallecli.data.shards import split_of, tar_end, tar_member


@pytest.fixture(autouse=True)
def _console(monkeypatch):
    monkeypatch.setattr(settings, "quiet", False)
    monkeypatch.setattr(settings, "debug", False)


def app() -> typer.Typer:
    a = typer.Typer()
    a.command()(command)
    return a


def cli(*args) -> "typer.testing.Result":
    return CliRunner().invoke(app(), [str(a) for a in args])


def ok(*args):
    result = cli(*args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def image_bytes(i: int, fmt: str = "PNG", size=(48, 40), mode="RGB") -> bytes:
    rng = np.random.default_rng(i)
    a = rng.integers(0, 256, (size[1], size[0], 3), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).convert(mode).save(buf, fmt)
    return buf.getvalue()


def good_folder(root: Path, n: int, fmt: str = "PNG", ext: str = "png") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / f"img{i:03d}.{ext}").write_bytes(image_bytes(i, fmt))
        (root / f"img{i:03d}.txt").write_text(f"a noisy  picture\nnumber {i}")
    return root


def records(folder: Path, split: str) -> list:
    return [r for p in list_shards(folder, split) for r in iter_records(p)]


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def files(folder: Path) -> dict[str, bytes]:
    """The files directly in `folder` (what readers see), by name; the staged build is a folder."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def one_line(result) -> str:
    """The error of a failed command, which must fit on one line."""
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    return lines[0]


def rejects(folder: Path) -> dict[str, str]:
    lines = [json.loads(line) for line in (folder / "rejects.jsonl").read_text().splitlines()]
    return {line["key"]: line["reason"] for line in lines}


# ---- the writer --------------------------------------------------------------------------------

def test_tar_members_are_reproducible_and_readable(tmp_path):
    blob = tar_member("k1.txt", b"hello") + tar_member("k1.json", b"{}")
    data = blob + tar_end(len(blob))
    assert len(data) % tarfile.RECORDSIZE == 0
    (tmp_path / "t.tar").write_bytes(data)
    with tarfile.open(tmp_path / "t.tar") as tar:
        infos = tar.getmembers()
        assert [i.name for i in infos] == ["k1.txt", "k1.json"]
        assert {(i.mtime, i.uid, i.gid, i.uname, i.gname) for i in infos} == {(0, 0, 0, "", "")}
        assert tar.extractfile("k1.txt").read() == b"hello"


def test_split_is_a_stable_hash_of_the_key():
    keys = [f"k{i}" for i in range(4000)]
    val = [k for k in keys if split_of(k, 0.05) == "val"]
    assert 120 < len(val) < 280
    assert val == [k for k in keys if split_of(k, 0.05) == "val"]
    assert all(split_of(k, 0.0) == "train" for k in keys)


# ---- folder source: everything that can go wrong -----------------------------------------------

def bad_folder(root: Path, monkeypatch) -> Path:
    good_folder(root, 14)
    jpeg = image_bytes(99, "JPEG", (160, 120))

    def put(name: str, data: bytes | None, caption: str | bytes | None = "a perfectly fine caption"):
        if data is not None:
            (root / name).write_bytes(data)
        if caption is not None:
            cap = root / (name.rsplit(".", 1)[0] + ".txt")
            cap.write_bytes(caption if isinstance(caption, bytes) else caption.encode())

    put("truncated.jpg", jpeg[: len(jpeg) // 2])
    put("zero.jpg", b"")
    put("text.jpg", b"this is not a jpeg at all\n" * 10)
    big = io.BytesIO()
    Image.new("L", (1200, 1000)).save(big, "PNG")
    put("bomb.png", big.getvalue())
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)
    put("tiny.png", image_bytes(1, "PNG", (1, 1)))
    put("wide.png", image_bytes(2, "PNG", (300, 60)))
    put("nocaption.png", image_bytes(3), caption=None)
    put("emptycap.png", image_bytes(4), caption="")
    put("spacecap.png", image_bytes(5), caption=" \n\t  ")
    put("latin1.png", image_bytes(6), caption="caf\xe9 au lait".encode("latin-1"))
    put("longcap.png", image_bytes(7), caption="word " * 40)
    put("shortcap.png", image_bytes(8), caption="ab")
    put("dup.png", image_bytes(9))
    put("dup.jpg", image_bytes(10, "JPEG"))                      # same key "dup": the second is rejected
    cmyk = io.BytesIO()
    Image.new("CMYK", (64, 64), (0, 255, 255, 0)).save(cmyk, "JPEG")
    put("cmyk.jpg", cmyk.getvalue())
    a16 = io.BytesIO()
    Image.fromarray(np.full((40, 40), 128 * 257, np.uint16)).save(a16, "PNG")
    put("grey16.png", a16.getvalue())
    pal = Image.new("P", (40, 40), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.paste(1, (20, 0, 40, 40))
    p = io.BytesIO()
    pal.save(p, "PNG", transparency=0)
    put("palette.png", p.getvalue())
    put("grey.png", image_bytes(11, "PNG", mode="L"))
    put("greyalpha.png", image_bytes(12, "PNG", mode="LA"))
    (root / os.fsdecode(b"caf\xe9.png")).write_bytes(image_bytes(13))       # a file name that is not UTF-8
    (root / os.fsdecode(b"caf\xe9.txt")).write_text("a cafe with a Latin-1 file name")
    (root / "orphan.txt").write_text("a caption without an image")       # not an input
    (root / ".hidden.jpg").write_bytes(b"macOS junk")                    # hidden: skipped
    return root


def test_folder_with_every_kind_of_bad_input(tmp_path, monkeypatch):
    src = bad_folder(tmp_path / "photos", monkeypatch)
    out = tmp_path / "out"
    result = ok(src, "--out", out, "--format", "png", "--size", "32", "--max-caption-chars", "100",
                "--val-fraction", "0.2", "--workers", "1")
    got = rejects(out)
    assert got == {
        "truncated": "corrupt-image", "zero": "empty-file", "text": "not-an-image", "bomb": "decompression-bomb",
        "tiny": "too-small", "wide": "aspect-ratio", "nocaption": "caption-missing", "emptycap": "caption-empty",
        "spacecap": "caption-empty", "latin1": "caption-not-utf8", "longcap": "caption-too-long",
        "shortcap": "caption-too-short", "dup": "duplicate-key",
    }
    manifest = json.loads((out / "manifest.json").read_text())
    kept = 14 + 7      # the good ones, the first "dup", cmyk, grey16, palette, grey, greyalpha, café
    assert manifest["counts"]["inputs"] == kept + 13
    assert manifest["counts"]["train"] + manifest["counts"]["val"] == kept
    assert manifest["counts"]["rejected"] == 13 and manifest["counts"]["errors"] == 9
    assert manifest["rejects"]["caption-empty"] == 2
    assert manifest["arguments"]["prepare"]["image"]["size"] == 32
    assert "13" in result.output and str(out) in result.output

    samples = {r.key: r for split in ("train", "val") for r in records(out, split)}
    assert len(samples) == kept and "dup" in samples
    for r in samples.values():
        meta = json.loads(r.members["json"])
        assert meta["split"] == split_of(r.key, 0.2) and meta["key"] == r.key
        assert Image.open(io.BytesIO(r.members["png"])).size == (32, 32)
    assert samples["img003"].members["txt"] == b"a noisy picture number 3"          # whitespace collapsed
    assert json.loads(samples["caf"].members["json"])["source"] == "caf\udce9.png"
    grey16 = np.asarray(Image.open(io.BytesIO(samples["grey16"].members["png"])))
    assert grey16[10, 10].tolist() == [128, 128, 128]                              # scaled, not clipped to 255
    pal = np.asarray(Image.open(io.BytesIO(samples["palette"].members["png"])))
    assert pal[10, 2].tolist() == [255, 255, 255] and pal[10, 29].tolist() == [255, 0, 0]
    cmyk = np.asarray(Image.open(io.BytesIO(samples["cmyk"].members["png"]))).reshape(-1, 3).mean(0)
    assert cmyk[0] > 200 and cmyk[1] < 60

    for entry in manifest["shards"]:                                               # the shard list is true
        path = out / entry["name"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"]
        assert sum(1 for _ in iter_records(path)) == entry["samples"]


def test_workers_do_not_change_the_bytes(tmp_path):
    src = good_folder(tmp_path / "photos", 30)
    ok(src, "--out", tmp_path / "w1", "--workers", "1", "--per-shard", "7", "--size", "32")
    ok(src, "--out", tmp_path / "w2", "--workers", "2", "--per-shard", "7", "--size", "32")
    a, b = folder_bytes(tmp_path / "w1"), folder_bytes(tmp_path / "w2")
    assert a == b and "train-000003.tar" in a


def test_dedup_drops_repeated_images(tmp_path):
    src = good_folder(tmp_path / "photos", 4)
    (src / "copy.png").write_bytes((src / "img001.png").read_bytes())
    (src / "copy.txt").write_text("another caption for the same picture")
    ok(src, "--out", tmp_path / "plain", "--size", "32")
    assert not (tmp_path / "plain" / "rejects.jsonl").read_text()
    ok(src, "--out", tmp_path / "dedup", "--size", "32", "--dedup")
    assert rejects(tmp_path / "dedup") == {"img001": "duplicate-image"}    # "copy" sorts first and is kept


def test_different_files_whose_keys_collide_are_both_kept(tmp_path):
    src = tmp_path / "photos"
    src.mkdir()
    for i, stem in enumerate(["x y", "x_y", "x-y!"]):       # "x y" and "x_y" both sanitise to "x_y"
        (src / f"{stem}.png").write_bytes(image_bytes(i))
        (src / f"{stem}.txt").write_text(f"caption of {stem}")
    args = ["--size", "32", "--val-fraction", "0"]
    ok(src, "--out", tmp_path / "out", *args)
    samples = {r.key: r for r in records(tmp_path / "out", "train")}
    assert {k: r.members["txt"] for k, r in samples.items()} == {
        "x_y": b"caption of x y", "x_y_2": b"caption of x_y", "x-y": b"caption of x-y!"}
    assert samples["x_y"].members["jpg"] != samples["x_y_2"].members["jpg"]
    assert (tmp_path / "out" / "rejects.jsonl").read_text() == ""

    (src / "x_y.jpg").write_bytes(image_bytes(9, "JPEG"))   # same stem as x_y.png, same caption: a duplicate
    ok(src, "--out", tmp_path / "dup", *args)
    assert rejects(tmp_path / "dup") == {"x_y_2": "duplicate-key"}
    kept = {r.key: json.loads(r.members["json"])["source"] for r in records(tmp_path / "dup", "train")}
    assert kept == {"x_y": "x y.png", "x_y_2": "x_y.jpg", "x-y": "x-y!.png"}     # sorted: .jpg before .png


def test_upscaled_images_are_counted_and_warned_about(tmp_path, monkeypatch):
    src = good_folder(tmp_path / "photos", 10)                 # 48×40: shorter side 40
    args = ["--per-shard", "3", "--val-fraction", "0", "--workers", "1"]
    result = ok(src, "--out", tmp_path / "big", "--size", "64", *args)
    assert json.loads((tmp_path / "big" / "manifest.json").read_text())["counts"]["upscaled"] == 10
    warning = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert warning == ["warning: 10 of 10 kept images (100%) were smaller than --size 64 and were upscaled "
                       "(median shorter side 40 px); they are below the smallest dVAE preset's 64 px, so "
                       "upscaling them is what lets `train-dvae` use them (or pass --min-size 64 to leave them out)"]
    assert "warning:" not in ok(src, "--out", tmp_path / "big", "--size", "64", *args).output   # only confirmed

    result = ok(src, "--out", tmp_path / "small", "--size", "32", *args)
    assert json.loads((tmp_path / "small" / "manifest.json").read_text())["counts"]["upscaled"] == 0
    assert "warning:" not in result.output

    (src / "zz.png").write_bytes(image_bytes(99, size=(36, 36)))   # a few small ones among larger ones: leave
    (src / "zz.txt").write_text("a small picture")                 # them out rather than shrink all the rest
    result = ok(src, "--out", tmp_path / "few", "--size", "40", *args)
    assert [line for line in result.output.splitlines() if line.startswith("warning:")] == [
        "warning: 1 of 11 kept images (9%) were smaller than --size 40 and were upscaled (median shorter side "
        "36 px); pass --min-size 40 to leave them out"]
    (src / "zz.png").unlink()
    (src / "zz.txt").unlink()
    result = ok(src, "--out", tmp_path / "big256", "--size", "256", *args)   # 40 px at 256: 64 upscales less
    assert [line for line in result.output.splitlines() if line.startswith("warning:")][0].endswith(
        "pass --size 64 (the smallest dVAE preset's size) to upscale them less")
    mid = tmp_path / "mid"   # 150 px images: the advice is a size train-dvae has a preset for, not 150
    mid.mkdir()
    for i in range(4):
        (mid / f"m{i}.png").write_bytes(image_bytes(i, size=(150, 150)))
        (mid / f"m{i}.txt").write_text("a middling picture")
    result = ok(mid, "--out", tmp_path / "mid-out", "--size", "256", *args)
    assert [line for line in result.output.splitlines() if line.startswith("warning:")][0].endswith(
        "(median shorter side 150 px); pass --size 128 (a dVAE preset's size) not to upscale them")

    out = tmp_path / "resumed"                                  # the count survives an interruption
    with monkeypatch.context() as m:
        _crash_in_consume(m, 8)
        assert isinstance(cli(src, "--out", out, "--size", "64", *args).exception, Crash)
    state = out / ".unfinished" / ".build-state.json"
    assert json.loads(state.read_text())["stats"]["upscaled_sides"] == {"40": 6}
    assert "10 of 10 kept images" in ok(src, "--out", out, "--size", "64", *args).output

    out = tmp_path / "old"                                      # a state file from before the count resumes
    with monkeypatch.context() as m:
        _crash_in_consume(m, 8)
        assert isinstance(cli(src, "--out", out, "--size", "64", *args).exception, Crash)
    old = json.loads((out / ".unfinished" / ".build-state.json").read_text())
    del old["stats"]["upscaled"], old["stats"]["upscaled_sides"]
    (out / ".unfinished" / ".build-state.json").write_text(json.dumps(old))
    ok(src, "--out", out, "--size", "64", *args)
    assert json.loads((out / "manifest.json").read_text())["counts"]["upscaled"] == 4


# ---- error rate ---------------------------------------------------------------------------------

def test_too_many_failures_stop_the_run(tmp_path):
    src = good_folder(tmp_path / "photos", 5)
    for i in range(30):
        (src / f"bad{i:02d}.jpg").write_bytes(b"not an image")
        (src / f"bad{i:02d}.txt").write_text("caption")
    result = cli(src, "--out", tmp_path / "out", "--workers", "1")
    assert result.exit_code == 2
    assert "--max-error-rate" in result.output and "not-an-image" in result.output
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert not list_shards(tmp_path / "out", "train")            # nothing a reader could take for shards
    staged = tmp_path / "out" / ".unfinished"
    assert f"see {staged / 'rejects.jsonl'}" in one_line(result)
    # 18 broken of 35 inputs can no longer end at ≤ 50%: it stops there, not after reading them all
    assert len((staged / "rejects.jsonl").read_text().splitlines()) == 18
    assert "18 of the first 18 inputs failed" in one_line(result)
    # after reading rejects.jsonl, the same command with a generous limit finishes the job
    ok(src, "--out", tmp_path / "out", "--workers", "1", "--max-error-rate", "1")
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["counts"] == {
        "inputs": 35, "train": 5 - sum(split_of(f"img{i:03d}", 0.05) == "val" for i in range(5)),
        "val": sum(split_of(f"img{i:03d}", 0.05) == "val" for i in range(5)), "rejected": 30, "errors": 30,
        "upscaled": 5}


def test_error_rate_is_checked_at_the_end_too(tmp_path):
    src = good_folder(tmp_path / "photos", 1)
    for i in range(3):
        (src / f"bad{i}.jpg").write_bytes(b"")
        (src / f"bad{i}.txt").write_text("caption")
    result = cli(src, "--out", tmp_path / "out")  # below 20 inputs: stopped once 3 of 4 cannot pass
    assert result.exit_code == 2 and "3 of the first 3 inputs failed" in one_line(result)


def test_filters_alone_do_not_stop_the_run_but_nothing_kept_is_an_error(tmp_path):
    src = tmp_path / "photos"
    src.mkdir()
    for i in range(25):
        (src / f"w{i}.png").write_bytes(image_bytes(i, "PNG", (300, 60)))
        (src / f"w{i}.txt").write_text("a wide picture")
    result = cli(src, "--out", tmp_path / "out")
    assert result.exit_code == 2 and "no sample passed the filters" in result.output


# ---- manifests and URLs -------------------------------------------------------------------------

class _Handler(BaseHTTPRequestHandler):
    hits: dict[str, int] = {}

    def do_GET(self):  # noqa: N802
        n = self.hits[self.path] = self.hits.get(self.path, 0) + 1
        try:
            if self.path == "/missing.jpg":
                self.send_error(404)
            elif self.path == "/slow.jpg":
                time.sleep(1.0)
                self._send(image_bytes(7, "JPEG"))
            elif self.path == "/flaky.jpg" and n == 1:
                self.send_error(503)
            elif self.path == "/page.html":
                self._send(b"<html>not an image</html>")
            else:
                self._send(image_bytes(int(self.path.strip("/").split(".")[0].replace("flaky", "5")), "JPEG"))
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _send(self, body: bytes):
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    _Handler.hits = {}
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_csv_manifest_with_paths_and_urls(tmp_path, server):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "local.png").write_bytes(image_bytes(1))
    rows = [("imgs/local.png", "a local picture"), (f"{server}/2.jpg", "a downloaded picture"),
            (f"{server}/missing.jpg", "gone"), (f"{server}/slow.jpg", "too slow"),
            (f"{server}/flaky.jpg", "works the second time"), (f"{server}/page.html", "a web page"),
            ("ftp://example.com/x.jpg", "wrong scheme"), ("imgs/absent.png", "no such file"), ("", "no image"),
            (f"{server}/3.jpg", 'a caption, with "quotes"')]
    with open(tmp_path / "data.csv", "w", newline="") as f:
        import csv
        w = csv.writer(f)
        w.writerow(["url", "caption"])
        w.writerows(rows)
    out = tmp_path / "out"
    ok(tmp_path / "data.csv", "--out", out, "--timeout", "0.2", "--retries", "1", "--retry-backoff", "0",
       "--workers", "1", "--size", "32", "--max-error-rate", "0.9")
    assert rejects(out) == {"000000002": "url-http-404", "000000003": "url-timeout", "000000005": "not-an-image",
                            "000000006": "url-bad-scheme", "000000007": "image-missing",
                            "000000008": "image-missing"}
    assert _Handler.hits["/slow.jpg"] == 2 and _Handler.hits["/flaky.jpg"] == 2 and _Handler.hits["/missing.jpg"] == 1
    kept = {r.key: r for s in ("train", "val") for r in records(out, s)}
    assert sorted(kept) == ["000000000", "000000001", "000000004", "000000009"]
    assert json.loads(kept["000000001"].members["json"])["url"] == f"{server}/2.jpg"
    assert kept["000000009"].members["txt"] == b'a caption, with "quotes"'


def test_tsv_and_jsonl_manifests_with_named_columns(tmp_path):
    for i in range(3):
        (tmp_path / f"p{i}.png").write_bytes(image_bytes(i))
    (tmp_path / "m.tsv").write_text("file\tdescription\n" + "".join(f"p{i}.png\tpicture {i}\n" for i in range(3)))
    ok(tmp_path / "m.tsv", "--out", tmp_path / "a", "--image-column", "file", "--caption-column", "description",
       "--size", "32")
    assert len(records(tmp_path / "a", "train")) + len(records(tmp_path / "a", "val")) == 3

    lines = [json.dumps({"key": f"sample-{i}", "img": f"p{i}.png", "alt": f"picture {i}"}).encode() for i in range(3)]
    lines[1] = b"{this is not json"
    lines.append(json.dumps({"key": "sample-0", "img": "p2.png", "alt": "same key again"}).encode())
    lines.append(b'{"key": "sample-9", "img": "p2.png", "alt": "caf\xe9 au lait"}')     # Latin-1, not UTF-8
    (tmp_path / "m.jsonl").write_bytes(b"\n".join(lines) + b"\n\n")
    ok(tmp_path / "m.jsonl", "--out", tmp_path / "b", "--image-column", "img", "--caption-column", "alt",
       "--size", "32", "--max-error-rate", "1")
    assert rejects(tmp_path / "b") == {"000000001": "manifest-bad-row", "sample-0": "duplicate-key",
                                       "sample-9": "caption-not-utf8"}

    result = cli(tmp_path / "m.tsv", "--out", tmp_path / "c", "--caption-column", "nope")
    assert result.exit_code == 2 and "no caption column 'nope'" in result.output and "description" in result.output


@pytest.mark.parametrize("name,content", [("m.csv", ""), ("m.tsv", "\n\n"), ("m.jsonl", "\n")])
def test_empty_manifest_is_named_as_empty(tmp_path, name, content):
    (tmp_path / name).write_text(content)
    result = cli(tmp_path / name, "--out", tmp_path / "out")
    assert result.exit_code == 2
    assert f"manifest {tmp_path / name} is empty" in one_line(result) and "no columns" not in result.output
    assert not (tmp_path / "out").exists()
    (tmp_path / "h.csv").write_text("image,caption\n")
    result = cli(tmp_path / "h.csv", "--out", tmp_path / "out")
    assert result.exit_code == 2 and "holds a header but no rows" in one_line(result)


# ---- webdataset input ---------------------------------------------------------------------------

def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_webdataset_keys_that_sanitise_alike_are_two_samples_and_repeats_are_duplicates(tmp_path):
    """`x y` and `x_y` in a tar are two samples (the second becomes `x_y_2`, as for file names); the same key in
    a second tar is a duplicate; a summary of more reject kinds than it lists says how many more."""
    src = tmp_path / "shards"
    src.mkdir()
    write_tar(src / "a.tar", [("x y.jpg", image_bytes(1, "JPEG")), ("x y.txt", b"a picture with a space"),
                              ("x_y.jpg", image_bytes(2, "JPEG")), ("x_y.txt", b"a picture with an underscore")])
    write_tar(src / "b.tar", [("x_y.jpg", image_bytes(3, "JPEG")), ("x_y.txt", b"the same key again"),
                              ("e.jpg", b""), ("e.txt", b"an empty image"), ("n.jpg", image_bytes(4, "JPEG")),
                              ("u.jpg", image_bytes(5, "JPEG")), ("u.txt", b"\xff\xfe not utf-8"),
                              ("t.jpg", image_bytes(6, "JPEG", (200, 40))), ("t.txt", b"a very wide picture")])
    result = ok(src, "--out", tmp_path / "out", "--val-fraction", "0", "--max-error-rate", "1", "--size", "32")
    kept = {r.key: r.members["txt"] for r in records(tmp_path / "out", "train")}
    assert kept == {"x_y": b"a picture with a space", "x_y_2": b"a picture with an underscore"}
    assert rejects(tmp_path / "out")["x_y_2"] == "duplicate-key"
    assert len(set(rejects(tmp_path / "out").values())) == 5 and "+1 more kinds (manifest.json)" in result.output


def test_webdataset_input_is_resharded_and_resized(tmp_path):
    src = tmp_path / "img2dataset"
    src.mkdir()
    boom = b"cos\nsystem\n(S'echo pwned'\ntR."                   # a pickle that must never be loaded
    members = []
    for i in range(5):
        key = f"00000{i:04d}"
        members += [(f"{key}.jpg", image_bytes(i, "JPEG", (120, 90))), (f"{key}.txt", f"shard picture {i}".encode()),
                    (f"{key}.json", json.dumps({"url": f"http://x/{i}.jpg", "key": key}).encode()),
                    (f"{key}.pyd", boom)]
    members += [("000009999.jpg", image_bytes(9, "JPEG"))]       # no caption
    write_tar(src / "00000.tar", members)
    write_tar(src / "00001.tar", [("000010000.png", image_bytes(10)), ("000010000.txt", b"from the second shard")])
    good = (src / "00001.tar").read_bytes()
    (src / "00002.tar").write_bytes(good[:1200].replace(b"000010000", b"000020000"))   # truncated
    (src / "00000_stats.json").write_text("{}")

    out = tmp_path / "out"
    ok(src, "--out", out, "--size", "48", "--per-shard", "2", "--val-fraction", "0", "--max-error-rate", "1")
    got = records(out, "train")
    assert [r.key for r in got] == [f"00000{i:04d}" for i in range(5)] + ["000010000"]
    assert [p.name for p in list_shards(out, "train")] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert all(set(r.members) == {"jpg", "txt", "json"} for r in got)
    assert Image.open(io.BytesIO(got[0].members["jpg"])).size == (48, 48)
    assert json.loads(got[2].members["json"])["url"] == "http://x/2.jpg"
    reasons = rejects(out)
    assert reasons["000009999"] == "caption-missing"
    assert "corrupt-shard" in reasons.values()


# ---- built-in renderers (fakes: the real ones have their own tests) -----------------------------

def fake_scene(i: int, size: int) -> Image.Image:
    img = Image.new("RGB", (size, size), "white")
    img.paste((230, 25, 25), (i % size, 0, i % size + 4, 4))
    return img


@pytest.fixture
def fake_shapes(monkeypatch):
    calls = []

    def iter_scenes(split, count, seed=0, size=64):
        calls.append((split, count, seed, size))
        for i in range(count):
            yield (f"shapes-{split}-{i:07d}", fake_scene(i, size), f"a red square number {i}",
                   {"objects": [{"color": "red"}], "relation": None, "template": 0, "split": split})

    monkeypatch.setitem(sys.modules, "dallecli.data.shapes", types.SimpleNamespace(iter_scenes=iter_scenes))
    return calls


def test_shapes_wiring(tmp_path, fake_shapes):
    run = tmp_path / "run"
    ok("--source", "shapes", "--count", "40", "--seed", "3", "--val-fraction", "0.25", "--run", run,
       "--per-shard", "16")
    assert fake_shapes == [("train", 30, 3, 64), ("val", 10, 3, 64)]
    folder = run / "shards"
    train, val = records(folder, "train"), records(folder, "val")
    assert len(train) == 30 and len(val) == 10
    assert all(r.key.startswith("shapes-val-") for r in val)
    meta = json.loads(val[0].members["json"])
    assert meta["split"] == "val" and meta["objects"] == [{"color": "red"}]
    img = Image.open(io.BytesIO(train[5].members["png"]))
    assert img.size == (64, 64) and img.tobytes() == fake_scene(5, 64).tobytes()      # lossless, untouched
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["arguments"]["source"]["count"] == 40 and manifest["counts"]["val"] == 10
    assert manifest["counts"]["upscaled"] == 0                  # rendered at --size: never upscaled


def test_emoji_wiring_and_missing_font(tmp_path, monkeypatch):
    calls = []

    def iter_emoji(font=None, size=64, skin_tones=False, flags=False):
        calls.append((font, size, skin_tones, flags))
        if font is not None and not Path(font).exists():
            raise UserError(f"emoji font not found at {font}")
        for i, name in enumerate(["ox", "red heart", "grinning face"]):
            yield f"emoji-{i:04x}", fake_scene(i, size), name, {"source": "emoji", "name": name}

    monkeypatch.setitem(sys.modules, "dallecli.data.emoji", types.SimpleNamespace(iter_emoji=iter_emoji))
    font = tmp_path / "Noto.ttf"
    font.write_bytes(b"fake font")
    ok("--source", "emoji", "--font", font, "--skin-tones", "--no-flags", "--size", "32", "--out", tmp_path / "e")
    assert calls == [(font.resolve(), 32, True, False)]
    kept = records(tmp_path / "e", "train") + records(tmp_path / "e", "val")
    assert sorted(r.members["txt"] for r in kept) == [b"grinning face", b"ox", b"red heart"]   # "ox": 1-char minimum

    result = cli("--source", "emoji", "--font", tmp_path / "missing.ttf", "--out", tmp_path / "m")
    assert result.exit_code == 2 and "emoji font not found" in result.output
    assert not (tmp_path / "m").exists()


# ---- command-line checks ------------------------------------------------------------------------

def test_source_inference_and_bad_combinations(tmp_path, fake_shapes):
    both = good_folder(tmp_path / "both", 2)
    write_tar(both / "x.tar", [("a.txt", b"x")])
    result = cli(both, "--out", tmp_path / "o1")
    assert result.exit_code == 2 and "pass --source" in result.output
    ok(both, "--source", "folder", "--out", tmp_path / "o1", "--size", "32")
    assert cli(tmp_path / "nothing", "--out", tmp_path / "o2").exit_code == 2
    (tmp_path / "notes.md").write_text("hi")
    result = cli(tmp_path / "notes.md", "--out", tmp_path / "o3")
    assert result.exit_code == 2 and "cannot tell what" in result.output
    result = cli(both, "--source", "shapes")
    assert result.exit_code == 2 and "drop the input path" in result.output
    assert cli("--out", tmp_path / "o4").exit_code == 2
    result = cli("--source", "manifest", "--out", tmp_path / "o5")
    assert result.exit_code == 2 and "needs an input path" in result.output


def test_rerun_is_a_no_op_different_arguments_are_refused(tmp_path):
    src = good_folder(tmp_path / "photos", 6)
    out = tmp_path / "out"
    ok(src, "--out", out, "--size", "32")
    before = folder_bytes(out)
    result = ok(src, "--out", out, "--size", "32", "--workers", "2")          # workers don't matter
    assert "already complete" in result.output and folder_bytes(out) == before
    result = cli(src, "--out", out, "--size", "48")
    assert result.exit_code == 2 and "different arguments" in result.output and "--overwrite" in result.output
    assert "size: 32 → 48" in result.output
    ok(src, "--out", out, "--size", "48", "--overwrite")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["arguments"]["prepare"]["image"]["size"] == 48

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "train-000000.tar").write_bytes(b"")
    result = cli(src, "--out", foreign)
    assert result.exit_code == 2 and "--overwrite" in result.output


def _bad_manifest(tmp_path: Path, problem: str) -> Path:
    """Six rows, none usable: captions the filters reject ("filtered") or images that are not there ("missing")."""
    for i in range(6):
        (tmp_path / f"m{i}.png").write_bytes(image_bytes(i))
    rows = [{"image": f"m{i}.png" if problem == "filtered" else f"gone{i}.png",
             "caption": "x" if problem == "filtered" else f"picture {i}"} for i in range(6)]
    (tmp_path / "bad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path / "bad.jsonl"


@pytest.mark.parametrize("problem,message", [("filtered", "no sample passed the filters"),
                                             ("missing", "4 of the first 4 inputs failed")])
def test_a_failed_overwrite_keeps_the_old_shards(tmp_path, problem, message):
    src, out = good_folder(tmp_path / "photos", 6), tmp_path / "out"
    ok(src, "--out", out, "--size", "32", "--per-shard", "2")
    before = files(out)
    result = cli(_bad_manifest(tmp_path, problem), "--out", out, "--size", "32", "--overwrite")
    assert result.exit_code == 2
    line = one_line(result)
    staged = out / ".unfinished" / "rejects.jsonl"
    assert message in line and f"see {staged}" in line and f"the shards in {out} are untouched" in line
    assert len(staged.read_text().splitlines()) == (6 if problem == "filtered" else 4)  # stopped once certain
    assert files(out) == before                                    # same files, same bytes
    assert "already complete" in ok(src, "--out", out, "--size", "32", "--per-shard", "2").output
    if problem == "missing":   # the failed build stays resumable (see the next test), and is not lost silently
        result = cli(tmp_path / "bad.jsonl", "--out", out, "--size", "48")
        assert result.exit_code == 2 and "holds an unfinished build with different arguments" in one_line(result)
    else:                      # nothing to resume: only rejects.jsonl was kept, the next build starts afresh
        assert sorted(p.name for p in (out / ".unfinished").iterdir()) == ["rejects.jsonl"]
        result = cli(tmp_path / "bad.jsonl", "--out", out, "--size", "32")
        assert result.exit_code == 2 and "was built with different arguments" in one_line(result)
    assert files(out) == before


def test_broken_inputs_that_sort_first_do_not_stop_a_mostly_good_build(tmp_path):
    """21 uncaptioned images sorting before 200 good ones (9.5% broken) stopped the build at its 20th input
    (100% > 50%) whatever --max-error-rate below 1: mid-build, the rate is judged from a quarter of the inputs."""
    src = tmp_path / "photos"
    src.mkdir()
    for i in range(21):
        (src / f"a_uncaptioned_{i:02d}.png").write_bytes(image_bytes(i))
    for i in range(200):
        (src / f"z_good_{i:03d}.png").write_bytes(image_bytes(100 + i))
        (src / f"z_good_{i:03d}.txt").write_text(f"picture {i}")
    result = ok(src, "--out", tmp_path / "out", "--workers", "1", "--size", "32")
    counts = json.loads((tmp_path / "out" / "manifest.json").read_text())["counts"]
    assert (counts["inputs"], counts["errors"], counts["train"] + counts["val"]) == (221, 21, 200), result.output
    # a lower limit is judged at a quarter of the inputs (21 of 55 = 38% > 30%), not after 20 ...
    bad = cli(src, "--out", tmp_path / "out2", "--workers", "1", "--size", "32", "--max-error-rate", "0.3")
    assert bad.exit_code == 2 and "21 of the first 55 inputs failed" in one_line(bad)
    # ... or at once where the end could not pass either (12 broken > 5% of 221)
    bad = cli(src, "--out", tmp_path / "out3", "--workers", "1", "--size", "32", "--max-error-rate", "0.05")
    assert bad.exit_code == 2 and "12 of the first 12 inputs failed" in one_line(bad)


def test_a_failed_error_rate_overwrite_resumes_and_then_replaces(tmp_path):
    src, out = good_folder(tmp_path / "photos", 6), tmp_path / "out"
    ok(src, "--out", out, "--size", "32")
    manifest = _bad_manifest(tmp_path, "filtered")
    with manifest.open("a") as f:
        f.write(json.dumps({"image": "gone.png", "caption": "picture"}) + "\n")
    args = ["--out", out, "--size", "32", "--min-caption-chars", "1"]
    assert cli(manifest, *args, "--overwrite", "--max-error-rate", "0.1").exit_code == 2
    assert json.loads((out / "manifest.json").read_text())["arguments"]["source"]["kind"] == "folder"
    ok(manifest, *args, "--max-error-rate", "0.5")                 # the same build, resumed, now installed
    assert json.loads((out / "manifest.json").read_text())["counts"]["inputs"] == 7
    assert not (out / ".unfinished").exists()
    assert {r.key for s in ("train", "val") for r in records(out, s)} == {f"{i:09d}" for i in range(6)}


def test_overwrite_replaces_the_shards_and_leaves_no_working_folder(tmp_path):
    src, out = good_folder(tmp_path / "photos", 12), tmp_path / "out"
    ok(src, "--out", out, "--size", "32", "--per-shard", "2", "--val-fraction", "0")
    assert "train-000005.tar" in files(out)
    (out / "notes.txt").write_text("mine")                          # not ours: left alone
    ok(src, "--out", out, "--size", "48", "--per-shard", "5", "--val-fraction", "0", "--overwrite")
    ok(src, "--out", tmp_path / "fresh", "--size", "48", "--per-shard", "5", "--val-fraction", "0")
    assert files(out) == {**files(tmp_path / "fresh"), "notes.txt": b"mine"}
    assert sorted(p.name for p in out.iterdir()) == sorted(files(out))      # no .unfinished, no stray file


@pytest.mark.parametrize("at", ["first", "manifest"])
def test_a_crash_while_installing_is_finished_by_the_next_run(tmp_path, monkeypatch, at):
    src, out = good_folder(tmp_path / "photos", 8), tmp_path / "out"
    args = ["--size", "32", "--per-shard", "3", "--val-fraction", "0"]
    ok(src, "--out", out, *args)
    ok(src, "--out", tmp_path / "ref", *args, "--dedup")
    real = os.replace

    def replace(a, b):
        if Path(a).parent.name == ".unfinished" and Path(b).parent == out and (at == "first" or
                                                                               Path(b).name == "manifest.json"):
            raise Crash()
        return real(a, b)

    with monkeypatch.context() as m:
        m.setattr(shards_mod.os, "replace", replace)
        assert isinstance(cli(src, "--out", out, *args, "--dedup", "--overwrite").exception, Crash)
    assert not (out / "manifest.json").exists()                    # never a manifest over a mix of shards
    result = ok(src, "--out", out, *args, "--dedup")
    assert "already complete" in result.output
    assert files(out) == files(tmp_path / "ref") and not (out / ".unfinished").exists()


# ---- resume -------------------------------------------------------------------------------------

class Crash(Exception):
    pass


def _crash_in_consume(monkeypatch, at: int):
    original, n = shards_mod._Build.consume, {"calls": 0}

    def consume(self, index, prepared):
        n["calls"] += 1
        if n["calls"] == at:
            raise Crash()
        return original(self, index, prepared)

    monkeypatch.setattr(shards_mod._Build, "consume", consume)


def _crash_before_state(monkeypatch, at: int):
    """Shard closed (end blocks written) but the state not yet updated."""
    original, n = shards_mod.ShardWriter.finish, {"calls": 0}

    def finish(self):
        n["calls"] += 1
        result = original(self)
        if n["calls"] == at:
            raise Crash()
        return result

    monkeypatch.setattr(shards_mod.ShardWriter, "finish", finish)


def _crash_before_rename(monkeypatch, at: int):
    """State records the shard as complete, the rename has not happened."""
    original, n = shards_mod._Build._finish_shard, {"calls": 0}

    def finish_shard(self, writer, next_input):
        n["calls"] += 1
        if n["calls"] != at:
            return original(self, writer, next_input)
        entry, partial = writer.finish()
        self.shards.append(entry)
        self.checkpoint(next_input)
        raise Crash()

    monkeypatch.setattr(shards_mod._Build, "_finish_shard", finish_shard)


@pytest.mark.parametrize("inject,at", [(_crash_in_consume, 19), (_crash_in_consume, 3),
                                       (_crash_before_state, 3), (_crash_before_rename, 2)])
def test_interrupted_run_resumes_to_identical_bytes(tmp_path, monkeypatch, inject, at):
    src = good_folder(tmp_path / "photos", 36)
    (src / "bad.png").write_bytes(b"garbage")
    (src / "bad.txt").write_text("caption")
    args = ["--size", "32", "--per-shard", "4", "--val-fraction", "0.3", "--workers", "1", "--dedup"]
    ok(src, "--out", tmp_path / "ref", *args)

    with monkeypatch.context() as m:
        inject(m, at)
        result = cli(src, "--out", tmp_path / "out", *args)
        assert isinstance(result.exception, Crash)
    assert not (tmp_path / "out" / "manifest.json").exists()
    result = ok(src, "--out", tmp_path / "out", *args)
    assert "done" in result.output
    assert folder_bytes(tmp_path / "out") == folder_bytes(tmp_path / "ref")


def test_resume_does_not_redo_complete_shards(tmp_path, monkeypatch):
    src = good_folder(tmp_path / "photos", 24)
    args = ["--size", "32", "--per-shard", "4", "--val-fraction", "0", "--workers", "1"]
    with monkeypatch.context() as m:
        _crash_in_consume(m, 15)
        assert isinstance(cli(src, "--out", tmp_path / "out", *args).exception, Crash)
    done = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out" / ".unfinished").glob("train-*.tar")}
    assert sorted(done) == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    seen = []
    original = workers_mod.prepare_batch
    monkeypatch.setattr(workers_mod, "prepare_batch", lambda b, c: seen.extend(i.key for i in b) or original(b, c))
    ok(src, "--out", tmp_path / "out", *args)
    assert seen[0] == "img012" and len(seen) == 12
    assert all((tmp_path / "out" / n).stat().st_mtime_ns == t for n, t in done.items())


@pytest.mark.slow
def test_kill_9_and_resume(tmp_path):
    src = good_folder(tmp_path / "photos", 400, fmt="JPEG", ext="jpg")
    args = [str(src), "--size", "64", "--per-shard", "20", "--workers", "2", "-q"]
    code = ("import sys, typer; from dallecli.commands.build_shards import command; a = typer.Typer(); "
            "a.command()(command); sys.argv = ['x'] + sys.argv[1:]; a()")
    ref = subprocess.run([sys.executable, "-c", code, *args, "--out", str(tmp_path / "ref")], capture_output=True)
    assert ref.returncode == 0, ref.stderr.decode()
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", code, *args, "--out", str(out)], start_new_session=True)
    deadline = time.time() + 60
    while not (out / ".unfinished" / "train-000002.tar").exists() and time.time() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists(), "finished before the kill; make the input bigger"
    again = subprocess.run([sys.executable, "-c", code, *args, "--out", str(out)], capture_output=True)
    assert again.returncode == 0, again.stderr.decode()
    assert folder_bytes(out) == folder_bytes(tmp_path / "ref")


def test_a_dying_worker_is_a_clear_error_and_the_run_resumes(tmp_path, monkeypatch):
    from dallecli.data import sources

    src = good_folder(tmp_path / "photos", 12)
    args = ["--out", tmp_path / "out", "--size", "32", "--workers", "2", "--per-shard", "4"]
    with monkeypatch.context() as m:
        m.setattr(sources, "process_image", lambda data, config: os._exit(1))   # forked workers inherit it
        result = cli(src, *args)
    assert result.exit_code == 2 and "worker process died" in result.output
    ok(src, *args)
    assert len(records(tmp_path / "out", "train") + records(tmp_path / "out", "val")) == 12


def test_summary_counts_read_in_the_right_number(tmp_path):
    src = good_folder(tmp_path / "photos", 4)
    (src / "zero.png").write_bytes(b"")
    (src / "zero.txt").write_text("an empty file")
    result = ok(src, "--out", tmp_path / "out", "--size", "32", "--val-fraction", "0", "--workers", "1")
    assert "1 (1 error)" in result.output and "1 errors" not in result.output
    assert re.search(r"4 samples in 1 shard\b(?!s)", result.output) and "0 samples in 0 shards" in result.output


def test_caption_files_with_an_upper_case_suffix_are_found(tmp_path):
    """Image suffixes were matched in any case (.JPG) but captions only as .txt: `upcap.TXT` was missing."""
    src = tmp_path / "photos"
    src.mkdir()
    for i, suffix in enumerate([".txt", ".TXT", ".Txt"]):
        (src / f"p{i}.JPG").write_bytes(image_bytes(i, "JPEG"))
        (src / f"p{i}{suffix}").write_text(f"picture number {i}")
    out = tmp_path / "out"
    ok(src, "--out", out, "--size", "32", "--val-fraction", "0")
    assert json.loads((out / "manifest.json").read_text())["counts"]["errors"] == 0
    assert sorted(r.members["txt"].decode() for r in records(out, "train")) == [f"picture number {i}" for i in range(3)]


def test_caption_names_come_from_the_folder_listing():
    from dallecli.data.listing import _caption_name

    names = {"a.b.jpg", "a.b.TXT", "c.png", "c.txt", "c.Txt"}
    assert _caption_name("a.b.jpg", names) == "a.b.TXT"   # only the last suffix is the image's
    assert _caption_name("c.png", names) == "c.txt"       # .txt first
    assert _caption_name("d.png", names) == "d.txt"       # none: the name the "missing" message gives


def test_a_rerun_over_changed_inputs_is_refused_not_skipped(tmp_path):
    """Adding images or editing a caption and rerunning said "already complete (nothing to do)" and kept the
    old shards; an unfinished build resumed by its position in a list that had changed."""
    src, out = good_folder(tmp_path / "photos", 6), tmp_path / "out"
    ok(src, "--out", out, "--size", "32")
    assert "already complete" in ok(src, "--out", out, "--size", "32").output   # nothing changed
    before = files(out)
    (src / "img100.png").write_bytes(image_bytes(100))
    (src / "img100.txt").write_text("one more picture")
    result = cli(src, "--out", out, "--size", "32")
    assert result.exit_code == 2 and "inputs changed" in one_line(result) and "6 → 7 images" in one_line(result)
    assert files(out) == before
    # an --overwrite over the changed inputs, interrupted, finishes on a rerun without --overwrite
    calls = []
    real_consume = shards_mod._Build.consume

    def consume_then_stop(self, index, prepared):
        calls.append(index)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_consume(self, index, prepared)

    shards_mod._Build.consume = consume_then_stop
    try:
        stopped = cli(src, "--out", out, "--size", "32", "--overwrite")
    finally:
        shards_mod._Build.consume = real_consume
    assert stopped.exit_code != 0 and files(out) == before and (out / ".unfinished" / ".build-state.json").exists()
    assert "done" in ok(src, "--out", out, "--size", "32").output  # the same arguments as the complete build
    assert json.loads((out / "manifest.json").read_text())["counts"]["inputs"] == 7
    ok(src, "--out", out, "--size", "32", "--overwrite")
    caption = src / "img002.txt"
    caption.write_text("an edited caption")
    os.utime(caption, ns=(caption.stat().st_atime_ns, caption.stat().st_mtime_ns + 10**9))
    result = cli(src, "--out", out, "--size", "32")
    assert result.exit_code == 2 and "some with other sizes or modification times" in one_line(result)


def test_a_run_folder_inside_the_input_folder_is_not_read(tmp_path, monkeypatch):
    """`dalle build-shards .` in a folder that holds its run read the run's sample PNGs as inputs (each one a
    missing caption, counting towards --max-error-rate)."""
    src = good_folder(tmp_path / "photos", 6)
    samples = src / "runs" / "default" / "samples" / "s1"
    samples.mkdir(parents=True)
    for i in range(3):
        (samples / f"000-00{i}.png").write_bytes(image_bytes(50 + i))
    (samples / "sampling.json").write_text("{}")
    monkeypatch.chdir(src)
    result = ok(".", "--size", "32")
    assert "not read as input: 1 folder written by dalle" in result.output
    counts = json.loads((src / "runs" / "default" / "shards" / "manifest.json").read_text())["counts"]
    assert (counts["inputs"], counts["errors"]) == (6, 0)
    # another run beside it (its shards and samples), and the run being the input folder itself (--run .)
    ok(".", "--size", "32", "--run", "runs/second")
    assert json.loads((src / "runs" / "second" / "shards" / "manifest.json").read_text())["counts"]["inputs"] == 6
    (src / "samples" / "s2").mkdir(parents=True)
    (src / "samples" / "s2" / "000-000.png").write_bytes(image_bytes(60))
    (src / "samples" / "s2" / "sampling.json").write_text("{}")
    ok(".", "--size", "32", "--run", ".")
    assert json.loads((src / "shards" / "manifest.json").read_text())["counts"]["inputs"] == 6


def test_a_semicolon_csv_and_a_csv_given_as_shards_say_what_they_are(tmp_path):
    src = good_folder(tmp_path / "photos", 3)
    (src / "list.csv").write_text("image;caption\n" + "".join(f"img{i:03d}.png;picture {i}\n" for i in range(3)))
    line = one_line(cli(src / "list.csv", "--out", tmp_path / "out", "--size", "32"))
    assert "seems to use ';' between columns" in line and "save it with ','" in line
    named = cli(src / "list.csv", "--image-column", "image", "--caption-column", "caption", "--out",
                tmp_path / "out", "--size", "32")
    assert "seems to use ';' between columns" in one_line(named)
    result = cli(src / "list.csv", "--source", "webdataset", "--out", tmp_path / "out2", "--size", "32")
    assert result.exit_code == 2 and "is not a tar file" in one_line(result)


def test_a_utf16_manifest_says_to_save_it_as_utf8(tmp_path):
    """A spreadsheet's 'Unicode text' export is UTF-16: said so, not read as garbled column names."""
    src = good_folder(tmp_path / "photos", 3)
    text = "image,caption\n" + "".join(f"img{i:03d}.png,picture {i}\n" for i in range(3))
    (src / "list.csv").write_bytes(text.encode("utf-16"))  # with its byte-order mark
    line = one_line(cli(src / "list.csv", "--out", tmp_path / "out", "--size", "32"))
    assert "is UTF-16 text" in line and "UTF-8" in line and "\x00" not in line
    (src / "list.csv").write_bytes(text.encode("utf-16-le"))  # without one
    assert "is UTF-16 text" in one_line(cli(src / "list.csv", "--out", tmp_path / "out", "--size", "32"))
    assert not (tmp_path / "out").exists()


def test_a_small_set_whose_val_split_came_out_empty_is_warned_and_later_errors_say_how_to_fix_it(tmp_path):
    from dallecli.data.loader import ShardIndex

    src = good_folder(tmp_path / "photos", 4)
    out = tmp_path / "out"
    result = ok(src, "--out", out, "--size", "32", "--val-fraction", "0.01")
    assert json.loads((out / "manifest.json").read_text())["counts"]["val"] == 0
    assert "no val samples: --val-fraction 0.01 of 4 images held none out" in " ".join(result.output.split())
    assert "--val-fraction 0.5 --overwrite" in " ".join(result.output.split())
    with pytest.raises(UserError, match="every sample went to train; rebuild the image shards with a larger "
                                        "--val-fraction"):
        ShardIndex(out, "val")
    (out / "manifest.json").write_text(json.dumps({"kind": "codes"}))  # a code folder: encode makes its shards
    with pytest.raises(UserError, match=r"then encode them again \(`dalle encode`\)"):
        ShardIndex(out, "val")
    for tar in out.glob("train-*.tar"):
        tar.unlink()
    with pytest.raises(UserError, match="no train shards in .*; make them with `dalle encode`"):
        ShardIndex(out, "train")


def test_a_duplicate_key_names_where_the_first_one_is():
    from dallecli.data.sources import Item, unique_keys

    items = [Item("k0", "a.tar:k0", b"", b""), Item("k0", "a.tar:k0", b"", b""), Item("k0", "b.tar:k0", b"", b"")]
    details = [None if i.reject is None else i.reject.detail for i in unique_keys(items)]
    assert details == [None, "key 'k0' already used earlier in the same shard", "key 'k0' already used by a.tar:k0"]


def test_a_rerank_ranking_written_into_the_input_folder_is_not_read(tmp_path):
    """`dalle rerank --images photos` writes samples.jsonl and ranked.png into photos/: a later build-shards
    of photos/ must not take ranked.png for an uncaptioned input (nor see the inputs as changed)."""
    src = good_folder(tmp_path / "photos", 4)
    ok(src, "--out", tmp_path / "out", "--size", "32")
    (src / "samples.jsonl").write_text('{"prompt": "x", "image": "img000.png"}\n')
    (src / "ranked.png").write_bytes(image_bytes(9))
    result = ok(src, "--out", tmp_path / "out", "--size", "32")
    assert "not read as input: 1 ranked.png written by dalle" in " ".join(result.output.split())
    counts = json.loads((tmp_path / "out" / "manifest.json").read_text())["counts"]
    assert (counts["inputs"], counts["errors"]) == (4, 0)
    (src / "samples.jsonl").unlink()  # a ranked.png of the user's own (no samples.jsonl beside it) is an input
    assert cli(src, "--out", tmp_path / "out2", "--size", "32").exit_code == 0
    assert json.loads((tmp_path / "out2" / "manifest.json").read_text())["counts"]["inputs"] == 5
