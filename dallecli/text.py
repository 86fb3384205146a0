"""Caption text for the transformer (§2.2): lower-cased, byte-level BPE, BPE-dropout.

§2.2: "We lowercase the caption, BPE-encode it with a vocabulary of 16,384 and at most 256 tokens", and
App. B trains with BPE-dropout 0.1 (Provilkov et al., 2020). The BPE is a Hugging Face `tokenizers`
byte-level model, so every string encodes (no `<unk>`: any byte is a token) and decodes back exactly
to its normalised form.

Choices the paper leaves open, made here:
- Normalisation lives in the tokenizer's normalizer, so training, `encode` and `caption_stats` all see the
  same text: Unicode NFC (a composed and a decomposed "é" are one token sequence), every run of whitespace
  collapsed to one space, leading/trailing whitespace stripped, then lower-cased.
- Byte-level pre-tokenisation with a prefix space (GPT-2's split pattern): the first word of a caption
  gets the same tokens as that word anywhere else. `decode` drops the one leading space this adds.
- One special token, `<pad>` = id 0. The prior replaces it per position with its own learned padding
  embedding (§2.2); it never occurs inside an encoded caption (the literal text "<pad>" in a caption is
  encoded as ordinary bytes). The start-of-image token belongs to the prior's image vocabulary, not here;
  no `<unk>`, `<bos>` or `<eos>` is needed.
- BPE-dropout runs on separate `tokenizers` instances built with dropout at construction, one per rate,
  so the default (dropout 0) path is never mutated and stays deterministic.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import Iterable, Sequence

import tokenizers
import torch
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers

from dallecli.config import write_json_atomic
from dallecli.console import UserError

PAD = "<pad>"
SPECIAL_TOKENS = (PAD,)  # ids 0.. in this order
BYTE_ALPHABET = 256  # byte-level BPE starts from one token per byte
MIN_VOCAB = BYTE_ALPHABET + len(SPECIAL_TOKENS)
DROPOUT_DEFAULT = 0.1  # App. B: BPE-dropout rate during training
FORMAT = "dalle-tokenizer"
FORMAT_VERSION = 1


def _normalizer() -> normalizers.Normalizer:
    return normalizers.Sequence([
        normalizers.NFC(),
        normalizers.Replace(Regex(r"\s+"), " "),
        normalizers.Strip(),
        normalizers.Lowercase(),  # §2.2: "we lowercase the caption"
    ])


def _fingerprint(tokenizer_json: str) -> str:
    return hashlib.sha256(tokenizer_json.encode("utf-8")).hexdigest()[:16]


class Tokenizer:
    """A trained byte-level BPE with the project's normalisation, padding and dropout conventions.

    Build one with `train_tokenizer` or `Tokenizer.load(folder)`; ids are plain Python ints, batches
    LongTensors.
    """

    def __init__(self, tokenizer_json: str, max_len: int = 256, meta: dict | None = None):
        self._json = tokenizer_json
        self._tk = self._build(tokenizer_json, dropout=None)
        self._dropout_tk: dict[float, tokenizers.Tokenizer] = {}
        self.max_len = max_len
        self.meta = dict(meta or {})
        pad_id = self._tk.token_to_id(PAD)
        if pad_id is None:
            raise ValueError(f"tokenizer has no {PAD} token")
        self._pad_id = pad_id

    @staticmethod
    def _build(tokenizer_json: str, dropout: float | None) -> tokenizers.Tokenizer:
        """A fresh `tokenizers` instance; dropout is set at construction, and `ignore_merges` is off so that
        words already in the vocabulary are still split by the (dropped-out) merges."""
        data = json.loads(tokenizer_json)
        data["model"]["dropout"] = dropout
        data["model"]["ignore_merges"] = False
        tk = tokenizers.Tokenizer.from_str(json.dumps(data))
        tk.encode_special_tokens = True  # "<pad>" typed in a caption is text, never the pad id
        return tk

    def _for(self, dropout: float) -> tokenizers.Tokenizer:
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"BPE-dropout must be in [0, 1), got {dropout}")
        if dropout == 0.0:
            return self._tk
        if dropout not in self._dropout_tk:
            self._dropout_tk[dropout] = self._build(self._json, dropout=dropout)
        return self._dropout_tk[dropout]

    # -- properties -------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """The trained size, special tokens included (smaller than asked when the corpus ran out of merges)."""
        return self._tk.get_vocab_size(with_added_tokens=True)

    @property
    def pad_id(self) -> int:
        return self._pad_id

    @property
    def fingerprint(self) -> str:
        """First 16 hex digits of the SHA-256 of tokenizer.json: what a prior checkpoint records."""
        return _fingerprint(self._json)

    # -- encoding ---------------------------------------------------------------------------------------
    def normalize(self, text: str) -> str:
        """The caption as the BPE sees it (NFC, whitespace collapsed and stripped, lower-cased)."""
        return self._tk.normalizer.normalize_str(text)

    def encode(self, text: str, dropout: float = 0.0, rng=None) -> list[int]:
        """Token ids of one caption, no padding or truncation; an empty caption gives [].

        With `rng` (a numpy Generator) BPE-dropout draws from it, so training data is reproducible
        bit for bit (an exact resume needs that); without, the library's own unseeded dropout is used."""
        if rng is not None and dropout > 0.0:
            return self._encode_seeded(text, dropout, rng)
        return self._for(dropout).encode(text).ids

    def _encode_seeded(self, text: str, dropout: float, rng) -> list[int]:
        """BPE with dropout (Provilkov et al., 2020) from the trained merges, drawing from `rng`: at every
        merge step each applicable merge is skipped with probability `dropout`; the best-ranked of the
        rest is applied. With dropout 0 this is exactly the trained BPE."""
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"BPE-dropout must be in [0, 1), got {dropout}")
        if not hasattr(self, "_ranks"):
            model = json.loads(self._json)["model"]
            self._ranks = {tuple(m.split(" ")) if isinstance(m, str) else tuple(m): i
                           for i, m in enumerate(model["merges"])}
            self._vocab = model["vocab"]
        ids: list[int] = []
        for word, _ in self._tk.pre_tokenizer.pre_tokenize_str(self.normalize(text)):
            symbols = list(word)
            while len(symbols) > 1:
                best = None
                for i in range(len(symbols) - 1):
                    rank = self._ranks.get((symbols[i], symbols[i + 1]))
                    if rank is not None and (best is None or rank < best[0]) and rng.random() >= dropout:
                        best = (rank, i)
                if best is None:
                    break
                i = best[1]
                symbols[i: i + 2] = [symbols[i] + symbols[i + 1]]
            ids += [self._vocab[s] for s in symbols]
        return ids

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of ids; pad ids are skipped. decode(encode(x)) == normalize(x)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        text = self._tk.decode(list(ids), skip_special_tokens=True)
        return text[1:] if text.startswith(" ") else text  # the prefix space added before the first word

    def encode_batch(self, texts: Sequence[str], text_len: int,
                     dropout: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, list[bool]]:
        """Ids (B, text_len) right-padded with pad_id, lengths (B,) after truncation, and which captions
        were longer than text_len (cut to their first text_len tokens)."""
        if text_len < 1:
            raise ValueError(f"text_len must be positive, got {text_len}")
        rows = [enc.ids for enc in self._for(dropout).encode_batch(list(texts))]
        truncated = [len(row) > text_len for row in rows]
        rows = [row[:text_len] for row in rows]
        lengths = torch.tensor([len(row) for row in rows], dtype=torch.long)  # (B,)
        padded = [row + [self._pad_id] * (text_len - len(row)) for row in rows]
        ids = torch.tensor(padded, dtype=torch.long).reshape(len(rows), text_len)  # (B, T)
        return ids, lengths, truncated

    # -- files ------------------------------------------------------------------------------------------
    def config(self) -> dict:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "vocab_size": self.vocab_size,
            "pad_id": self.pad_id,
            "special_tokens": {t: self._tk.token_to_id(t) for t in SPECIAL_TOKENS},
            "lowercase": True,
            "normalizer": "NFC, whitespace runs -> one space, strip, lowercase",
            "max_len": self.max_len,
            "dropout_default": DROPOUT_DEFAULT,
            "fingerprint": self.fingerprint,
            "tokenizers_version": tokenizers.__version__,
            **self.meta,
        }

    def save(self, folder: Path) -> Path:
        """Write folder/tokenizer.json and folder/config.json (its fingerprint is checked against
        tokenizer.json on load) into a hidden folder beside it, then swap that in for `folder`, as
        checkpoints are saved: a crash never leaves the new tokenizer.json beside the old config.json."""
        folder = Path(folder)
        if folder.exists() and not folder.is_dir():
            raise UserError(f"{folder} is a file, not a folder; move it away to save the tokenizer there")
        tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
        old = folder.parent / f".{folder.name}.old-{os.getpid()}"
        try:
            folder.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            (tmp / "tokenizer.json").write_text(self._json, encoding="utf-8")
            write_json_atomic(tmp / "config.json", self.config())
            if folder.exists():
                os.replace(folder, old)
                try:
                    os.replace(tmp, folder)
                except OSError:
                    os.replace(old, folder)
                    raise
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, folder)
        except OSError as exc:
            kept = "the previous one is intact" if (folder / "config.json").is_file() else "nothing was saved"
            raise UserError(f"cannot write the tokenizer to {folder}: {exc.strerror or exc}; {kept}; "
                            "free space (or fix permissions) and rerun") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return folder

    @classmethod
    def load(cls, folder: Path) -> "Tokenizer":
        folder = Path(folder)
        tok_path, cfg_path = folder / "tokenizer.json", folder / "config.json"
        if not tok_path.is_file():
            raise UserError(f"no tokenizer at {folder} (tokenizer.json missing); make one with `dalle tokenize`")
        if not cfg_path.is_file():
            raise UserError(f"tokenizer at {folder} is incomplete (config.json missing); rerun `dalle tokenize`")
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
            missing = [k for k in ("vocab_size", "pad_id", "max_len", "fingerprint") if k not in cfg]
            if missing:
                raise ValueError(f"missing field(s) {', '.join(missing)}")
        except (ValueError, UnicodeDecodeError) as exc:
            raise UserError(f"tokenizer config {cfg_path} is corrupt ({_one_line(exc)}); "
                            "rerun `dalle tokenize`") from None
        try:
            text = tok_path.read_text(encoding="utf-8")
            meta = {k: v for k, v in cfg.items() if k not in _DERIVED}
            tok = cls(text, max_len=int(cfg["max_len"]), meta=meta)
        except Exception as exc:  # tokenizers raises plain Exception for malformed files
            raise UserError(f"tokenizer {tok_path} is corrupt ({_one_line(exc)}); rerun `dalle tokenize`") from None
        if tok.fingerprint != cfg["fingerprint"]:
            raise UserError(f"tokenizer.json in {folder} does not match its config.json (fingerprint "
                            f"{tok.fingerprint} vs {cfg['fingerprint']}); rerun `dalle tokenize`")
        if tok.vocab_size != cfg["vocab_size"] or tok.pad_id != cfg["pad_id"]:
            raise UserError(f"tokenizer at {folder}: vocab_size/pad_id in config.json ({cfg['vocab_size']}/"
                            f"{cfg['pad_id']}) disagree with tokenizer.json ({tok.vocab_size}/{tok.pad_id}); "
                            "rerun `dalle tokenize`")
        return tok


_DERIVED = {"format", "format_version", "vocab_size", "pad_id", "special_tokens", "lowercase", "normalizer",
            "max_len", "dropout_default", "fingerprint", "tokenizers_version"}


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__


def train_tokenizer(captions: Iterable[str], vocab_size: int = 16384, min_frequency: int = 2,
                    max_len: int = 256) -> Tokenizer:
    """Train the byte-level BPE on captions (normalised by the tokenizer itself). When the corpus has too
    few pairs occurring `min_frequency` times, the vocabulary stops short of `vocab_size`; the actual size is
    `Tokenizer.vocab_size` and `meta["requested_vocab_size"]` keeps what was asked."""
    if vocab_size < MIN_VOCAB:
        raise UserError(f"--vocab-size {vocab_size} is too small: a byte-level BPE needs at least {MIN_VOCAB} "
                        f"({BYTE_ALPHABET} bytes + {len(SPECIAL_TOKENS)} special)")
    if min_frequency < 1:
        raise UserError(f"--min-frequency must be at least 1, got {min_frequency}")
    tk = tokenizers.Tokenizer(models.BPE())
    tk.normalizer = _normalizer()
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),  # <pad> gets id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen or not
        show_progress=False,
    )
    counter = _Counting(captions)
    tk.train_from_iterator(counter, trainer)
    if counter.nonempty == 0:
        raise UserError("no captions to train the tokenizer on (all empty or none given)")
    meta = {"requested_vocab_size": vocab_size, "min_frequency": min_frequency, "captions": counter.count}
    return Tokenizer(tk.to_str(), max_len=max_len, meta=meta)


class _Counting:
    """An iterator over captions that counts them (the trainer consumes it inside Rust)."""

    def __init__(self, captions: Iterable[str]):
        self._it = iter(captions)
        self.count = 0
        self.nonempty = 0

    def __iter__(self) -> "_Counting":
        return self

    def __next__(self) -> str:
        text = next(self._it)
        self.count += 1
        self.nonempty += bool(text.strip())
        return text


def caption_stats(tokenizer: Tokenizer, captions: Sequence[str], max_len: int,
                  batch_size: int = 4096, also_over: Sequence[int] = ()) -> dict:
    """How the vocabulary fits the captions: share of the vocabulary used, tokens per caption (mean, 95th
    percentile by nearest rank, max), and the share of captions longer than max_len (a prior with that text
    length cuts them), and in "over" longer than each of `also_over` (other text lengths)."""
    lengths: list[int] = []
    used: set[int] = set()
    for start in range(0, len(captions), batch_size):
        for enc in tokenizer._tk.encode_batch(list(captions[start:start + batch_size])):
            lengths.append(len(enc.ids))
            used.update(enc.ids)
    n = len(lengths)
    ordered = sorted(lengths)
    return {
        "captions": n,
        "empty": sum(1 for k in lengths if k == 0),
        "vocab_used": len(used) / tokenizer.vocab_size,
        "tokens_mean": sum(lengths) / n if n else 0.0,
        "tokens_p95": ordered[max(0, math.ceil(0.95 * n) - 1)] if n else 0,
        "tokens_max": ordered[-1] if n else 0,
        "over_max_len": sum(1 for k in lengths if k > max_len) / n if n else 0.0,
        "over": {m: sum(1 for k in lengths if k > m) / n if n else 0.0 for m in also_over},
    }

