"""Per-resblock gradient scaling (§2.4, App. D): exactness, overflow, underflow, the scale schedule."""
import copy
import dataclasses
import math

import pytest
import torch

from dallecli.models.prior import PriorConfig, PriorTransformer, prior_loss
from dallecli.train.precision import ResblockScaler

CONFIG = PriorConfig(text_vocab=32, text_len=4, image_vocab=16, grid=3, d_model=32, n_layers=2, n_heads=2)


@pytest.fixture(autouse=True)
def one_thread():
    """Micro models gain nothing from threads, and on a shared CPU a second thread mostly waits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
N_BRANCHES = 2 * CONFIG.n_layers  # attention and MLP branch of each layer


def make_model(seed=0):
    torch.manual_seed(seed)
    return PriorTransformer(CONFIG).train()


def make_batch(B=4):
    g = torch.Generator().manual_seed(1)
    return (torch.randint(1, CONFIG.text_vocab, (B, CONFIG.text_len), generator=g),
            torch.randint(0, CONFIG.image_vocab, (B, CONFIG.image_len), generator=g))


def backward(model, loss_factor=1.0, fp16=False):
    text, image = make_batch()
    with torch.autocast("cpu", dtype=torch.float16, enabled=fp16):
        loss, _ = prior_loss(*model(text, image), text, image, CONFIG.pad_id)
    (loss * loss_factor).backward()


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def poison(model, branch):
    """Put an Inf into a parameter gradient of residual branch `branch` (its last module's first parameter)."""
    first, last = model.residual_branches()[branch]
    p = next(last.parameters())
    p.grad = torch.zeros_like(p)
    p.grad.view(-1)[0] = math.inf


def test_scaled_gradients_equal_plain_gradients_in_fp32():
    plain = make_model()
    backward(plain)
    model = make_model()
    scaler = ResblockScaler()
    scaler.wrap(model)
    backward(model)
    scaled = grads(model)
    assert scaled["blocks.1.mlp.c_fc.weight"].abs().max() > 1000 * plain.blocks[1].mlp.c_fc.weight.grad.abs().max()
    assert scaler.unscale_(model) is True
    for name, g in grads(plain).items():
        assert torch.allclose(model.get_parameter(name).grad, g, rtol=1e-5, atol=1e-9), name
    # the embeddings and heads (outside every branch) are never scaled
    assert torch.equal(scaled["image_head.weight"], plain.image_head.weight.grad)


def test_checkpointed_blocks_work_with_the_scaler():
    plain = make_model()
    backward(plain)
    torch.manual_seed(0)
    model = PriorTransformer(dataclasses.replace(CONFIG, checkpoint_activations=True)).train()
    scaler = ResblockScaler()
    scaler.wrap(model)
    backward(model)
    assert scaler.unscale_(model)
    for name, g in grads(plain).items():
        assert torch.allclose(model.get_parameter(name).grad, g, rtol=1e-5, atol=1e-9), name


def test_underflow_in_fp16_is_rescued_by_the_scales():
    reference = make_model()
    backward(reference, loss_factor=1e-6)  # fp32: tiny but representable gradients
    unscaled = make_model()
    backward(unscaled, loss_factor=1e-6, fp16=True)  # fp16 branches, no scaling: gradients flush to zero
    model = make_model()
    scaler = ResblockScaler()
    scaler.wrap(model)
    backward(model, loss_factor=1e-6, fp16=True)
    assert scaler.unscale_(model)
    name = "blocks.1.mlp.c_fc.weight"
    ref = reference.get_parameter(name).grad

    def rel_err(g):
        return ((g - ref).norm() / ref.norm()).item()
    assert rel_err(unscaled.get_parameter(name).grad) > 0.5
    assert rel_err(model.get_parameter(name).grad) < 0.02


def test_overflow_is_filtered_flagged_and_backed_off():
    model = make_model()
    scaler = ResblockScaler(init_exp=24)
    scaler.wrap(model)  # scale 2^24 and a large loss overflow fp16 (max 65504)
    backward(model, loss_factor=1e3, fp16=True)
    finite = scaler.unscale_(model)
    assert finite is False and any(scaler.found)
    # the filter zeroed Inf/NaN before they reached the fp32 residual stream: the embeddings stay finite
    assert torch.isfinite(model.text_embed.weight.grad).all() and torch.isfinite(model.image_row.grad).all()
    before = list(scaler.scales)
    scaler.update(finite)
    for flagged, old, new in zip(scaler.found, before, scaler.scales):
        assert new == (old / math.sqrt(2) if flagged else old)


def test_activation_filter_isolates_one_branch():
    model = make_model()
    scaler = ResblockScaler()
    scaler.wrap(model)
    # an Inf appears inside the MLP of layer 1 (branch 3) during backward
    def inject(module, args, out):
        out.register_hook(lambda g: torch.full_like(g, math.inf))

    handle = model.blocks[1].mlp.c_fc.register_forward_hook(inject)
    backward(model)
    handle.remove()
    assert scaler._flags.tolist() == [False, False, False, True]
    assert torch.isfinite(model.blocks[0].attn.c_attn.weight.grad).all()  # earlier branches unharmed
    assert scaler.unscale_(model) is False
    assert scaler.found == [False, False, False, True]


def test_scales_grow_after_clean_steps_and_clamp():
    scaler = ResblockScaler(multiplier=4)
    scaler.wrap(make_model())
    assert scaler.scales == [4 * 2.0 ** 13] * N_BRANCHES
    for _ in range(1000):
        scaler.update(True)
    assert scaler.scales[0] == pytest.approx(4 * 2.0 ** 14, rel=1e-9)
    state = scaler.state_dict()
    state["scales"] = [4 * 2.0 ** 24 / 2 ** (1 / 2000)] * N_BRANCHES
    scaler.load_state_dict(state)
    scaler.update(True)
    scaler.update(True)
    assert scaler.scales == [4 * 2.0 ** 24] * N_BRANCHES  # clamped at M·2^24


def test_backoff_at_most_once_per_125_steps_and_clamped():
    model = make_model()
    scaler = ResblockScaler(init_exp=9)
    scaler.wrap(model)  # 2^9 → floor 2^7 after four divisions by √2
    trajectory = [list(scaler.scales)]
    for _ in range(520):
        poison(model, branch=2)
        assert scaler.unscale_(model) is False
        scaler.update(False)
        model.zero_grad()
        trajectory.append(list(scaler.scales))
    drops = [k for k in range(1, len(trajectory)) if trajectory[k][2] < trajectory[k - 1][2]]
    assert drops[:4] == [1, 126, 251, 376] and set(drops) <= {1, 126, 251, 376, 501}
    assert trajectory[1][2] == 2.0 ** 9 / math.sqrt(2)  # the first non-finite step backs off at once
    assert trajectory[-1][2] == 2.0 ** 7 and min(t[2] for t in trajectory) == 2.0 ** 7  # clamped at M·2^7
    assert all(t[i] == 2.0 ** 9 for t in trajectory for i in (0, 1, 3))  # skipped steps grow nothing
    assert scaler.steps == 520


def test_skipped_step_changes_nothing():
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = ResblockScaler()
    scaler.wrap(model)
    for inject in (False, True):
        backward(model, fp16=True)
        if inject:
            poison(model, branch=1)
            weights, opt_state = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
        finite = scaler.unscale_(model)
        if finite:
            optimizer.step()
        scaler.update(finite)
        optimizer.zero_grad()
    assert finite is False
    for name, value in model.state_dict().items():
        assert torch.equal(value, weights[name]), name
    after = optimizer.state_dict()
    for key, state in opt_state["state"].items():
        for field, value in state.items():
            assert torch.equal(after["state"][key][field], value)


def test_protocol_errors_and_state_round_trip():
    model = make_model()
    scaler = ResblockScaler()
    scaler.wrap(model)
    backward(model)
    scaler.unscale_(model)
    with pytest.raises(RuntimeError, match="already called"):
        scaler.unscale_(model)
    scaler.update(True)
    other = ResblockScaler()
    other.load_state_dict(scaler.state_dict())
    other.wrap(make_model())
    assert other.scales == scaler.scales and other.steps == 1
    with pytest.raises(ValueError, match="residual branches"):
        other.load_state_dict({"scales": [1.0], "last_backoff": [0], "steps": 0})
    scaler.unwrap()
    model.zero_grad()
    backward(model)
    assert not scaler._flags.any()  # unwrapped: no hooks, nothing scaled


def test_the_training_loop_protocol():
    """train/loop.py calls scale → backward → unscale_(optimizer) → finite(model) → update."""
    from dallecli.train.precision import per_resblock_scaling

    scaler, wrap = per_resblock_scaling(world_size=2)
    model = wrap(make_model())
    assert isinstance(model, PriorTransformer) and scaler.scales[0] == 2 * 2.0 ** 13
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    text, image = make_batch()
    loss, _ = prior_loss(*model(text, image), text, image, CONFIG.pad_id)
    assert scaler.scale(loss) is loss
    loss.backward()
    scaled = model.blocks[0].mlp.c_fc.weight.grad.clone()
    scaler.unscale_(optimizer)
    assert torch.allclose(model.blocks[0].mlp.c_fc.weight.grad * scaler.scales[2], scaled)
    assert scaler.finite(model) is True
    scaler.update(True)
    scaler.load_state_dict({})  # a checkpoint without scaler state keeps the current scales
    assert scaler.steps == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_finds_every_kind_of_bad_value(dtype, bad):
    from dallecli.train.precision import nonfinite

    clean = [torch.randn(7, 5, dtype=dtype), torch.zeros(0, dtype=dtype), torch.randn(3, dtype=dtype) * 1e4]
    assert not bool(nonfinite(clean)) and not bool(nonfinite([])) and not bool(nonfinite([torch.zeros(0)]))
    for position in range(35):  # anywhere in a tensor, among others
        tensors = [t.clone() for t in clean]
        tensors[0].view(-1)[position] = bad
        assert bool(nonfinite(tensors)), position
