"""Reliability, item 7: nothing unpickles untrusted bytes. A crafted pickle that would create a sentinel
file is placed as checkpoint weights, EMA weights, training state, and as `.pyd` / `.pth` / `.pickle`
members inside shards; every load path refuses or ignores it and the sentinel never appears. A static
check covers every `torch.load`, pickle use and WebDataset decoder in dallecli/."""
import ast
import dataclasses
import re
import shutil
from pathlib import Path

import pytest
import torch

from dallecli import checkpoint
from dallecli.config import to_dict
from tests.fixtures import cli, tasks
from tests.fixtures.corrupt import code_fixture, image_fixture
from tests.fixtures.runs import evil_pickle, evil_torch_file, make_prior_run, write_code_manifest

PACKAGE = Path(__file__).resolve().parents[1] / "dallecli"
TRAIN = ["train-prior", "--preset", "tiny", "--precision", "fp32", "--steps", 2, "--batch-size", 4, "--text-len", 8, "--save-every", 1, "--eval-every", 0,
         "--quiet"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from dallecli.models.dvae import DVAE, DVAEConfig

    root = tmp_path_factory.mktemp("pickle")
    run = make_prior_run(root / "run", n_train=16, n_val=0, per_shard=8)
    assert cli.run_inprocess(TRAIN + ["--run", run]).returncode == 0
    torch.manual_seed(0)
    config = DVAEConfig(image_size=16, n_hid=8, n_blk_per_group=1, groups=3, vocab_size=64, n_init=8)
    checkpoint.save(run / "dvae", 5, kind="dvae", model_config=to_dict(config), weights=DVAE(config).state_dict())
    return run


PLANTS = {  # where the crafted bytes go, in the latest checkpoint
    "weights": ("model.safetensors", "pickle"),
    "ema_weights": ("ema.safetensors", "pickle"),
    "training_state_zip": ("training_state.pt", "torch"),
    "training_state_raw": ("training_state.pt", "pickle"),
}


@pytest.mark.parametrize("plant", sorted(PLANTS))
def test_resume_refuses_a_planted_pickle(base, tmp_path, capfd, plant):
    run = tmp_path / "run"
    shutil.copytree(base, run)
    sentinel = tmp_path / "pwned"
    name, kind = PLANTS[plant]
    target = checkpoint.latest(run / "prior") / name
    if kind == "torch":
        evil_torch_file(target, sentinel)
    else:
        target.write_bytes(evil_pickle(sentinel))
    message = cli.error_message(cli.run_inprocess(TRAIN + ["--run", run], capfd))
    assert cli.matches(re.escape(name), message)
    assert not sentinel.exists()


def test_sampler_and_encoder_refuse_planted_pickles(base, tmp_path, capfd):
    run = tmp_path / "run"
    shutil.copytree(base, run)
    sentinel = tmp_path / "pwned"
    (checkpoint.latest(run / "prior") / "ema.safetensors").write_bytes(evil_pickle(sentinel))
    (checkpoint.latest(run / "dvae") / "model.safetensors").write_bytes(evil_pickle(sentinel))
    result = cli.run_inprocess(["sample", "a red circle", "--run", run, "--n", 1], capfd)
    assert cli.matches("safetensors", cli.error_message(result))
    result = cli.run_inprocess(["encode", "--run", run, "--shards", run / "codes"], capfd)
    assert cli.matches("safetensors", cli.error_message(result))
    assert not sentinel.exists()


def test_pickled_shard_members_are_never_decoded(tmp_path):
    """`.pyd` / `.pth` / `.pickle` members beside good samples: training (prior and dVAE, with workers),
    `tokenize` and the record reader use the samples and never touch those members."""
    from dallecli.data.records import iter_records
    from dallecli.train.loop import train

    torch.set_num_threads(1)
    sentinel = tmp_path / "pwned"
    run = make_prior_run(tmp_path / "run", n_train=8, n_val=0, per_shard=8, grid=4, vocab=32)
    fx = code_fixture(tmp_path / "codes", 4, 32, sentinel)
    write_code_manifest(fx.folder, 4, 32)
    task = tasks.prior_task(run, codes=fx.folder, grid=4, vocab=32, batch_size=19, workers=2)
    cfg = dataclasses.replace(tasks.PRIOR_CFG, steps=2, eval_every=0)
    assert train(task, cfg, tmp_path / "prior").step == 2
    images = image_fixture(tmp_path / "shards", 16, sentinel)
    assert train(tasks.dvae_task(images.folder, size=16, batch_size=13), cfg, tmp_path / "dvae").step == 2
    for path in sorted(images.folder.glob("*.tar")):
        for record in iter_records(path, []):
            assert all(isinstance(v, bytes) for v in record.members.values())
    assert cli.run_inprocess(["tokenize", "--run", tmp_path, "--shards", images.folder, "--vocab-size", 300]
                             ).returncode == 0
    assert not sentinel.exists()


# --- static checks ------------------------------------------------------------------------------------

def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def _dotted(node) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    if isinstance(node, ast.Name):
        return node.id
    return "?"


def _keyword(call, name):
    return next((k.value for k in call.keywords if k.arg == name), None)


def _gated_by_trust_pickle(tree, call) -> bool:
    """The one sanctioned unpickling: inside a function taking `trust_pickle` that raises unless it is set."""
    for fn in ast.walk(tree):
        if isinstance(fn, ast.FunctionDef) and any(a.arg == "trust_pickle" for a in fn.args.args) \
                and fn.lineno <= call.lineno <= fn.end_lineno:
            for stmt in fn.body:
                if isinstance(stmt, ast.If) and ast.unparse(stmt.test) == "not trust_pickle" \
                        and any(isinstance(s, ast.Raise) for s in stmt.body):
                    return stmt.lineno < call.lineno
    return False


def _sources():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20
    return [(f, ast.parse(f.read_text(), filename=str(f))) for f in files]


def test_every_torch_load_is_weights_only():
    unsafe, gated = [], []
    for path, tree in _sources():
        for call in _calls(tree):
            name = _dotted(call.func)
            if name in ("torch.load", "load_checkpoint", "open_clip.load_checkpoint"):
                value = _keyword(call, "weights_only")
                where = f"{path.relative_to(PACKAGE.parent)}:{call.lineno}"
                if isinstance(value, ast.Constant) and value.value is True:
                    continue
                (gated if _gated_by_trust_pickle(tree, call) else unsafe).append(where)
    assert not unsafe, f"torch.load without weights_only=True: {unsafe}"
    # `dalle convert-dvae --trust-pickle` (OpenAI's pickled modules) is the only opt-in exception.
    assert [g.split(":")[0] for g in gated] in ([], ["dallecli/models/dvae_convert.py"]), gated


def test_no_other_unpickling_anywhere():
    found = []
    for path, tree in _sources():
        for call in _calls(tree):
            name = _dotted(call.func)
            where = f"{path.relative_to(PACKAGE.parent)}:{call.lineno}"
            if re.fullmatch(r"(pickle|cPickle|dill|joblib|_pickle)\.(load|loads|Unpickler)", name) \
                    or (name.endswith(("np.load", "numpy.load")) and isinstance(_keyword(call, "allow_pickle"), ast.Constant)
                        and _keyword(call, "allow_pickle").value) \
                    or name.endswith(("pd.read_pickle", "torch.serialization.load")):
                if not _gated_by_trust_pickle(tree, call):
                    found.append(f"{where} {name}")
    assert not found


WDS_HANDLERS = {"pil", "pilrgb", "pilrgba", "rgb", "rgb8", "rgba8", "l", "l8", "torch", "torchrgb", "torchrgb8",
                "torchl", "torchl8", "torchrgba", "numpy", "numpyrgb", "npy", "pyd", "pickle", "pth", "torchpil"}


def test_webdataset_decoding_excludes_pickle_formats():
    """dallecli reads shards with its own tar readers (data/records.py, data/loader.py), which return raw
    bytes and never decode members by extension. WebDataset's decoders would unpickle `.pyd`/`.pickle`
    (and torch.load `.pth`), so any use of them must name explicit, pickle-free handlers."""
    for path, tree in _sources():
        rel = path.relative_to(PACKAGE.parent)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                assert not any(n and n.split(".")[0] == "webdataset" for n in names), \
                    f"{rel}:{node.lineno} imports webdataset: check its decoders exclude pickle (.pyd/.pth/.pickle)"
        for call in _calls(tree):
            if isinstance(call.func, ast.Attribute) and call.func.attr in ("decode", "autodecode", "map_dict"):
                for arg in call.args:
                    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                        assert arg.value.lower() not in WDS_HANDLERS, f"{rel}:{call.lineno} decodes with {arg.value!r}"
    for reader in ("data/records.py", "data/loader.py"):
        tree = ast.parse((PACKAGE / reader).read_text())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
        assert not imported & {"pickle", "dill", "joblib", "webdataset"}, reader
        loads = {_dotted(c.func) for c in _calls(tree) if _dotted(c.func).endswith((".load", ".loads"))}
        assert loads <= {"json.loads", "im.load"}, (reader, loads)  # im: a PIL image
