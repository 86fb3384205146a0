"""The discrete VAE (§2.1, App. A): architecture, objective, schedules, VQ restarts, OpenAI conversion."""
from __future__ import annotations

import math
import sys
import types
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import typer
from typer.testing import CliRunner

from dallecli import checkpoint
from dallecli.config import from_dict, to_dict
from dallecli.console import UserError
from dallecli.models.dvae import DVAE, PRESETS, DVAEConfig, VectorQuantizer, count_parameters
from dallecli.models.dvae_objective import (
    DVAESchedule,
    codebook_perplexity,
    cosine,
    elbo_loss,
    gaussian_nll,
    gumbel_softmax,
    kl_to_uniform,
    logit_laplace_nll,
    map_pixels,
    pixel_nll,
    unmap_pixels,
    used_fraction,
)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


# --- architecture -----------------------------------------------------------------------------------------

def test_paper_preset_has_the_released_sizes():
    config = PRESETS["paper"]
    assert (config.image_size, config.grid, config.vocab_size) == (256, 32, 8192)
    with torch.device("meta"):
        model = DVAE(config)
        x = torch.empty(2, 3, 256, 256)
        assert model.encode_logits(x).shape == (2, 8192, 32, 32)
        assert model(x, tau=1.0).stats.shape == (2, 6, 256, 256)
    assert round(count_parameters(model.encoder) / 1e6, 1) == 53.8
    assert round(count_parameters(model.decoder) / 1e6, 1) == 43.8
    block = model.encoder.blocks.group_1.block_1
    assert block.post_gain == 1 / 64  # App. A: 1 / n_layers², 4 groups × 2 blocks
    assert model.encoder.blocks.group_4.block_2.res_path.conv_4.w.shape == (2048, 512, 1, 1)
    assert model.decoder.blocks.group_1.block_1.res_path.conv_1.w.shape == (512, 128, 1, 1)


def test_state_dict_uses_the_released_names():
    keys = set(DVAE(PRESETS["tiny"]).state_dict())
    for key in ("encoder.blocks.input.w", "encoder.blocks.group_1.block_1.res_path.conv_1.w",
                "encoder.blocks.group_2.block_1.id_path.b", "encoder.blocks.output.conv.w",
                "decoder.blocks.input.w", "decoder.blocks.group_4.block_1.res_path.conv_4.b",
                "decoder.blocks.output.conv.w"):
        assert key in keys, key
    assert "encoder.blocks.group_1.block_1.id_path.w" not in keys  # identity when widths agree


def test_conv_init_follows_the_paper():
    model = DVAE(PRESETS["small"])
    conv = model.encoder.blocks.group_3.block_1.res_path.conv_2  # 3×3, 64 → 64
    n_in = conv.w.shape[1] * 9
    assert conv.w.std().item() == pytest.approx(1 / math.sqrt(n_in), rel=0.05)
    assert all(m.b.abs().max() == 0 for m in model.modules() if hasattr(m, "b"))


@pytest.mark.parametrize("name", ["tiny", "tiny-vq"])
def test_tiny_shapes_and_api(name):
    config = PRESETS[name]
    model = DVAE(config).eval()
    x = torch.rand(2, 3, 64, 64)
    logits = model.encode_logits(x)
    assert logits.shape == (2, 512, 8, 8) and logits.dtype == torch.float32
    codes = model.encode(x)
    assert codes.shape == (2, 8, 8) and codes.dtype == torch.int64
    assert torch.equal(codes, logits.argmax(1))
    images = model.decode_codes(codes)
    assert images.shape == (2, 3, 64, 64) and 0 <= images.min() and images.max() <= 1
    out = model(x, tau=1.0)
    assert out.stats.shape == (2, 6, 64, 64) and out.logits.shape == (2, 512, 8, 8)
    assert (out.commitment is None) == (config.kind == "gumbel")
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model.encode(torch.rand(2, 64, 64))


def test_gumbel_decode_codes_equals_decoder_on_one_hot():
    model = DVAE(PRESETS["tiny"])
    codes = torch.randint(512, (2, 8, 8))
    one_hot = F.one_hot(codes, 512).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        expected = unmap_pixels(torch.sigmoid(model.decoder(one_hot)[:, :3]))
    torch.testing.assert_close(model.decode_codes(codes), expected, rtol=1e-5, atol=1e-5)


def test_configs_round_trip_and_validate():
    for config in PRESETS.values():
        assert from_dict(DVAEConfig, to_dict(config)) == config
    assert PRESETS["tiny"].grid == 8 and PRESETS["small"].grid == 16
    with pytest.raises(UserError, match="kind"):
        DVAEConfig(kind="vqgan")
    with pytest.raises(UserError, match="divisible"):
        DVAEConfig(image_size=100)


# --- objective ---------------------------------------------------------------------------------------------

def test_pixel_map_round_trip():
    x = torch.rand(2, 3, 4, 4)
    m = map_pixels(x)
    assert m.min() >= 0.1 and m.max() <= 0.9
    torch.testing.assert_close(unmap_pixels(m), x)
    assert unmap_pixels(torch.tensor([0.0, 1.0])).tolist() == [0.0, 1.0]  # clamped


def test_logit_laplace_nll_matches_the_density_in_float64():
    x = torch.rand(1000, dtype=torch.float64) * 0.8 + 0.1
    mu = torch.randn(1000, dtype=torch.float64) * 2
    log_b = torch.randn(1000, dtype=torch.float64)
    b = log_b.exp()
    density = 1 / (2 * b * x * (1 - x)) * torch.exp(-(torch.log(x / (1 - x)) - mu).abs() / b)
    ours = logit_laplace_nll(x.float(), mu.float(), log_b.float())
    torch.testing.assert_close(ours.double(), -density.log(), rtol=1e-4, atol=1e-4)


def test_logit_laplace_density_integrates_to_one():
    x = torch.linspace(1e-6, 1 - 1e-6, 400_001, dtype=torch.float64)
    nll = logit_laplace_nll(x, torch.tensor(0.3, dtype=torch.float64), torch.tensor(-0.7, dtype=torch.float64))
    assert torch.trapezoid(torch.exp(-nll), x).item() == pytest.approx(1.0, abs=1e-3)


def test_gumbel_softmax_samples_the_categorical():
    probs = torch.tensor([0.6, 0.3, 0.1])
    logits = probs.log().expand(20_000, 3)
    soft = gumbel_softmax(logits, tau=1.0)
    torch.testing.assert_close(soft.sum(1), torch.ones(20_000))
    hard = gumbel_softmax(logits, tau=1.0, hard=True)
    assert set(hard.unique().tolist()) == {0.0, 1.0}
    torch.testing.assert_close(hard.mean(0), probs, atol=0.015, rtol=0)


def test_kl_to_uniform():
    assert kl_to_uniform(torch.zeros(2, 16, 3, 3)).abs().max() < 1e-5
    peaked = torch.full((1, 16, 3, 3), -1e4)
    peaked[:, 0] = 0
    assert kl_to_uniform(peaked).item() == pytest.approx(9 * math.log(16), rel=1e-5)


def test_elbo_normalisation_matches_the_paper():
    model = DVAE(PRESETS["tiny"])
    x = torch.rand(2, 3, 64, 64)
    torch.manual_seed(1)
    loss, metrics = elbo_loss(model, x, tau=1.0, beta=6.6)
    dims = 3 * 64 * 64
    expected = metrics["recon_nll"] + 6.6 * metrics["kl"] / dims  # KL weighted by β/192 per position at 256 px
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    bits = (metrics["recon_nll"] * dims + metrics["kl"]) / (dims * math.log(2))
    assert metrics["bpd"].item() == pytest.approx(bits.item(), rel=1e-5)
    assert 0 < metrics["used"] <= 1 and 1 <= metrics["perplexity"] <= 512


@pytest.mark.parametrize("hard", [False, True])
def test_gradient_flows_through_the_relaxation(hard):
    model = DVAE(PRESETS["tiny"])
    out = model(torch.rand(2, 3, 64, 64), tau=0.5, hard=hard)
    # β = 0: the only path from the loss to the encoder is through the relaxed sample
    logit_laplace_nll(map_pixels(torch.rand(2, 3, 64, 64)), out.stats[:, :3], out.stats[:, 3:]).mean().backward()
    for p in (model.encoder.blocks.output.conv.w, model.encoder.blocks.input.w, model.decoder.blocks.input.w):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().max() > 0


def test_vq_straight_through_reaches_the_encoder():
    model = DVAE(PRESETS["tiny-vq"])
    loss, metrics = elbo_loss(model, torch.rand(2, 3, 64, 64), tau=1.0, beta=1.0)
    loss.backward()
    assert "commitment" in metrics
    assert model.encoder.blocks.input.w.grad.abs().max() > 0
    assert all(b.grad is None for b in model.buffers())


def test_codebook_metrics():
    codes = torch.tensor([0, 0, 1, 1])
    assert codebook_perplexity(codes, 8).item() == pytest.approx(2.0)
    assert used_fraction(codes, 8).item() == pytest.approx(0.25)


# --- schedules ---------------------------------------------------------------------------------------------

def test_cosine_end_points():
    assert cosine(0, 100, 1.0, 0.0) == 1.0
    assert cosine(50, 100, 1.0, 0.0) == pytest.approx(0.5)
    assert cosine(100, 100, 1.0, 0.0) == 0.0 and cosine(10**9, 100, 1.0, 0.0) == 0.0
    s = DVAESchedule()
    assert (s.tau(0), s.tau(150_000), s.tau(3_000_000)) == (1.0, 1 / 16, 1 / 16)
    assert (s.beta(0), s.beta(5_000)) == (0.0, 6.6)
    assert (s.lr(0), s.lr(1_200_000)) == (1e-4, 1.25e-6)
    taus = [s.tau(i) for i in range(0, 150_001, 5_000)]
    assert all(a >= b for a, b in zip(taus, taus[1:]))


# --- the vector quantiser ----------------------------------------------------------------------------------

def test_vq_first_step_initialises_the_codebook_from_data():
    q = VectorQuantizer(vocab_size=16, dim=4).train()
    h = torch.randn(2, 4, 4, 4)
    q(h)
    data = h.permute(0, 2, 3, 1).reshape(-1, 4)
    nearest = torch.cdist(q.codebook, data, compute_mode="donot_use_mm_for_euclid_dist").min(1).values
    assert nearest.max() < 1e-5  # every code now sits on an encoder output of the batch


def test_vq_dead_code_restart_revives_unused_codes():
    q = VectorQuantizer(vocab_size=16, dim=4, decay=0.9).train()
    with torch.no_grad():  # one live code near the data, fifteen far away that nothing maps to
        q.codebook.fill_(100.0)
        q.codebook[0] = 0.0
        q.cluster_size.fill_(5.0)
        q.code_sum.copy_(q.codebook * 5.0)
    assert used_fraction(q.scores(torch.randn(8, 4, 4, 4)).argmax(1), 16) == 1 / 16
    for _ in range(40):
        q(torch.randn(8, 4, 4, 4))
    assert q.codebook.abs().max() < 10  # the far codes were moved to the data
    assert used_fraction(q.scores(torch.randn(8, 4, 4, 4)).argmax(1), 16) >= 0.75


def test_vq_codebook_does_not_move_in_eval():
    q = VectorQuantizer(vocab_size=16, dim=4).eval()
    before = q.codebook.clone()
    q(torch.randn(2, 4, 4, 4))
    assert torch.equal(before, q.codebook)


# --- a few training steps ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["tiny", "tiny-vq"])
def test_tiny_training_loss_falls(name):
    model = DVAE(PRESETS[name])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.rand(4, 3, 1, 1).expand(4, 3, 64, 64).clone()  # flat colours with a square of another
    x[:, :, 16:40, 20:44] = torch.rand(4, 3, 1, 1)
    losses = []
    for step in range(8):
        loss, _ = elbo_loss(model, x, tau=1.0, beta=0.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] - 0.05, losses


# --- OpenAI's released modules -------------------------------------------------------------------------------
# The real `dall_e` package is used when importable; otherwise a stand-in with the same module paths, class
# names and attributes (written here from the released code's description, independently of our model).

class Conv2d(nn.Module):
    def __init__(self, n_in, n_out, kw):
        super().__init__()
        self.n_in, self.n_out, self.kw = n_in, n_out, kw
        self.w = nn.Parameter(torch.randn(n_out, n_in, kw, kw) / math.sqrt(n_in * kw * kw))
        self.b = nn.Parameter(torch.zeros(n_out))

    def forward(self, x):
        return F.conv2d(x, self.w, self.b, padding=(self.kw - 1) // 2)


def _block(n_in, n_out, n_layers, kernels):
    hid = n_out // 4
    sizes = [(n_in, hid), (hid, hid), (hid, hid), (hid, n_out)]
    parts = []
    for i, ((a, b), k) in enumerate(zip(sizes, kernels)):
        parts += [(f"relu_{i + 1}", nn.ReLU()), (f"conv_{i + 1}", Conv2d(a, b, k))]
    id_path = Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
    return id_path, nn.Sequential(OrderedDict(parts)), 1 / n_layers**2


class EncoderBlock(nn.Module):
    def __init__(self, n_in, n_out, n_layers):
        super().__init__()
        self.id_path, self.res_path, self.post_gain = _block(n_in, n_out, n_layers, (3, 3, 3, 1))

    def forward(self, x):
        return self.id_path(x) + self.post_gain * self.res_path(x)


class DecoderBlock(EncoderBlock):
    def __init__(self, n_in, n_out, n_layers):
        nn.Module.__init__(self)
        self.id_path, self.res_path, self.post_gain = _block(n_in, n_out, n_layers, (1, 3, 3, 3))


class Encoder(nn.Module):
    group_count = 4

    def __init__(self, n_hid, n_blk_per_group, vocab_size, input_channels=3):
        super().__init__()
        self.n_hid, self.n_blk_per_group, self.vocab_size = n_hid, n_blk_per_group, vocab_size
        self.input_channels = input_channels
        w, L = [n_hid, 2 * n_hid, 4 * n_hid, 8 * n_hid], 4 * n_blk_per_group
        seq = [("input", Conv2d(input_channels, n_hid, 7))]
        for g in range(4):
            blocks = [(f"block_{i + 1}", EncoderBlock(w[max(g - 1, 0)] if i == 0 else w[g], w[g], L))
                      for i in range(n_blk_per_group)]
            seq.append((f"group_{g + 1}", nn.Sequential(OrderedDict(
                blocks + ([("pool", nn.MaxPool2d(2))] if g < 3 else [])))))
        seq.append(("output", nn.Sequential(OrderedDict([("relu", nn.ReLU()), ("conv", Conv2d(w[3], vocab_size, 1))]))))
        self.blocks = nn.Sequential(OrderedDict(seq))

    def forward(self, x):
        return self.blocks(x)


class Decoder(nn.Module):
    group_count = 4

    def __init__(self, n_init, n_hid, n_blk_per_group, vocab_size, output_channels=3):
        super().__init__()
        self.n_init, self.n_hid, self.n_blk_per_group = n_init, n_hid, n_blk_per_group
        self.vocab_size, self.output_channels = vocab_size, output_channels
        w, L = [8 * n_hid, 4 * n_hid, 2 * n_hid, n_hid], 4 * n_blk_per_group
        seq = [("input", Conv2d(vocab_size, n_init, 1))]
        for g in range(4):
            blocks = [(f"block_{i + 1}", DecoderBlock((n_init if g == 0 else w[g - 1]) if i == 0 else w[g], w[g], L))
                      for i in range(n_blk_per_group)]
            seq.append((f"group_{g + 1}", nn.Sequential(OrderedDict(
                blocks + ([("upsample", nn.Upsample(scale_factor=2, mode="nearest"))] if g < 3 else [])))))
        seq.append(("output", nn.Sequential(OrderedDict([("relu", nn.ReLU()),
                                                         ("conv", Conv2d(n_hid, 2 * output_channels, 1))]))))
        self.blocks = nn.Sequential(OrderedDict(seq))

    def forward(self, x):
        return self.blocks(x)


@pytest.fixture
def released(monkeypatch, tmp_path):
    """(encoder, decoder, encoder.pkl, decoder.pkl): small released-style modules with random biases."""
    try:
        import dall_e  # noqa: F401  the real package, when installed
        from dall_e import Decoder as RealDecoder, Encoder as RealEncoder
        enc = RealEncoder(n_hid=64, n_blk_per_group=1, vocab_size=512)
        dec = RealDecoder(n_init=16, n_hid=64, n_blk_per_group=1, vocab_size=512)
    except ImportError:
        homes = {"dall_e.utils": [Conv2d], "dall_e.encoder": [Encoder, EncoderBlock],
                 "dall_e.decoder": [Decoder, DecoderBlock]}
        monkeypatch.setitem(sys.modules, "dall_e", types.ModuleType("dall_e"))
        for module_name, classes in homes.items():
            module = types.ModuleType(module_name)
            for cls in classes:
                monkeypatch.setattr(cls, "__module__", module_name)
                setattr(module, cls.__name__, cls)
            monkeypatch.setitem(sys.modules, module_name, module)
        enc = Encoder(n_hid=64, n_blk_per_group=1, vocab_size=512)
        dec = Decoder(n_init=16, n_hid=64, n_blk_per_group=1, vocab_size=512)
    with torch.no_grad():
        for p in list(enc.parameters()) + list(dec.parameters()):
            if p.dim() == 1:
                p.normal_(0, 0.1)  # nonzero biases, so that a misplaced bias would show
    torch.save(enc, tmp_path / "encoder.pkl")
    torch.save(dec, tmp_path / "decoder.pkl")
    return enc.eval(), dec.eval(), tmp_path / "encoder.pkl", tmp_path / "decoder.pkl"


def _reference_outputs(enc, dec, x):
    with torch.no_grad():
        logits = enc(0.8 * x + 0.1)
        one_hot = F.one_hot(logits.argmax(1), 512).permute(0, 3, 1, 2).float()
        recon = ((torch.sigmoid(dec(one_hot)[:, :3]) - 0.1) / 0.8).clamp(0, 1)
    return logits, recon


def test_openai_conversion_reproduces_logits_and_reconstructions(released):
    from dallecli.models.dvae_convert import convert_openai, load_openai_pickle

    enc, dec, enc_path, dec_path = released
    config, weights = convert_openai(load_openai_pickle(enc_path, True), load_openai_pickle(dec_path, True))
    assert (config.n_hid, config.vocab_size, config.n_init, config.groups, config.grid) == (64, 512, 16, 4, 32)
    model = DVAE(config).eval()
    model.load_state_dict(weights, strict=True)
    x = torch.rand(2, 3, 32, 32)
    logits, recon = _reference_outputs(enc, dec, x)
    torch.testing.assert_close(model.encode_logits(x), logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.decode_codes(model.encode(x)), recon, rtol=1e-5, atol=1e-5)


def test_forward_and_gradients_match_the_released_layout(released):
    """Our blocks fold the residual gain into the last conv and the decoder's upsampling into the next
    group's first 1×1 layers; outputs and every parameter's gradient must stay those of the plain layout."""
    from dallecli.models.dvae_convert import convert_openai, load_openai_pickle

    enc, dec, enc_path, dec_path = released
    config, weights = convert_openai(load_openai_pickle(enc_path, True), load_openai_pickle(dec_path, True))
    model = DVAE(config)
    model.load_state_dict(weights, strict=True)
    for ours, theirs, x in ((model.encoder, enc, torch.rand(2, 3, 32, 32)),
                            (model.decoder, dec, torch.randn(2, 512, 4, 4))):
        out, ref = ours(x), theirs(x)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        weight = torch.randn_like(ref)
        (out * weight).sum().backward()
        (ref * weight).sum().backward()
        theirs_grads = dict(theirs.named_parameters())
        for name, p in ours.named_parameters():  # summed in another order: float rounding of the largest
            expected = theirs_grads[name].grad
            torch.testing.assert_close(p.grad, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item(),
                                       msg=lambda m, name=name: f"{name}: {m}")


def _app():
    from dallecli.commands.convert_dvae import command

    app = typer.Typer()
    app.command("convert-dvae")(command)
    app.command("other")(lambda: None)  # two commands, so the command name is part of the command line
    return app


def test_convert_dvae_refuses_without_trust_pickle(released):
    _, _, enc_path, dec_path = released
    result = CliRunner().invoke(_app(), ["convert-dvae", "--openai", str(enc_path), str(dec_path)])
    assert isinstance(result.exception, UserError)
    message = str(result.exception)
    assert "--trust-pickle" in message and "runs code" in message and "\n" not in message

def test_convert_dvae_says_unpickling_only_when_it_does(released, tmp_path, capfd):
    from tests.fixtures import cli

    _, _, enc_path, dec_path = released
    refused = cli.run_inprocess(["convert-dvae", "--openai", enc_path, dec_path, "--run", tmp_path / "run"], capfd)
    said = [line for line in refused.stderr.splitlines() if line.startswith("unpickling")]
    assert refused.returncode == 2 and "--trust-pickle" in refused.stderr and not said, refused.stderr
    done = cli.run_inprocess(["convert-dvae", "--openai", enc_path, dec_path, "--trust-pickle", "--run",
                              tmp_path / "run"], capfd)
    assert done.returncode == 0 and f"unpickling {enc_path}" in " ".join(done.stderr.split()), done.stderr


def test_convert_dvae_writes_a_checkpoint(released, tmp_path):
    enc, dec, enc_path, dec_path = released
    result = CliRunner().invoke(_app(), ["convert-dvae", "--openai", str(enc_path), str(dec_path),
                                         "--trust-pickle", "--run", str(tmp_path / "run"), "--quiet"])
    assert result.exit_code == 0, result.output
    ckpt = checkpoint.load(tmp_path / "run" / "dvae", "dvae")
    model = DVAE(from_dict(DVAEConfig, ckpt.model_config)).eval()
    model.load_state_dict(ckpt.weights(), strict=True)
    x = torch.rand(1, 3, 32, 32)
    logits, _ = _reference_outputs(enc, dec, x)
    torch.testing.assert_close(model.encode_logits(x), logits, rtol=1e-5, atol=1e-5)


def test_convert_rejects_swapped_files(released):
    from dallecli.models.dvae_convert import convert_openai, load_openai_pickle

    _, _, enc_path, dec_path = released
    with pytest.raises(UserError, match="Encoder then a Decoder"):
        convert_openai(load_openai_pickle(dec_path, True), load_openai_pickle(enc_path, True))


@pytest.mark.filterwarnings("ignore:Couldn't retrieve source code")  # legacy saves of the stand-in
def test_convert_reads_the_legacy_pickle_format(released, tmp_path):
    from dallecli.models.dvae_convert import load_openai_pickle

    enc, _, _, _ = released
    torch.save(enc, tmp_path / "legacy.pkl", _use_new_zipfile_serialization=False)
    loaded = load_openai_pickle(tmp_path / "legacy.pkl", True)
    assert torch.equal(loaded.state_dict()["blocks.input.w"], enc.state_dict()["blocks.input.w"])


def test_convert_names_a_bad_file(tmp_path):
    from dallecli.models.dvae_convert import load_openai_pickle

    (tmp_path / "junk.pkl").write_bytes(b"not a pickle")
    with pytest.raises(UserError, match="cannot unpickle"):
        load_openai_pickle(tmp_path / "junk.pkl", True)
    torch.save({"w": torch.zeros(1)}, tmp_path / "dict.pkl")
    with pytest.raises(UserError, match="not a module of OpenAI's dall_e"):
        load_openai_pickle(tmp_path / "dict.pkl", True)
    with pytest.raises(UserError, match="no such file"):
        load_openai_pickle(tmp_path / "missing.pkl", True)
    with pytest.raises(UserError, match="no such file"):  # missing is said first, --trust-pickle or not
        load_openai_pickle(tmp_path / "missing.pkl", False)


def test_convert_dvae_refuses_a_folder_that_holds_a_trained_dvae(released, tmp_path):
    """Step 0 beside a trained dVAE would never be the latest: encode and sample would ignore it silently."""
    _, _, enc_path, dec_path = released
    run = tmp_path / "run"
    checkpoint.save(run / "dvae", 500, kind="dvae", model_config={}, weights={"w": torch.zeros(1)})
    args = ["convert-dvae", "--openai", str(enc_path), str(dec_path), "--trust-pickle", "--run", str(run), "-q"]
    result = CliRunner().invoke(_app(), args)
    assert isinstance(result.exception, UserError) and "--out" in str(result.exception)
    assert [p.name for p in (run / "dvae").iterdir() if p.name.startswith("step-")] == ["step-00000500"]
    a_file = tmp_path / "f"
    a_file.write_text("x")
    result = CliRunner().invoke(_app(), args[:-3] + ["--out", str(a_file)])
    assert isinstance(result.exception, UserError) and "is a file" in str(result.exception)


# --- the small presets' deviations: likelihood, residual gain, channels_last, defaults -------------------------

def test_paper_preset_is_the_paper_and_the_tiny_vq_deviations_are_explicit():
    paper = PRESETS["paper"]
    assert paper == DVAEConfig()
    assert (paper.kind, paper.likelihood, paper.residual_gain) == ("gumbel", "logit-laplace", 1 / 64)
    tiny = PRESETS["tiny"]  # the paper's dVAE, scaled down
    assert (tiny.kind, tiny.likelihood, tiny.residual_gain) == ("gumbel", "logit-laplace", 1 / 16)
    vq = PRESETS["tiny-vq"]
    assert (vq.kind, vq.likelihood) == ("vq", "gaussian")
    assert vq.residual_gain == 1 / vq.n_layers
    assert DVAE(vq).decoder.blocks.group_4.block_1.post_gain == vq.residual_gain


def test_new_config_fields_validate_and_old_configs_still_load():
    for bad in ({"likelihood": "poisson"}, {"gaussian_sigma": 0.0}, {"post_gain": -1.0}):
        with pytest.raises(UserError):
            DVAEConfig(**bad)
    vq = PRESETS["tiny-vq"]
    assert from_dict(DVAEConfig, to_dict(vq)) == vq
    old = to_dict(PRESETS["tiny"])  # a checkpoint config written before these fields existed
    for key in ("likelihood", "gaussian_sigma", "post_gain"):
        del old[key]
    assert from_dict(DVAEConfig, old) == PRESETS["tiny"]


def test_gaussian_nll_is_the_normal_density_around_the_sigmoid_mean():
    x = 0.8 * torch.rand(2, 3, 4, 4, dtype=torch.float64) + 0.1
    mu = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    reference = -torch.distributions.Normal(torch.sigmoid(mu), 0.07).log_prob(x)
    assert torch.allclose(gaussian_nll(x, mu, 0.07), reference)


def test_pixel_nll_dispatches_on_the_likelihood():
    x, stats = map_pixels(torch.rand(2, 3, 4, 4)), torch.randn(2, 6, 4, 4)
    assert torch.equal(pixel_nll(x, stats), logit_laplace_nll(x, stats[:, :3], stats[:, 3:]))
    assert torch.equal(pixel_nll(x, stats, "gaussian", 0.1), gaussian_nll(x, stats[:, :3], 0.1))
    with pytest.raises(ValueError):
        pixel_nll(x, stats, "poisson")


def test_vq_gaussian_loss_is_the_scaled_squared_error_plus_commitment():
    model = DVAE(PRESETS["tiny-vq"]).eval()  # eval: the codebook stays put, so two passes agree
    x = torch.rand(2, 3, 64, 64)
    loss, metrics = elbo_loss(model, x, tau=1.0, beta=6.6, likelihood="gaussian", sigma=0.1)
    out = model(x, 1.0)
    squared = (map_pixels(x) - torch.sigmoid(out.stats[:, :3])) ** 2
    nll = squared / (2 * 0.1**2) + math.log(0.1) + 0.5 * math.log(2 * math.pi)
    assert loss.item() == pytest.approx((nll.mean() + 0.25 * out.commitment).item(), rel=1e-5)
    assert metrics["recon_nll"].item() == pytest.approx(nll.mean().item(), rel=1e-5)
    model.train()
    elbo_loss(model, x, tau=1.0, beta=0.0, likelihood="gaussian", sigma=0.1)[0].backward()
    assert model.encoder.blocks.input.w.grad.abs().sum() > 0  # straight through to the encoder


def test_task_trains_channels_last_with_the_same_loss(tmp_path):
    from dallecli.train.dvae_task import DVAETask, schedule_for
    from tests.fixtures.runs import make_dvae_run

    shards = make_dvae_run(tmp_path, n_train=8, n_val=2, per_shard=8, size=64) / "shards"
    config = PRESETS["tiny-vq"]
    task = DVAETask(config=config, shards=shards, schedule=schedule_for(10), batch_size=2, seed=0)
    model = task.build_model().eval()
    assert model.encoder.blocks.input.w.is_contiguous(memory_format=torch.channels_last)
    reference = DVAE(config).eval()
    reference.load_state_dict(model.state_dict())
    x = torch.rand(2, 3, 64, 64)
    ours, _ = task.loss(model, x, 0)
    theirs, _ = elbo_loss(reference, x, 1.0, 0.0, likelihood=config.likelihood, sigma=config.gaussian_sigma)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-4, abs=1e-5)


def _train_dvae_app():
    from dallecli.commands.train_dvae import command

    app = typer.Typer()
    app.command("train-dvae")(command)
    app.command("other")(lambda: None)
    return app


def test_train_dvae_picks_the_preset_from_the_image_size(tmp_path):
    from tests.fixtures.runs import make_dvae_run

    run = make_dvae_run(tmp_path / "run", n_train=8, n_val=2, per_shard=8, size=64)
    result = CliRunner().invoke(_train_dvae_app(), ["train-dvae", "--run", str(run), "--steps", "1", "--batch-size",
                                                    "2", "--eval-every", "0", "--quiet", "--cpu"])
    assert result.exit_code == 0, result.output
    ck = checkpoint.load(checkpoint.latest(run / "dvae"), "dvae")
    assert from_dict(DVAEConfig, ck.model_config) == PRESETS["tiny-vq"]
    train_config = (run / "dvae" / "train_config.json").read_text()
    assert '"lr": 0.001' in train_config

    small = make_dvae_run(tmp_path / "small", n_train=8, n_val=2, per_shard=8, size=32)
    result = CliRunner().invoke(_train_dvae_app(), ["train-dvae", "--run", str(small), "--steps", "1", "--quiet"])
    assert isinstance(result.exception, UserError) and "--preset" in str(result.exception)


def test_larger_shards_get_the_papers_random_crops_and_encode_whole(tmp_path, capfd):
    """128 px shards and --preset tiny-vq (64 px): train-dvae crops and resizes each
    image at random (App. A.2), which shards at the model's size cannot get; encode resizes each one whole.
    Shards of a size between the presets' (96 px) take the preset below it."""
    import numpy as np
    from PIL import Image

    from dallecli.codes import read_code_manifest
    from dallecli.imageutil import dvae_augment
    from tests.fixtures import cli
    from tests.fixtures.runs import make_dvae_run

    ramp = Image.fromarray(np.tile(np.arange(96, dtype=np.uint8), (96, 1)), "L").convert("RGB")
    views = [np.asarray(dvae_augment(ramp, 64, np.random.default_rng(i), flip=False)) for i in range(8)]
    assert all(v.shape == (64, 64, 3) for v in views)
    assert len({v.tobytes() for v in views}) > 4  # crops and scales at random
    same = Image.new("RGB", (64, 64), (10, 20, 30))
    assert np.array_equal(np.asarray(dvae_augment(same, 64, np.random.default_rng(0))), np.asarray(same))

    run = make_dvae_run(tmp_path / "run", n_train=8, n_val=2, per_shard=8, size=128)
    result = cli.run_inprocess(["train-dvae", "--run", run, "--preset", "tiny-vq", "--steps", 1, "--batch-size", 2,
                                "--eval-every", 0, "--cpu"], capfd)
    assert result.returncode == 0, result.stderr
    assert "are 128 px: each is cropped and resized at random to the dVAE's 64 px" in " ".join(result.stderr.split())
    ck = checkpoint.load(checkpoint.latest(run / "dvae"), "dvae")
    assert from_dict(DVAEConfig, ck.model_config) == PRESETS["tiny-vq"]
    result = cli.run_inprocess(["encode", "--run", run, "--batch-size", 4, "--cpu"], capfd)
    assert result.returncode == 0, result.stderr
    assert "each is resized whole to the dVAE's 64 px" in " ".join(result.stderr.split())
    assert read_code_manifest(run / "codes")["dvae"]["grid"] == 8
    from dallecli.commands.train_dvae import preset_for_size

    assert [preset_for_size(s) for s in (64, 96, 128, 200, 256, 384)] == ["tiny-vq", "tiny-vq", "small-vq",
                                                                           "small-vq", "paper", "paper"]
    assert preset_for_size(48) is None


def test_default_precision():
    from dallecli.hardware import cpu_has_bf16, default_precision

    assert default_precision(on_gpu=True) == "bf16"
    assert default_precision(on_gpu=False) == ("bf16" if cpu_has_bf16() else "fp32")


def test_vq_summary_leaves_out_the_constant_kl_and_labels_bits_per_dim():
    """A vq dVAE's "kl" is the constant log K per position and its bits/dim (of a Gaussian density) can be
    negative: the end-of-training summary says so, while metrics.jsonl's fields stay as they are."""
    from pathlib import Path

    from dallecli.models.dvae_objective import DVAESchedule
    from dallecli.train.dvae_task import DVAETask

    config = PRESETS["tiny-vq"]
    model = DVAE(config)
    _, parts = elbo_loss(model, torch.rand(2, 3, 64, 64), 1.0, 0.0, likelihood=config.likelihood,
                         sigma=config.gaussian_sigma)
    grid_positions = (config.image_size // 8) ** 2
    assert float(parts["kl"]) == pytest.approx(grid_positions * math.log(config.vocab_size))  # the constant
    metrics = {k: float(v) for k, v in parts.items()} | {"val_bpd": -0.5, "val_loss": -0.5}
    task = DVAETask(config=config, shards=Path("unused"), schedule=DVAESchedule(), batch_size=2, seed=0)
    shown = task.summary_metrics(metrics)
    assert "kl" not in shown and "bpd" not in shown and shown["val_bpd (density, can be < 0)"] == -0.5
    assert shown["mse"] == metrics["mse"] and "kl" in metrics and "bpd" in metrics  # the caller's dict untouched
    gumbel = DVAETask(config=PRESETS["tiny"], shards=Path("unused"), schedule=DVAESchedule(), batch_size=2, seed=0)
    assert gumbel.summary_metrics(metrics) == metrics


def test_validation_on_train_images_says_so(tmp_path, capfd):
    """Shards without a val split: the val_* metrics come from train images, and a warning says it."""
    import dataclasses

    from dallecli.train.loop import train
    from tests.fixtures import tasks
    from tests.fixtures.runs import make_dvae_run

    run = make_dvae_run(tmp_path / "run", n_train=8, n_val=0, per_shard=8, size=16)
    cfg = dataclasses.replace(tasks.DVAE_CFG, steps=2, eval_every=2, save_every=2)
    capfd.readouterr()
    train(tasks.dvae_task(run / "shards", steps=2), cfg, tmp_path / "out")
    err = " ".join(capfd.readouterr().err.split())
    assert "no val shards in" in err and "measured on the first 8 train images" in err


def test_gumbel_softmax_divides_by_the_temperature():
    from dallecli.models.dvae_objective import gumbel_softmax

    logits = torch.randn(64, 8, 2, 2)
    torch.manual_seed(1)
    y = gumbel_softmax(logits, tau=0.5)
    torch.manual_seed(1)
    u = torch.rand_like(logits).clamp_(min=torch.finfo(torch.float32).tiny)
    expected = F.softmax((logits - torch.log(-torch.log(u))) / 0.5, dim=1)
    torch.testing.assert_close(y, expected)
    torch.manual_seed(0)
    flat = torch.zeros(4000, 8)
    assert gumbel_softmax(flat, tau=0.05).max(1).values.mean() > 0.95  # a cold sample is nearly one-hot
    assert gumbel_softmax(flat, tau=20.0).max(1).values.mean() < 0.2  # a hot one nearly uniform


def test_schedules_run_over_their_own_lengths():
    from dallecli.models.dvae_objective import DVAESchedule

    s = DVAESchedule()
    assert s.tau(75_000) == pytest.approx((1.0 + 1 / 16) / 2)
    assert s.beta(2_500) == pytest.approx(6.6 / 2)
    assert s.lr(600_000) == pytest.approx((1e-4 + 1.25e-6) / 2)


def test_fresh_removes_the_earlier_runs_reconstruction_sheets(tmp_path, capfd):
    """--fresh: the earlier dVAE's validation sheets and its `encode --preview` go with it (only the files the
    preview writes). The preview lies beside the checkpoints it shows, also when --dvae names a step folder."""
    import dataclasses

    from dallecli.train.loop import train
    from tests.fixtures import cli, tasks
    from tests.fixtures.runs import make_dvae_run

    run = make_dvae_run(tmp_path / "run", n_train=16, n_val=4, per_shard=8, size=16)
    cfg = dataclasses.replace(tasks.DVAE_CFG, steps=3, save_every=1, eval_every=1)
    train(tasks.dvae_task(run / "shards", out=run / "dvae"), cfg, run / "dvae")
    assert sorted(p.name for p in (run / "dvae").glob("recon-*.png")) == [f"recon-0000000{i}.png" for i in (1, 2, 3)]
    result = cli.run_inprocess(["encode", "--run", run, "--dvae", run / "dvae" / "step-00000003", "--preview", 2,
                                "--cpu", "-q"], capfd)
    assert result.returncode == 0, result.stderr
    assert (run / "dvae" / "preview" / "preview.jsonl").is_file()
    (run / "dvae" / "preview" / "notes.txt").write_text("mine")  # not the preview's: --fresh leaves it
    (run / "dvae" / "preview" / "000-kept").mkdir()
    train(tasks.dvae_task(run / "shards", out=run / "dvae"), dataclasses.replace(cfg, steps=2, eval_every=2),
          run / "dvae", fresh=True)
    assert sorted(p.name for p in (run / "dvae").glob("recon-*.png")) == ["recon-00000002.png"]  # the new run's
    assert sorted(p.name for p in (run / "dvae" / "preview").iterdir()) == ["000-kept", "notes.txt"]


def test_keep_spares_the_dvae_that_the_codes_and_the_prior_need(tmp_path, capsys):
    """Training the dVAE further with --keep pruned the checkpoint RUN/codes were encoded with, and so the one
    the prior was trained on: sampling then had no dVAE that decodes the prior's codes. Pruning keeps it."""
    import dataclasses
    import json

    from dallecli.train.loop import train
    from tests.fixtures import tasks
    from tests.fixtures.runs import make_dvae_run

    run = make_dvae_run(tmp_path / "run", n_train=16, n_val=0, per_shard=8, size=16)
    cfg = dataclasses.replace(tasks.DVAE_CFG, steps=2, save_every=1, eval_every=0, keep=5)
    train(tasks.dvae_task(run / "shards", out=run / "dvae"), cfg, run / "dvae")
    encoded_with = checkpoint.load(run / "dvae" / "step-00000002", "dvae").fingerprint
    (run / "codes").mkdir()
    (run / "codes" / "manifest.json").write_text(json.dumps({"kind": "codes", "dvae": {"fingerprint": encoded_with}}))
    task = tasks.dvae_task(run / "shards", out=run / "dvae")
    assert set(task.protected_steps()) == {2}
    train(task, dataclasses.replace(cfg, steps=5, keep=1), run / "dvae")
    assert [s for s, _ in checkpoint.complete_steps(run / "dvae")] == [2, 5]
    assert capsys.readouterr().err.count("keeping step 2 beyond --keep 1") == 1
    # a prior trained on step 5's codes spares that one too
    checkpoint.save(run / "prior", 1, kind="prior", model_config={}, weights={"w": torch.zeros(1)},
                    meta={"dvae_fingerprint": checkpoint.load(run / "dvae", "dvae").fingerprint})
    assert set(task.protected_steps()) == {2, 5}
    # `dalle train-dvae --fresh` refuses to replace them, before it reads anything, and changes nothing
    from tests.fixtures import cli

    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    result = cli.run(["train-dvae", "--run", run, "--fresh", "--steps", 1])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--fresh would replace" in result.stderr and "step 2 (" in result.stderr and "step 5 (" in result.stderr
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
    # the library's train(fresh=True) replaces them all: it says which of them the codes and the prior need
    train(task, dataclasses.replace(cfg, steps=1, keep=1), run / "dvae", fresh=True)
    err = capsys.readouterr().err
    assert "--fresh also replaces step 2 (" in err and "), step 5 (" in err and "dalle encode --overwrite" in err
    assert "were encoded with it; the prior in" not in err.replace("\n", " ")  # each step its own reason
    # a codes manifest that cannot be read does not stop training; it is said once
    (run / "codes" / "manifest.json").write_text("[1, 2]")
    train(task, dataclasses.replace(cfg, steps=3, keep=1), run / "dvae")
    assert capsys.readouterr().err.count("could not tell which checkpoints") == 1


def test_a_collapsed_codebook_is_told_with_the_fix(tmp_path, capfd, monkeypatch):
    """A val set whose codes have a perplexity under 5% of what it could show (min(K, positions)): a warning with
    the count and what to do (for the paper's gumbel dVAE at 64 / 128 px, the vq preset of that size). A collapsed
    gumbel dVAE still shows dozens of codes (9% of 512 after 500 updates) at perplexity 1.6: that is caught too.
    Choosing `tiny` for a short run is warned about up front."""
    from dallecli.train.dvae_task import DVAETask, collapse_warning
    from tests.fixtures import cli
    from tests.fixtures.runs import make_dvae_run

    message = collapse_warning({"val_used": 4 / 512, "val_perplexity": 1.2}, PRESETS["tiny"])
    assert "use 4 of the 512 codes" in message and "perplexity 1.2" in message
    assert "rerun with `--preset tiny-vq --fresh`" in message
    assert collapse_warning({"val_used": 45 / 512, "val_perplexity": 1.6}, PRESETS["tiny"]) is not None
    assert "--preset small-vq" in collapse_warning({"val_used": 0.01, "val_perplexity": 3}, PRESETS["small"])
    assert "lower --lr" in collapse_warning({"val_used": 0.01, "val_perplexity": 3}, PRESETS["tiny-vq"])
    assert "3M updates" in collapse_warning({"val_used": 0.001, "val_perplexity": 5}, PRESETS["paper"])
    assert collapse_warning({"val_used": 0.86, "val_perplexity": 310.0}, PRESETS["tiny-vq"]) is None
    assert collapse_warning({"loss": 1.0}, PRESETS["tiny"]) is None  # never validated: nothing to say
    # one val image has 64 positions: perplexity 15 among them is no collapse (5% of 512 would be 25.6)
    assert collapse_warning({"val_used": 20 / 512, "val_perplexity": 15, "val_images": 1}, PRESETS["tiny"]) is None
    assert collapse_warning({"val_used": 2 / 512, "val_perplexity": 1.5, "val_images": 1}, PRESETS["tiny"])

    # From the command line, with the validation's figures fixed (the warning, not the training, is tested).
    figures = {"val_loss": 1.0, "val_used": 3 / 512, "val_perplexity": 1.4, "val_images": 2}
    monkeypatch.setattr(DVAETask, "evaluate", lambda self, model, step: dict(figures))
    run = make_dvae_run(tmp_path / "run", n_train=8, n_val=2, per_shard=8, size=64)
    args = ["train-dvae", "--run", run, "--steps", 2, "--batch-size", 2, "--eval-every", 2, "--cpu", "--quiet"]
    result = cli.run_inprocess(args + ["--preset", "tiny"], capfd)
    assert result.returncode == 0, result.stderr
    said = " ".join(result.stderr.split())
    assert "collapses onto a few codes in runs of a few thousand updates" in said
    assert "the codebook has collapsed: the val images use 3 of the 512 codes" in said
    assert "rerun with `--preset tiny-vq --fresh`" in said
    result = cli.run_inprocess(args + ["--steps", 4], capfd)  # resumed: no up-front warning again
    assert result.returncode == 0, result.stderr
    said = " ".join(result.stderr.split())
    assert "runs of a few thousand updates" not in said and "the codebook has collapsed" in said
    figures.update(val_used=0.8, val_perplexity=300.0)
    result = cli.run_inprocess(["train-dvae", "--run", run, "--steps", 2, "--batch-size", 2, "--eval-every", 2,
                                "--cpu", "--preset", "tiny-vq", "--out", run / "dvae-vq"], capfd)
    assert result.returncode == 0, result.stderr
    assert "collapse" not in result.stderr  # a vq preset, codes in use: nothing to warn about
