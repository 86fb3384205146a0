"""The checkpoint module: atomic saves, completion markers, "latest", pruning, no unpickling."""
import os
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch

from dallecli import checkpoint
from dallecli.console import UserError


def _save(root, step, kind="dvae", keep=None, **kw):
    weights = {"w": torch.full((3, 2), float(step)), "b": torch.arange(4.0)}
    return checkpoint.save(root, step, kind=kind, model_config={"width": 2}, weights=weights,
                           training_state={"step": step, "rng": torch.get_rng_state()}, keep=keep, **kw)


def test_save_load_round_trip(tmp_path):
    ema = {"w": torch.ones(3, 2), "b": torch.zeros(4)}
    path = _save(tmp_path, 10, ema=ema, meta={"note": "x"})
    assert path.name == "step-00000010"
    assert sorted(p.name for p in path.iterdir()) == [
        "DONE", "config.json", "ema.safetensors", "model.safetensors", "training_state.pt"]
    ck = checkpoint.load(tmp_path, "dvae")
    assert ck.step == 10 and ck.model_config == {"width": 2} and ck.meta == {"note": "x"}
    assert torch.equal(ck.weights(ema=False)["w"], torch.full((3, 2), 10.0))
    assert torch.equal(ck.weights()["w"], torch.ones(3, 2))  # EMA by default
    assert ck.training_state()["step"] == 10
    assert len(ck.fingerprint) == 16


def test_tied_weights_are_saved(tmp_path):
    shared = torch.randn(4, 4)
    checkpoint.save(tmp_path, 1, kind="prior", model_config={}, weights={"a": shared, "b": shared})
    w = checkpoint.load(tmp_path, "prior").weights()
    assert torch.equal(w["a"], w["b"])


def test_latest_is_highest_complete_step_not_mtime(tmp_path):
    _save(tmp_path, 5)
    _save(tmp_path, 20)
    _save(tmp_path, 10)  # newest on disk, not the highest step
    incomplete = tmp_path / "step-00000030"
    incomplete.mkdir()
    (incomplete / "config.json").write_text("{}")  # no DONE marker: does not exist for readers
    assert checkpoint.latest(tmp_path).name == "step-00000020"
    with pytest.raises(UserError, match="incomplete"):
        checkpoint.load(incomplete, "dvae")


def test_prune_keeps_newest(tmp_path):
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, keep=2)
    assert [s for s, _ in checkpoint.complete_steps(tmp_path)] == [3, 4]
    with pytest.raises(UserError):
        checkpoint.prune(tmp_path, 0)


def test_failed_save_leaves_latest_intact(tmp_path, monkeypatch):
    _save(tmp_path, 1, keep=1)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.torch, "save", boom)
    with pytest.raises(OSError):
        _save(tmp_path, 2, keep=1)
    monkeypatch.undo()
    assert checkpoint.latest(tmp_path).name == "step-00000001"
    assert not any(p.name.startswith(".tmp") for p in tmp_path.iterdir())
    assert checkpoint.load(tmp_path, "dvae").step == 1


def test_kill_during_save_leaves_latest_intact(tmp_path):
    """A process killed half-way through a save (SIGKILL) leaves the previous checkpoint as latest."""
    _save(tmp_path, 1)
    script = textwrap.dedent(f"""
        import os, signal, torch
        from dallecli import checkpoint
        real = torch.save
        def dying_save(obj, path):
            real(obj, path)
            os.kill(os.getpid(), signal.SIGKILL)  # after the weights, before DONE
        torch.save = dying_save
        checkpoint.save({str(tmp_path)!r}, 2, kind="dvae", model_config={{}},
                        weights={{"w": torch.zeros(2)}}, training_state={{"step": 2}})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode == -9
    assert checkpoint.latest(tmp_path).name == "step-00000001"
    # The dead process's temporary folder is cleaned by the next prune.
    _save(tmp_path, 3, keep=5)
    assert not any(p.name.startswith(".tmp") for p in tmp_path.iterdir())


def test_wrong_kind_is_one_clear_error(tmp_path):
    _save(tmp_path, 1, kind="dvae")
    with pytest.raises(UserError, match=r"is a dvae checkpoint, but a prior checkpoint was expected"):
        checkpoint.load(tmp_path, "prior")


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(UserError, match="dalle train-prior"):
        checkpoint.load(tmp_path / "nope", "prior")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no complete dvae checkpoint"):
        checkpoint.load(tmp_path / "empty", "dvae")


def test_zero_byte_and_truncated_weights(tmp_path):
    path = _save(tmp_path, 1)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="corrupt or truncated") as err:
        checkpoint.load(tmp_path, "dvae").weights(ema=False)
    assert "delete that step folder" in str(err.value) and "\n" not in str(err.value)  # one line, with the fix
    (path / "model.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="empty"):
        checkpoint.load(tmp_path, "dvae").weights(ema=False)


class _Evil:
    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


def test_training_state_never_unpickles_code(tmp_path):
    path = _save(tmp_path, 1)
    sentinel = tmp_path / "pwned"
    with open(path / "training_state.pt", "wb") as f:
        pickle.dump({"x": _Evil(sentinel)}, f)
    with pytest.raises(UserError, match="refusing to load"):
        checkpoint.load(tmp_path, "dvae").training_state()
    assert not sentinel.exists()
    # torch.save's zip format with a malicious object is refused the same way.
    torch.save({"x": _Evil(sentinel)}, path / "training_state.pt")
    with pytest.raises(UserError, match="refusing to load"):
        checkpoint.load(tmp_path, "dvae").training_state()
    assert not sentinel.exists()


def test_pickle_as_weights_is_refused(tmp_path):
    path = _save(tmp_path, 1)
    sentinel = tmp_path / "pwned"
    with open(path / "model.safetensors", "wb") as f:
        pickle.dump(_Evil(sentinel), f)
    with pytest.raises(UserError):
        checkpoint.load(tmp_path, "dvae").weights(ema=False)
    assert not sentinel.exists()


def test_resave_same_step_replaces(tmp_path):
    _save(tmp_path, 7)
    checkpoint.save(tmp_path, 7, kind="dvae", model_config={"width": 3}, weights={"w": torch.zeros(1)})
    assert checkpoint.load(tmp_path, "dvae").model_config == {"width": 3}
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000007"]


def test_weights_files_get_the_mode_of_every_other_file(tmp_path):
    """safetensors made model.safetensors and ema.safetensors 0600 while config.json was 0644."""
    import stat

    path = checkpoint.save(tmp_path, 1, kind="prior", model_config={}, weights={"w": torch.zeros(2)},
                           ema={"w": torch.zeros(2)})
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in path.iterdir()}
    assert modes["model.safetensors"] == modes["ema.safetensors"] == modes["config.json"], modes


def test_fingerprint_covers_the_shape():
    t = torch.arange(6.0)
    assert checkpoint.weights_fingerprint({"w": t}) != checkpoint.weights_fingerprint({"w": t.view(2, 3)})
