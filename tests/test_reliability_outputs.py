"""Reliability of what `dalle encode` and `dalle tokenize` write: a bad --out or a mismatched input is one
error line (exit 2) before anything is written; codes or a tokenizer that the run's prior was trained on
are replaced only with --overwrite; a replacement is staged, so a failed or interrupted one leaves the old
outputs whole (and a rerun resumes it); a failed encode leaves nothing behind."""
import json
import shutil

import pytest
import torch

from dallecli import checkpoint
from dallecli.config import to_dict
from tests.fixtures import cli
from tests.fixtures.runs import make_dvae_run


def dvae_config(size=16):
    from dallecli.models.dvae import DVAEConfig

    return DVAEConfig(image_size=size, n_hid=8, n_blk_per_group=1, groups=3, vocab_size=32, n_init=8)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """RUN/shards (16 px: two train shards, one val), three random dVAEs: dvae1 and dvae2 (16 px), dvae32."""
    from dallecli.models.dvae import DVAE

    torch.set_num_threads(1)
    run = make_dvae_run(tmp_path_factory.mktemp("outputs") / "run", n_train=8, n_val=4, per_shard=4, size=16)
    for name, seed, size in (("dvae1", 1, 16), ("dvae2", 2, 16), ("dvae32", 3, 32)):
        torch.manual_seed(seed)
        checkpoint.save(run / name, 1, kind="dvae", model_config=to_dict(dvae_config(size)),
                        weights=DVAE(dvae_config(size)).state_dict())
    return run


@pytest.fixture
def run(base, tmp_path):
    shutil.copytree(base, tmp_path / "run")
    return tmp_path / "run"


def fingerprint(folder):
    return checkpoint.load(folder, "dvae").fingerprint


def dalle(capfd, *args):
    """`dalle ARGS` in this process; --quiet of an earlier call in the same test does not carry over."""
    from dallecli.console import settings

    settings.quiet = settings.debug = False
    return cli.run_inprocess([*args], capfd)


def encode(run, capfd, *args):
    return dalle(capfd, "encode", "--run", run, *args)


def fake_prior(run, **meta):
    """A prior checkpoint whose meta says what it was trained on (all that encode and tokenize look at)."""
    checkpoint.save(run / "prior", 1, kind="prior", model_config={}, weights={"w": torch.zeros(1)}, meta=meta)


def snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def codes_of(run, out="codes"):
    return json.loads((run / out / "manifest.json").read_text())["dvae"]["fingerprint"]


# --- P4: --out is a file -------------------------------------------------------------------------------

def test_encode_out_is_a_file_is_one_line(run, capfd):
    target = run / "notes.txt"
    target.write_text("keep me")
    message = cli.one_error_line(encode(run, capfd, "--dvae", run / "dvae1", "--out", target))
    assert cli.matches(r"--out .*notes\.txt is a file, not a folder", message)
    assert target.read_text() == "keep me"


def test_encode_refuses_the_image_shards_or_foreign_shards_as_out(run, capfd):
    before = snapshot(run / "shards")
    message = cli.one_error_line(encode(run, capfd, "--dvae", run / "dvae1", "--out", run / "shards"))
    assert cli.matches(r"is the image shards folder; pass --out DIR", message)
    other = run / "other"
    shutil.copytree(run / "shards", other)
    message = cli.one_error_line(encode(run, capfd, "--dvae", run / "dvae1", "--out", other))
    assert cli.matches(r"already holds .*not made by `dalle encode`.*--overwrite", message)
    assert snapshot(run / "shards") == before == snapshot(other)


# --- P6a: codes of another dVAE --------------------------------------------------------------------------

def test_encode_refuses_to_replace_the_codes_a_prior_was_trained_on(run, capfd):
    assert encode(run, capfd, "--dvae", run / "dvae1", "-q").returncode == 0
    fp1, fp2 = fingerprint(run / "dvae1"), fingerprint(run / "dvae2")
    fake_prior(run, dvae_fingerprint=fp1, tokenizer_fingerprint="x")
    before = snapshot(run / "codes")
    message = cli.one_error_line(encode(run, capfd, "--dvae", run / "dvae2"))
    for pattern in (fp1, fp2, r"dvae1", r"dvae2", r"prior .*step-00000001 was trained on", "--out DIR",
                    "--overwrite"):
        assert cli.matches(pattern, message), (pattern, message)
    assert snapshot(run / "codes") == before
    # Either way out: another folder, or --overwrite (with a warning that the prior needs retraining).
    assert encode(run, capfd, "--dvae", run / "dvae2", "--out", run / "codes2", "-q").returncode == 0
    assert codes_of(run, "codes2") == fp2 and snapshot(run / "codes") == before
    result = encode(run, capfd, "--dvae", run / "dvae2", "--overwrite")
    assert result.returncode == 0, result.stderr
    assert cli.matches(r"warning: replacing the codes of dVAE " + fp1, result.stderr)
    assert codes_of(run) == fp2 and not (run / "codes" / ".stage").exists()
    assert snapshot(run / "codes") != before


def test_encode_replaces_codes_no_prior_uses(run, capfd):
    """A continued `train-dvae` then `encode` again is the normal flow: without a prior trained on the old
    codes (none, or one trained on other codes), they are replaced with an info line."""
    assert encode(run, capfd, "--dvae", run / "dvae1", "-q").returncode == 0
    result = encode(run, capfd, "--dvae", run / "dvae2")
    assert result.returncode == 0, result.stderr
    assert cli.matches(r"holds the codes of dVAE " + fingerprint(run / "dvae1"), result.stderr)
    assert codes_of(run) == fingerprint(run / "dvae2")
    fake_prior(run, dvae_fingerprint="0123456789abcdef")
    assert encode(run, capfd, "--dvae", run / "dvae1", "-q").returncode == 0
    assert codes_of(run) == fingerprint(run / "dvae1")
    assert sorted(p.name for p in (run / "codes").iterdir()) == [
        ".parts", "manifest.json", "train-000000.tar", "train-000001.tar", "val-000000.tar"]


def test_encode_again_with_the_same_dvae_keeps_the_codes(run, capfd):
    assert encode(run, capfd, "--dvae", run / "dvae1", "-q").returncode == 0
    fake_prior(run, dvae_fingerprint=fingerprint(run / "dvae1"))
    before = {p.name: p.stat().st_mtime_ns for p in (run / "codes").glob("*.tar")}
    assert encode(run, capfd, "--dvae", run / "dvae1", "-q").returncode == 0
    assert {p.name: p.stat().st_mtime_ns for p in (run / "codes").glob("*.tar")} == before


def test_a_rebuilt_image_shard_is_encoded_again(run, capfd):
    """Codes are reused only for the same source shard: after the images change (`build-shards --overwrite`
    with other data), encode with the same dVAE must not keep the stale codes."""
    assert encode(run, capfd, "--dvae", run / "dvae1", "-q").returncode == 0
    codes = run / "codes"
    assert (codes / "train-000000.tar").read_bytes() != (codes / "train-000001.tar").read_bytes()
    shutil.copyfile(run / "shards" / "train-000001.tar", run / "shards" / "train-000000.tar")
    assert encode(run, capfd, "--dvae", run / "dvae1", "-q").returncode == 0
    assert (codes / "train-000000.tar").read_bytes() == (codes / "train-000001.tar").read_bytes()


def test_codes_a_prior_was_trained_on_are_not_re_encoded_from_changed_shards(run, capfd):
    """The same dVAE, but the image shards changed (rebuilt with other data): the prior's codes stay unless
    --overwrite, as for another dVAE's codes."""
    assert encode(run, capfd, "--dvae", run / "dvae1", "-q").returncode == 0
    fake_prior(run, dvae_fingerprint=fingerprint(run / "dvae1"))
    before = snapshot(run / "codes")
    shutil.copyfile(run / "shards" / "train-000001.tar", run / "shards" / "train-000000.tar")
    message = cli.one_error_line(encode(run, capfd, "--dvae", run / "dvae1"))
    for pattern in (r"image shards in .*shards changed since .*codes was encoded \(train-000000\.tar\)",
                    r"prior .*step-00000001 was trained on", "--out DIR", "--overwrite"):
        assert cli.matches(pattern, message), (pattern, message)
    assert snapshot(run / "codes") == before
    result = encode(run, capfd, "--dvae", run / "dvae1", "--overwrite")
    assert result.returncode == 0, result.stderr
    assert cli.matches(r"warning: replacing the codes in .*the image shards changed", result.stderr)
    codes = run / "codes"
    assert (codes / "train-000000.tar").read_bytes() == (codes / "train-000001.tar").read_bytes()
    assert not (codes / ".stage").exists()
    assert encode(run, capfd, "--dvae", run / "dvae1", "-q").returncode == 0  # nothing changed since: kept


def test_codes_older_than_their_image_shards_are_found(run, capfd):
    """What `train-prior` warns about: RUN/codes encoded before RUN/shards were rebuilt."""
    from dallecli.codes import stale_codes

    assert stale_codes(run / "codes", run / "shards") == []  # no codes yet: nothing to say
    assert encode(run, capfd, "--dvae", run / "dvae1", "-q").returncode == 0
    assert stale_codes(run / "codes", run / "shards") == []
    shutil.copyfile(run / "shards" / "train-000001.tar", run / "shards" / "train-000000.tar")
    assert stale_codes(run / "codes", run / "shards") == ["train-000000.tar"]
    assert encode(run, capfd, "--dvae", run / "dvae1", "-q").returncode == 0  # no prior: encoded again
    assert stale_codes(run / "codes", run / "shards") == []


def test_interrupted_replacement_keeps_the_old_codes_and_resumes(run, capfd, monkeypatch):
    from dallecli import codes

    assert encode(run, capfd, "--dvae", run / "dvae1", "-q").returncode == 0
    before = snapshot(run / "codes")
    real, calls = codes.write_tar, []

    def interrupted_second_shard(path, records):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(path, records)

    monkeypatch.setattr(codes, "write_tar", interrupted_second_shard)
    assert encode(run, capfd, "--dvae", run / "dvae2", "-q").returncode == 130
    monkeypatch.undo()
    after = snapshot(run / "codes")
    assert {k: v for k, v in after.items() if not k.startswith(".stage/")} == before  # the old set is whole
    assert sorted(k for k in after if k.startswith(".stage/.parts/")) == [".stage/.parts/train-000000.tar.json"]
    result = encode(run, capfd, "--dvae", run / "dvae2")
    assert result.returncode == 0, result.stderr
    assert cli.matches(r"resuming the unfinished encode in .*\.stage: 1 of 3 shards already done", result.stderr)
    assert codes_of(run) == fingerprint(run / "dvae2") and not (run / "codes" / ".stage").exists()


def test_an_install_cut_short_is_finished_by_the_next_run(run, capfd, monkeypatch):
    from dallecli import codes

    assert encode(run, capfd, "--dvae", run / "dvae1", "-q").returncode == 0

    def crash():
        raise KeyboardInterrupt

    monkeypatch.setattr(codes, "install", lambda out: crash())
    assert encode(run, capfd, "--dvae", run / "dvae2", "-q").returncode == 130
    monkeypatch.undo()
    assert codes_of(run) == fingerprint(run / "dvae1")
    assert (run / "codes" / ".stage" / "manifest.json").is_file()  # complete, not yet moved in
    stamps = {p.name: p.stat().st_mtime_ns for p in (run / "codes" / ".stage").glob("*.tar")}
    assert encode(run, capfd, "--dvae", run / "dvae2", "-q").returncode == 0
    assert codes_of(run) == fingerprint(run / "dvae2") and not (run / "codes" / ".stage").exists()
    assert {p.name: p.stat().st_mtime_ns for p in (run / "codes").glob("*.tar")} == stamps  # not encoded twice


# --- P10: image size, --preview --------------------------------------------------------------------------

def test_encode_refuses_shards_of_another_image_size(run, capfd):
    message = cli.one_error_line(encode(run, capfd, "--dvae", run / "dvae32"))
    assert cli.matches(r"images in .*shards are 16 px but the dVAE .*dvae32.* expects 32 px", message)
    assert cli.matches(r"--size 32", message)
    assert not (run / "codes").exists()
    message = cli.one_error_line(encode(run, capfd, "--dvae", run / "dvae32", "--preview", 2))
    assert cli.matches(r"16 px but the dVAE .* expects 32 px", message)
    assert not (run / "dvae" / "preview").exists()


def test_encode_preview_must_be_positive(run, capfd):
    message = cli.one_error_line(encode(run, capfd, "--dvae", run / "dvae1", "--preview", -2))
    assert cli.matches(r"--preview must be .* at least 1 \(got -2\)", message)
    assert not (run / "dvae").exists()


# --- P11: a failed encode leaves nothing -----------------------------------------------------------------

def test_failed_encode_leaves_nothing_behind(run, tmp_path, capfd, monkeypatch):
    from dallecli import codes

    empty = tmp_path / "no-shards"
    empty.mkdir()
    message = cli.one_error_line(encode(run, capfd, "--dvae", run / "dvae1", "--shards", empty))
    assert cli.matches(r"no shards in", message)
    assert not (run / "codes").exists()

    def disk_full(path, records):
        raise codes.UserError(f"cannot write shard {path}: No space left on device")

    monkeypatch.setattr(codes, "write_tar", disk_full)
    assert cli.matches(r"No space left", cli.one_error_line(encode(run, capfd, "--dvae", run / "dvae1")))
    assert not (run / "codes").exists()


# --- P6b: tokenize -----------------------------------------------------------------------------------------

def tokenize(run, capfd, *args):
    return dalle(capfd, "tokenize", "--run", run, "--vocab-size", 300, *args)


def test_tokenize_refuses_to_replace_the_tokenizer_a_prior_was_trained_with(run, capfd):
    from dallecli.text import Tokenizer

    assert tokenize(run, capfd, "-q").returncode == 0
    old = Tokenizer.load(run / "tokenizer").fingerprint
    fake_prior(run, dvae_fingerprint="x", tokenizer_fingerprint=old)
    before = snapshot(run / "tokenizer")
    assert tokenize(run, capfd, "-q").returncode == 0  # the same tokenizer again: nothing changes
    assert snapshot(run / "tokenizer") == before
    message = cli.one_error_line(tokenize(run, capfd, "--vocab-size", 260))
    assert cli.matches(rf"holds tokenizer {old} that the prior .*step-00000001 was trained with", message)
    assert cli.matches(r"--overwrite", message)
    assert snapshot(run / "tokenizer") == before
    result = tokenize(run, capfd, "--vocab-size", 260, "--overwrite")
    assert result.returncode == 0, result.stderr
    assert cli.matches(r"warning: replaced the tokenizer .*train it again with --fresh", result.stderr)
    assert Tokenizer.load(run / "tokenizer").vocab_size == 260
    assert not [p for p in run.iterdir() if p.name.startswith(".tokenizer")]


def test_tokenize_replaces_a_tokenizer_no_prior_uses(run, capfd):
    from dallecli.text import Tokenizer

    assert tokenize(run, capfd, "-q").returncode == 0
    fake_prior(run, tokenizer_fingerprint="0123456789abcdef")
    result = tokenize(run, capfd, "--vocab-size", 260)
    assert result.returncode == 0, result.stderr
    assert cli.matches(r"replaced the tokenizer", result.stderr) and "warning" not in result.stderr
    assert Tokenizer.load(run / "tokenizer").vocab_size == 260


def test_tokenizer_save_failure_keeps_the_old_one(tmp_path, monkeypatch):
    import errno

    from dallecli import text
    from dallecli.console import UserError
    from tests.fixtures.runs import CAPTIONS

    old = text.train_tokenizer(CAPTIONS * 3, vocab_size=300)
    old.save(tmp_path / "tokenizer")
    new = text.train_tokenizer(CAPTIONS * 3, vocab_size=260)

    def enospc(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(text, "write_json_atomic", enospc)
    with pytest.raises(UserError, match=r"cannot write the tokenizer to .*No space left on device; the previous"):
        new.save(tmp_path / "tokenizer")
    monkeypatch.undo()
    assert text.Tokenizer.load(tmp_path / "tokenizer").fingerprint == old.fingerprint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer"]


def test_a_truncated_image_shard_says_how_many_samples_it_lost(run, capfd):
    """A shard cut short lost every sample after the damage, and the only sign was one reject ("skipped
    samples 1"): with the shard manifest's count, the warning says how many are gone."""
    shards = run / "shards"
    names = sorted(p.name for p in shards.glob("*.tar"))
    listed = [{"name": n, "split": n.split("-")[0], "count": 4} for n in names]
    (shards / "manifest.json").write_text(json.dumps({"shards": listed}))
    cut = shards / names[0]
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 3])
    result = encode(run, capfd, "--dvae", run / "dvae1")
    assert result.returncode == 0, result.stderr
    err = " ".join(result.stderr.split())
    assert cli.matches(r"corrupt or truncated tar.*; [1-4] of the 4 samples of this shard are lost", err), err
