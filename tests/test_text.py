"""The caption tokenizer (dallecli/text.py) and `dalle tokenize` (dallecli/commands/tokenize.py)."""
from __future__ import annotations

import hashlib
import io
import json
import random
import tarfile
import unicodedata

import pytest
import torch
import typer
from PIL import Image
from typer.testing import CliRunner

from dallecli.commands.tokenize import command
from dallecli.console import UserError, settings
from dallecli.text import Tokenizer, caption_stats, train_tokenizer

WORDS = ("a the red blue green yellow cat dog bird sits runs flies on under beside mat tree house big small "
         "emoji face with tears of joy smiling heart-eyes grinning crème brûlée café naïve façade 🐱 🐶 ❤️").split()


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    caps = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 10))]
        words = [w.upper() if rng.random() < 0.1 else w.capitalize() if rng.random() < 0.2 else w for w in words]
        caps.append(" ".join(words))
    return caps


def reference_normalize(text: str) -> str:
    """An independent statement of the normalisation: NFC, whitespace collapsed and stripped, lower-cased."""
    return " ".join(unicodedata.normalize("NFC", text).split()).lower()


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer(corpus(), vocab_size=600, min_frequency=2, max_len=16)


@pytest.fixture(autouse=True)
def _console(monkeypatch):
    # `start(quiet, debug)` sets process-wide flags; keep each test's own.
    monkeypatch.setattr(settings, "quiet", False)
    monkeypatch.setattr(settings, "debug", False)


ROUND_TRIP = [
    "A red cat sits on the mat",
    "  Multiple   spaces\tand\nnewlines  ",
    "Crème Brûlée at the CAFÉ, naïve façade",
    "Cafe\u0301 with a decomposed accent",  # NFD "é" becomes the composed one
    "face with tears of joy 😂 and 🐱🐶",
    "smiling face with heart-eyes ❤️ (U+2764 U+FE0F)",
    "日本語のキャプション",
    "an unseen word: xylophone-zebra_42!",
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip_gives_the_normalised_caption(tok, text):
    expected = reference_normalize(text)
    assert tok.normalize(text) == expected
    ids = tok.encode(text)
    assert ids and all(isinstance(i, int) and 0 < i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == expected
    assert tok.decode(torch.tensor(ids)) == expected


def test_lower_casing_and_whitespace_are_applied_by_encode(tok):
    assert tok.encode("A RED Cat") == tok.encode("a red cat")
    assert tok.encode("  a \t red\n\ncat ") == tok.encode("a red cat")
    assert tok.encode("CAFÉ") == tok.encode("café") == tok.encode("cafe\u0301")


def test_frequent_words_are_merged(tok):
    assert len(tok.encode("the cat")) == 2  # " the", " cat": learned merges, prefix space included
    assert tok.encode("cat")[0] == tok.encode("the cat")[1]  # the first word tokenises like any other


def test_pad_and_empty(tok):
    assert tok.pad_id == 0
    assert tok.encode("") == [] and tok.encode(" \n\t ") == []
    ids = tok.encode("a cat <pad> here")  # the literal text is bytes, never the pad id
    assert tok.pad_id not in ids
    assert tok.decode(ids) == "a cat <pad> here"
    assert tok.decode([tok.pad_id] + tok.encode("a cat") + [tok.pad_id] * 3) == "a cat"


def test_encode_batch_pads_and_truncates(tok):
    long = " ".join(["green bird"] * 20)
    texts = ["a red cat", "", long]
    ids, lengths, truncated = tok.encode_batch(texts, text_len=8)
    assert ids.shape == (3, 8) and ids.dtype == torch.long and lengths.dtype == torch.long
    short = tok.encode("a red cat")
    assert lengths.tolist() == [len(short), 0, 8]
    assert truncated == [False, False, True]
    assert ids[0, :len(short)].tolist() == short
    assert (ids[0, len(short):] == tok.pad_id).all() and (ids[1] == tok.pad_id).all()
    assert ids[2].tolist() == tok.encode(long)[:8]
    exact = tok.encode_batch(["a red cat"], text_len=len(short))
    assert exact[2] == [False] and exact[1].tolist() == [len(short)]


def test_dropout_varies_and_default_is_deterministic(tok):
    text = "a big green bird flies under the small yellow house"
    base = tok.encode(text)
    for _ in range(20):  # warm whatever cache the library keeps for the default path
        assert tok.encode(text) == base
    dropped = [tuple(tok.encode(text, dropout=0.1)) for _ in range(60)]
    assert len(set(dropped)) > 1, "BPE-dropout had no effect (cache?)"
    assert all(tok.decode(list(d)) == text for d in dropped)
    assert sum(len(d) for d in dropped) / len(dropped) > len(base)  # dropped merges -> more, smaller pieces
    assert [tok.encode(text) for _ in range(5)] == [base] * 5  # dropout did not leak into the default path
    batches = {tuple(tok.encode_batch([text], text_len=32, dropout=0.1)[0][0].tolist()) for _ in range(30)}
    assert len(batches) > 1
    assert tok.encode_batch([text], text_len=32)[0][0, :len(base)].tolist() == base
    with pytest.raises(ValueError):
        tok.encode(text, dropout=1.0)


def test_save_load_round_trip(tok, tmp_path):
    folder = tok.save(tmp_path / "tokenizer")
    raw = (folder / "tokenizer.json").read_bytes()
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["fingerprint"] == hashlib.sha256(raw).hexdigest()[:16] == tok.fingerprint
    assert cfg["vocab_size"] == tok.vocab_size and cfg["pad_id"] == 0 and cfg["lowercase"] is True
    assert cfg["max_len"] == 16 and cfg["dropout_default"] == 0.1
    assert cfg["requested_vocab_size"] == 600 and cfg["captions"] == 400
    loaded = Tokenizer.load(folder)
    assert loaded.fingerprint == tok.fingerprint and loaded.vocab_size == tok.vocab_size
    assert loaded.max_len == 16 and loaded.meta["requested_vocab_size"] == 600
    for text in ROUND_TRIP:
        assert loaded.encode(text) == tok.encode(text)
    assert torch.equal(loaded.encode_batch(ROUND_TRIP, 12)[0], tok.encode_batch(ROUND_TRIP, 12)[0])
    assert json.loads((loaded.save(tmp_path / "again") / "config.json").read_text()) == cfg


def test_training_is_deterministic():
    a = train_tokenizer(corpus(200, seed=1), vocab_size=400)
    b = train_tokenizer(corpus(200, seed=1), vocab_size=400)
    assert a.fingerprint == b.fingerprint


def test_load_errors(tok, tmp_path):
    with pytest.raises(UserError, match="dalle tokenize"):
        Tokenizer.load(tmp_path / "nowhere")
    folder = tok.save(tmp_path / "t")
    good = (folder / "tokenizer.json").read_text()

    (folder / "tokenizer.json").write_text(good[: len(good) // 2])  # truncated
    with pytest.raises(UserError, match="corrupt.*dalle tokenize") as info:
        Tokenizer.load(folder)
    assert "\n" not in str(info.value)

    edited = json.loads(good)
    edited["model"]["merges"] = edited["model"]["merges"][:-1]  # valid, but not the trained one
    (folder / "tokenizer.json").write_text(json.dumps(edited))
    with pytest.raises(UserError, match="does not match its config.json"):
        Tokenizer.load(folder)

    (folder / "tokenizer.json").write_text(good)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="config.*corrupt.*dalle tokenize"):
        Tokenizer.load(folder)
    (folder / "config.json").unlink()
    with pytest.raises(UserError, match="config.json missing"):
        Tokenizer.load(folder)


def test_small_corpus_gives_a_smaller_vocabulary():
    small = train_tokenizer(["a cat", "a dog", "a cat"], vocab_size=16384, min_frequency=2)
    assert 257 <= small.vocab_size < 300
    assert small.config()["requested_vocab_size"] == 16384
    assert small.config()["vocab_size"] == small.vocab_size


def test_train_refuses_bad_inputs():
    with pytest.raises(UserError, match="too small"):
        train_tokenizer(["a cat"], vocab_size=200)
    with pytest.raises(UserError, match="no captions"):
        train_tokenizer(["", "  "], vocab_size=300)


def test_caption_stats(tok):
    caps = ["the cat", "the cat", "", " ".join(["green bird"] * 20)]
    lengths = [len(tok.encode(c)) for c in caps]
    stats = caption_stats(tok, caps, max_len=10)
    assert stats["captions"] == 4 and stats["empty"] == 1
    assert stats["tokens_mean"] == pytest.approx(sum(lengths) / 4)
    assert stats["tokens_p95"] == stats["tokens_max"] == max(lengths) > 10
    assert stats["over_max_len"] == pytest.approx(0.25)
    longer = caption_stats(tok, caps, max_len=10, also_over=[0, 10_000])["over"]
    assert longer[0] == pytest.approx(1 - stats["empty"] / len(caps)) and longer[10_000] == 0
    used = {i for c in caps for i in tok.encode(c)}
    assert stats["vocab_used"] == pytest.approx(len(used) / tok.vocab_size)


# -- the command --------------------------------------------------------------------------------------

def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def write_shard(path, captions: list[str], start: int = 0) -> None:
    png = _png()
    with tarfile.open(path, "w") as tar:
        for i, caption in enumerate(captions, start):
            key = f"{i:08d}"
            for ext, data in (("txt", caption.encode("utf-8")), ("png", png),
                              ("json", json.dumps({"caption": caption}).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def cli() -> typer.Typer:
    app = typer.Typer()
    app.command("tokenize")(command)

    @app.callback()
    def _root() -> None:  # a callback keeps "tokenize" a named subcommand, as in the real app
        pass

    return app


def test_command_end_to_end(tmp_path):
    caps = corpus(300, seed=3)
    shards = tmp_path / "run" / "shards"
    shards.mkdir(parents=True)
    write_shard(shards / "train-000000.tar", caps[:150])
    write_shard(shards / "train-000001.tar", caps[150:], start=150)
    write_shard(shards / "val-000000.tar", ["zzzz qqqq only in val"] * 50, start=1000)
    result = CliRunner().invoke(cli(), ["tokenize", "--run", str(tmp_path / "run"), "--vocab-size", "500",
                                        "--max-len", "8", "--quiet"])
    assert result.exit_code == 0, result.output
    folder = tmp_path / "run" / "tokenizer"
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["captions"] == 300 and cfg["max_len"] == 8 and cfg["requested_vocab_size"] == 500
    tok = Tokenizer.load(folder)
    assert tok.fingerprint in result.output
    assert "vocabulary used" in result.output and "longer than 8" in result.output
    assert "300 from 2 train" in result.output
    expected = caption_stats(tok, caps, 8)
    assert f"p95 {expected['tokens_p95']}" in result.output
    assert f"{100 * expected['over_max_len']:.2f} %" in result.output
    assert "zzzz" not in tok.decode(range(tok.vocab_size))  # val captions were not trained on
    assert tok.decode(tok.encode(caps[0])) == reference_normalize(caps[0])


def test_command_with_shards_flag_and_missing_shards(tmp_path):
    result = CliRunner().invoke(cli(), ["tokenize", "--run", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert "dalle build-shards" in result.output and "Traceback" not in result.output

    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(cli(), ["tokenize", "--run", str(tmp_path / "run"), "--shards", str(empty)])
    assert result.exit_code == 2 and "dalle build-shards" in result.output

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    write_shard(elsewhere / "train-000000.tar", corpus(100, seed=4))
    result = CliRunner().invoke(cli(), ["tokenize", "--run", str(tmp_path / "run"), "--shards", str(elsewhere),
                                        "--vocab-size", "400", "--quiet"])
    assert result.exit_code == 0, result.output
    assert Tokenizer.load(tmp_path / "run" / "tokenizer").config()["captions"] == 100


def test_seeded_bpe_dropout_is_reproducible_and_exact_without_dropout():
    """The training path draws BPE-dropout from a seeded generator: same seed, same ids (exact resume needs it);
    at dropout → 0 it is exactly the trained BPE."""
    import numpy as np

    from dallecli.text import train_tokenizer

    captions = [f"a {c} {s} above a {c2} circle" for c in ("red", "green", "blue") for s in ("square", "cross")
                for c2 in ("yellow", "purple")] + ["grinning face with big eyes", "Curaçao café naïve"]
    tok = train_tokenizer(captions * 4, vocab_size=400)
    for caption in captions:
        assert tok._encode_seeded(caption, 1e-12, np.random.default_rng(0)) == tok.encode(caption)
    a = tok.encode(captions[0], dropout=0.3, rng=np.random.default_rng(7))
    b = tok.encode(captions[0], dropout=0.3, rng=np.random.default_rng(7))
    assert a == b and tok.decode(a) == tok.normalize(captions[0])
    variants = {tuple(tok.encode(captions[0], dropout=0.3, rng=np.random.default_rng(s))) for s in range(20)}
    assert len(variants) > 3
