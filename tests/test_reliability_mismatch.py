"""Reliability, item 6: a mismatch fails at once, before any training, as one `error:` message that names
the field, exit code 2 and no traceback — through the `dalle` entry point (in this process for speed;
the `slow` variant runs every case as a real subprocess)."""
import json
import shutil

import pytest

from dallecli import checkpoint
from dallecli.config import to_dict
from tests.fixtures import cli
from tests.fixtures.runs import CAPTIONS, make_prior_run

TRAIN = ["train-prior", "--preset", "tiny", "--precision", "fp32", "--steps", 2, "--batch-size", 4, "--text-len", 8, "--save-every", 1, "--eval-every", 0,
         "--quiet"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A run with a tokenizer, codes, a 2-step prior (resumable) and a tiny dVAE checkpoint."""
    import torch

    from dallecli.models.dvae import DVAE, DVAEConfig

    root = tmp_path_factory.mktemp("mismatch")
    run = make_prior_run(root / "run", n_train=16, n_val=0, per_shard=8)
    result = cli.run_inprocess(TRAIN + ["--run", run])
    assert result.returncode == 0
    torch.manual_seed(0)
    config = DVAEConfig(image_size=16, n_hid=8, n_blk_per_group=1, groups=3, vocab_size=32, n_init=8)
    checkpoint.save(run / "dvae", 5, kind="dvae", model_config=to_dict(config), weights=DVAE(config).state_dict())
    return run


def other_tokenizer(folder, same_size: bool):
    """Another vocabulary (one more caption → other merges, another size), or the same size with two merges
    swapped (same vocab_size, other tokens: only the fingerprint tells them apart)."""
    from dallecli.text import Tokenizer, train_tokenizer

    base = Tokenizer.load(folder)
    if same_size:
        data = json.loads((folder / "tokenizer.json").read_text())
        merges = data["model"]["merges"]
        merges[0], merges[1] = merges[1], merges[0]
        tok = Tokenizer(json.dumps(data), max_len=base.max_len)
        assert tok.vocab_size == base.vocab_size and tok.fingerprint != base.fingerprint
    else:
        tok = train_tokenizer(CAPTIONS * 3 + ["a purple triangle beside an orange hexagon"] * 3, vocab_size=300)
        assert tok.vocab_size != base.vocab_size
    shutil.rmtree(folder)
    tok.save(folder)


def edit_manifest(run, **dvae):
    path = run / "codes" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["dvae"].update(dvae)
    path.write_text(json.dumps(manifest))


def damage(run, name, how):
    path = checkpoint.latest(run / "prior") / name
    data = path.read_bytes()
    path.write_bytes(b"" if how == "empty" else data[: len(data) // 2])


# (case, how to break the run, extra arguments, what the message must name)
CASES = {
    "dvae_checkpoint_as_prior": (lambda run: None, ["--out", "{run}/dvae"], r"kind: dvae != prior"),
    "another_vocabulary": (lambda run: other_tokenizer(run / "tokenizer", same_size=False), [],
                           r"text_vocab: checkpoint \d+ != now \d+"),
    "another_tokenizer_same_size": (lambda run: other_tokenizer(run / "tokenizer", same_size=True), [],
                                    r"tokenizer_fingerprint mismatch"),
    "another_text_length": (lambda run: None, ["--text-len", "16"], r"text_len: checkpoint 8 != now 16"),
    "another_grid": (lambda run: edit_manifest(run, grid=4), [], r"grid: checkpoint 8 != now 4"),
    "another_image_vocab": (lambda run: edit_manifest(run, vocab_size=32), [], r"image_vocab: checkpoint 64 != now 32"),
    "codes_of_another_dvae": (lambda run: edit_manifest(run, fingerprint="fedcba9876543210"), [],
                              r"dvae_fingerprint mismatch.*fedcba9876543210"),
    "zero_byte_weights": (lambda run: damage(run, "model.safetensors", "empty"), [],
                          r"model\.safetensors.*|empty \(0 bytes\).*model\.safetensors"),
    "truncated_weights": (lambda run: damage(run, "model.safetensors", "cut"), [],
                          r"corrupt or truncated.*model\.safetensors|model\.safetensors.*corrupt or truncated"),
    "truncated_ema": (lambda run: damage(run, "ema.safetensors", "cut"), [], r"ema\.safetensors"),
    "zero_byte_training_state": (lambda run: damage(run, "training_state.pt", "empty"), [],
                                 r"training state is empty \(0 bytes\).*training_state\.pt"),
    "truncated_training_state": (lambda run: damage(run, "training_state.pt", "cut"), [],
                                 r"training_state\.pt is corrupt or truncated"),
    "zero_byte_config": (lambda run: damage(run, "config.json", "empty"), [], r"checkpoint config is not valid JSON.*config\.json"),
}


def prepare(base, tmp_path, case):
    run = tmp_path / "run"
    shutil.copytree(base, run)
    breaker, extra, pattern = CASES[case]
    breaker(run)
    before = sorted(p.name for p in (run / "prior").iterdir())
    args = TRAIN + ["--run", run] + [a.format(run=run) for a in extra]
    return run, args, pattern, before


def check(result, run, pattern, before):
    message = cli.error_message(result)
    assert cli.matches(pattern, message), message
    assert sorted(p.name for p in (run / "prior").iterdir()) == before  # failed before training anything


@pytest.mark.parametrize("case", sorted(CASES))
def test_mismatch_is_one_clear_error(base, tmp_path, capfd, case):
    run, args, pattern, before = prepare(base, tmp_path, case)
    check(cli.run_inprocess(args, capfd), run, pattern, before)


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_mismatch_is_one_clear_error_in_a_subprocess(base, tmp_path, case):
    run, args, pattern, before = prepare(base, tmp_path, case)
    check(cli.run(args, timeout=120), run, pattern, before)


def test_a_rerun_without_the_first_runs_options_continues_the_run(base, tmp_path, capfd):
    """`train-prior --preset tiny --batch-size 4 --text-len 8 --steps 2`, then `train-prior --steps 3`: the rerun
    used the default preset (small) and was refused ("the model differs"), and would have trained on at
    another batch size. Options left out now default to the run's own."""
    run = tmp_path / "run"
    shutil.copytree(base, run)
    result = cli.run_inprocess(["train-prior", "--run", run, "--precision", "fp32", "--steps", 3, "--save-every", 1,
                                "--eval-every", 0, "--quiet"], capfd)
    assert result.returncode == 0, result.stderr[-2000:]
    assert checkpoint.load(run / "prior", "prior").step == 3
    assert json.loads((run / "prior" / "train_config.json").read_text())["batch_size"] == 4
    # the schedule, EMA, seed, accumulation and caption dropouts are the run's own too
    first = ["train-prior", "--run", run, "--fresh", "--preset", "tiny", "--precision", "fp32", "--steps", 2,
             "--batch-size", 4, "--global-batch", 8, "--text-len", 8, "--save-every", 1, "--eval-every", 0,
             "--schedule", "plateau", "--ema-decay", 0.5, "--seed", 7, "--cond-drop", 0, "--bpe-dropout", 0, "--quiet"]
    assert cli.run_inprocess(first, capfd).returncode == 0
    result = cli.run_inprocess(["train-prior", "--run", run, "--precision", "fp32", "--steps", 3, "--quiet"], capfd)
    assert result.returncode == 0, result.stderr[-2000:]
    saved = json.loads((run / "prior" / "train_config.json").read_text())
    assert {k: saved[k] for k in ("schedule", "ema_decay", "seed", "grad_accum", "batch_size")} == {
        "schedule": "plateau", "ema_decay": 0.5, "seed": 7, "grad_accum": 2, "batch_size": 4}
    meta = checkpoint.load(run / "prior", "prior").meta
    assert (meta["cond_drop"], meta["bpe_dropout"]) == (0.0, 0.0)
    # without --steps, a rerun goes on to the run's own --steps (here: done), not to the preset's default
    result = cli.run_inprocess(["train-prior", "--run", run, "--precision", "fp32"], capfd)
    assert result.returncode == 0 and checkpoint.load(run / "prior", "prior").step == 3
    # an explicit option still wins (and a changed model is still refused)
    result = cli.run_inprocess(["train-prior", "--run", run, "--preset", "small", "--steps", 4, "--quiet"], capfd)
    assert result.returncode == 2 and "the model differs" in cli.error_message(result)


def test_a_dvae_rerun_without_its_preset_continues_the_run(tmp_path, capfd):
    from tests.fixtures.runs import make_dvae_run

    run = make_dvae_run(tmp_path / "run", n_train=8, n_val=0, per_shard=8, size=64)
    common = ["--run", run, "--precision", "fp32", "--save-every", 1, "--eval-every", 0, "--quiet"]
    first = cli.run_inprocess(["train-dvae", "--preset", "tiny", "--steps", 1, "--batch-size", 2, "--lr", 3e-4]
                              + common, capfd)
    assert first.returncode == 0, first.stderr[-2000:]
    again = cli.run_inprocess(["train-dvae", "--steps", 2] + common, capfd)  # 64 px alone would pick tiny-vq
    assert again.returncode == 0, again.stderr[-2000:]
    assert checkpoint.load(run / "dvae", "dvae").step == 2
    saved = json.loads((run / "dvae" / "train_config.json").read_text())
    assert (saved["batch_size"], saved["lr"]) == (2, 3e-4)


def test_sampler_and_encoder_refuse_the_wrong_kind_and_another_dvae(base, tmp_path, capfd):
    """The other load paths: `sample` given a dVAE as the prior or a dVAE the prior was not trained on,
    `encode` given a prior as the dVAE."""
    run = tmp_path / "run"
    shutil.copytree(base, run)
    result = cli.run_inprocess(["sample", "a red circle", "--run", run, "--prior", run / "dvae", "--n", 1], capfd)
    assert cli.matches(r"kind: dvae != prior", cli.error_message(result))
    result = cli.run_inprocess(["sample", "a red circle", "--run", run, "--n", 1], capfd)
    assert cli.matches(r"dvae_fingerprint mismatch", cli.error_message(result))
    result = cli.run_inprocess(["encode", "--run", run, "--dvae", run / "prior", "--shards", run / "codes"], capfd)
    assert cli.matches(r"kind: prior != dvae", cli.error_message(result))


def test_a_checkpoint_whose_config_was_edited_is_one_clear_error(base, tmp_path, capfd):
    """config.json says 2× the codes its weights have: torch's size-mismatch RuntimeError was a traceback."""
    import json

    run = tmp_path / "run"
    shutil.copytree(base, run)
    config_path = checkpoint.latest(run / "dvae") / "config.json"
    config = json.loads(config_path.read_text())
    config["model"]["vocab_size"] *= 2
    config_path.write_text(json.dumps(config))
    result = cli.run_inprocess(["encode", "--run", run, "--preview", 1], capfd)
    assert cli.matches(r"the weights do not fit the dvae its config\.json describes \(size mismatch",
                       cli.error_message(result))


def test_ctrl_c_again_during_the_clean_up_is_ignored():
    """Ctrl-C pressed several times during start-up ended in a traceback from the clean-up (exit handlers)
    that the first one started: after the first, SIGINT is ignored until the process ends."""
    import subprocess
    import sys

    code = ("import os, signal, time\n"
            "from dallecli import cli\n"
            "cli._terminate_as_exit()\n"
            "try:\n"
            "    os.kill(os.getpid(), signal.SIGINT); time.sleep(1)\n"
            "except KeyboardInterrupt:\n"
            "    os.kill(os.getpid(), signal.SIGINT); time.sleep(0.2)\n"
            "    print('clean-up finished')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          preexec_fn=cli.default_sigint)
    assert done.returncode == 0 and done.stdout.strip() == "clean-up finished", done.stderr[-2000:]


def test_error_is_one_line_when_piped(capfd):
    from dallecli.console import print_error

    print_error("dvae_fingerprint mismatch: " + "a long explanation " * 10)
    assert len(capfd.readouterr().err.strip().splitlines()) == 1


@pytest.mark.parametrize("args, message", [
    (["sample", "--fresh"], "No such option: --fresh (see 'dalle sample --help')"),
    (["train-dvae", "--steps", "abc"], "Invalid value for '--steps'"),
    (["build-shards", "--count", "0"], "Invalid value for '--count'"),
    (["no-such-command"], "No such command 'no-such-command' (see 'dalle --help')"),
    (["build-shards", "--source", "shapes", "--size", "100"], "--size 100: the shapes world renders at 32, 64"),
    (["sample", "x", "--seed", "99999999999999999999"], "--seed must be between 0 and 2**62"),
    (["sample", "x", "--name", "../../escape"], "--name '../../escape' is not usable"),
    (["train-prior", "--text-len", "0"], "--text-len must be at least 1"),
    (["eval", "--temperature", "nan", "--features", "clip"], "--temperature must be a finite number"),
])
def test_bad_flags_are_one_line_errors(args, message, capfd):
    """click's usage errors, through the entry point: one `error:` line naming the command's --help, exit 2."""
    result = cli.run_inprocess(args, capfd)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr


def test_help_and_version_still_exit_0(capfd):
    assert cli.run_inprocess(["--version"], capfd).returncode == 0
    shown = cli.run_inprocess(["sample", "--help"], capfd)
    assert shown.returncode == 0 and "--overwrite" in shown.stdout
    wide = cli.run_inprocess(["train-prior", "--help"], capfd)  # every option name whole, even the longest
    assert "--checkpoint-activations / --no-checkpoint-activations" in wide.stdout and "…" not in wide.stdout
    bare = cli.run_inprocess([], capfd)  # `dalle` alone: the help, exit 2 as before
    assert bare.returncode == 2 and "train-prior" in bare.stdout + bare.stderr
