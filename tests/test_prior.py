"""The stage-2 transformer: shapes, parameter counts, loss, padding, masks in use, KV cache, checkpointing."""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from dallecli.models.prior import (PRESETS, PriorConfig, PriorTransformer, flops_per_token, num_params,
                                   param_groups, prior_loss)

MICRO = PriorConfig(text_vocab=40, text_len=5, image_vocab=24, grid=4, d_model=32, n_layers=4, n_heads=4)


@pytest.fixture(autouse=True)
def one_thread():
    """Micro models gain nothing from threads, and on a shared CPU a second thread mostly waits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def model_of(config, seed=0):
    torch.manual_seed(seed)
    return PriorTransformer(config).eval()


def batch(config, B=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(1, config.text_vocab, (B, config.text_len), generator=g)
    text[0, 3:] = config.pad_id  # a short caption
    image = torch.randint(0, config.image_vocab, (B, config.image_len), generator=g)
    return text, image


def expected_params(c: PriorConfig) -> int:
    """Independent count: per layer 2 LayerNorms, qkv, proj, 2 MLP linears (with biases)."""
    d, h = c.d_model, c.mlp_ratio * c.d_model
    layer = 2 * 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * h + h) + (h * d + d)
    embeddings = c.text_vocab * d + 2 * c.text_len * d + d + c.image_vocab * d + 2 * c.grid * d
    return c.n_layers * layer + embeddings + 2 * d + (c.text_vocab + c.image_vocab) * d


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_forward_shapes_per_preset(name):
    c = PRESETS[name]
    model = model_of(c)
    text, image = batch(c, B=2)
    text_logits, image_logits = model(text, image)
    assert text_logits.shape == (2, c.text_len - 1, c.text_vocab)
    assert image_logits.shape == (2, c.image_len, c.image_vocab)
    assert text_logits.dtype == image_logits.dtype == torch.float32
    assert num_params(model) == expected_params(c)


@pytest.mark.parametrize("name", list(PRESETS))
def test_parameter_counts_on_meta(name):
    c = PRESETS[name]
    with torch.device("meta"):
        model = PriorTransformer(c)
    assert num_params(model) == expected_params(c)
    if name == "paper":
        assert 11.5e9 < num_params(model) < 12.5e9  # §2.2: "12-billion parameter"
        assert c.d_model // c.n_heads == 64 and c.seq_len == 256 + 1024


def test_meta_init_then_to_empty_rebuilds_the_masks():
    c = dataclasses.replace(MICRO, attention="paper")
    reference = model_of(c)
    with torch.device("meta"):
        model = PriorTransformer(c)
    model.to_empty(device="cpu")
    model.reset_parameters()
    assert torch.equal(model.masks, reference.masks)  # not in the state dict: rebuilt, not loaded
    model.load_state_dict(reference.state_dict())
    text, image = batch(c)
    assert torch.allclose(model.eval()(text, image)[1], reference(text, image)[1])


def test_presets_are_overridable():
    c = dataclasses.replace(PRESETS["tiny"], text_vocab=77, image_vocab=33, grid=4, text_len=9)
    text_logits, image_logits = model_of(c)(*batch(c, B=1))
    assert text_logits.shape == (1, 8, 77) and image_logits.shape == (1, 16, 33)
    with pytest.raises(ValueError, match="divisible"):
        dataclasses.replace(c, n_heads=3)


def test_loss_weighting_by_hand():
    torch.manual_seed(0)
    pad = 0
    text = torch.tensor([[5, 6, 7, pad, pad], [5, 1, 2, 3, 4]])
    image = torch.tensor([[1, 2, 0], [2, 2, 1]])
    text_logits, image_logits = torch.randn(2, 4, 8), torch.randn(2, 3, 3)
    loss, parts = prior_loss(text_logits, image_logits, text, image, pad)
    nll = []  # text targets text[:, 1:], pads excluded: 2 + 4 = 6 of them
    for b in range(2):
        for t in range(4):
            if text[b, t + 1] != pad:
                nll.append(-F.log_softmax(text_logits[b, t], -1)[text[b, t + 1]])
    text_ref = sum(nll) / 6
    image_ref = sum(-F.log_softmax(image_logits[b, j], -1)[image[b, j]] for b in range(2) for j in range(3)) / 6
    assert len(nll) == 6
    assert torch.allclose(parts["text_loss"], text_ref) and torch.allclose(parts["image_loss"], image_ref)
    assert torch.allclose(loss, text_ref / 8 + 7 * image_ref / 8)


def test_loss_with_only_empty_captions_is_finite():
    text = torch.zeros(2, 5, dtype=torch.long)
    loss, parts = prior_loss(torch.randn(2, 4, 8), torch.randn(2, 3, 3), text, torch.zeros(2, 3, dtype=torch.long), 0)
    assert parts["text_loss"] == 0 and torch.isfinite(loss)


def test_padding_embedding_depends_on_position():
    c = MICRO
    model = model_of(c)
    text = torch.tensor([[7, 8, 0, 0, 0], [7, 8, 9, 10, 0]])  # captions of lengths 2 and 4
    emb = model.embed_text(text)
    # position 2 is padding in the first caption: its own pad vector, not token 0's embedding
    assert torch.allclose(emb[0, 2], model.text_pad[2] + model.text_pos[2])
    assert not torch.allclose(model.text_pad[2], model.text_pad[3])
    assert torch.allclose(emb[0, 4] - model.text_pos[4], emb[1, 4] - model.text_pos[4])  # same pad at the same position
    assert torch.allclose(emb[1, 2], model.text_embed.weight[9] + model.text_pos[2])
    # gradient reaches the pad table exactly at padded positions, and never the pad id's token row
    model.train()
    _, image = batch(c, B=2)
    text_logits, image_logits = model(text, image)
    prior_loss(text_logits, image_logits, text, image, c.pad_id)[0].backward()
    used = model.text_pad.grad.abs().sum(-1) > 0
    assert used.tolist() == [False, False, True, True, True]
    assert model.text_embed.weight.grad[c.pad_id].abs().sum() == 0


@pytest.mark.parametrize("attention", ["dense", "paper"])
def test_image_logits_are_causal(attention):
    c = dataclasses.replace(MICRO, attention=attention)
    model = model_of(c)
    text, image = batch(c)
    _, base = model(text, image)
    j = 6
    changed = image.clone()
    changed[:, j] = (changed[:, j] + 1) % c.image_vocab
    _, after = model(text, changed)
    assert torch.allclose(base[:, : j + 1], after[:, : j + 1], atol=1e-6)  # logits for tokens 0..j
    assert not torch.allclose(base[:, j + 1:], after[:, j + 1:])
    text2 = text.clone()
    text2[:, 1] = (text2[:, 1] + 1) % c.text_vocab
    assert not torch.allclose(model(text2, image)[1][:, -1], base[:, -1])  # every image token sees the text


def test_paper_masks_are_used():
    # one layer = the causal 11×11 convolution: on an 8×8 grid, cell (7, 7) cannot see image token 0
    c = dataclasses.replace(MICRO, grid=8, n_layers=1, attention="paper")
    text, image = batch(c)
    changed = image.clone()
    changed[:, 0] = (changed[:, 0] + 1) % c.image_vocab
    paper = model_of(c)
    assert torch.allclose(paper(text, image)[1][:, 63], paper(text, changed)[1][:, 63], atol=1e-6)
    dense = model_of(dataclasses.replace(c, attention="dense"))
    assert not torch.allclose(dense(text, image)[1][:, 63], dense(text, changed)[1][:, 63])


@pytest.mark.parametrize("attention", ["dense", "paper"])
@pytest.mark.parametrize("prompt_rows", [0, 2])
def test_cached_decoding_equals_full_forward(attention, prompt_rows):
    c = dataclasses.replace(MICRO, attention=attention)
    model = model_of(c)
    text, image = batch(c, B=4)
    text[1] = c.pad_id  # an empty caption, as in a classifier-free-guidance batch
    _, full = model(text, image)  # (B, N, V): row j predicts image token j
    n = prompt_rows * c.grid
    cache = model.init_cache(batch=4)
    logits = model.prefill(cache, text, image[:, :n] if n else None)
    assert logits.shape == (4, n + 1, c.image_vocab) and cache.length == c.text_len + 1 + n
    assert torch.allclose(logits, full[:, : n + 1], atol=1e-5)
    for j in range(n, c.image_len - 1):  # feed token j, get the logits for token j + 1
        step = model.decode_step(cache, image[:, j])
        assert torch.allclose(step, full[:, j + 1], atol=1e-5), f"step {j}"
    with pytest.raises(ValueError, match="decode_step"):
        model.decode_step(cache, image[:, -1])


@pytest.mark.parametrize("attention", ["dense", "paper"])
def test_static_decoder_equals_decode_step(attention):
    from dallecli.models.prior import StaticDecoder

    c = dataclasses.replace(MICRO, attention=attention)
    model = model_of(c)
    text, image = batch(c, B=3)
    _, full = model(text, image)
    cache = model.init_cache(batch=3)
    decoder = StaticDecoder(model, cache)
    model.prefill(cache, text, image[:, :2])
    pos = torch.tensor(cache.length)
    for j in range(2, c.image_len - 1):
        logits = decoder(image[:, j], pos)
        assert torch.allclose(logits, full[:, j + 1], atol=1e-5), f"step {j}"
        pos += 1
    assert torch.allclose(cache.k[:, :, :, int(pos) - 1], decoder.k[:, :, :, int(pos) - 1])  # one storage


@pytest.mark.parametrize("attention", ["dense", "paper"])
@pytest.mark.parametrize("dtype, atol, intel", [  # intel: small fp32 products through MKL (`decode_linear`)
    (torch.float32, 1e-5, False), (torch.float32, 1e-5, True), (torch.bfloat16, 3e-2, False)])
def test_cpu_decoder_equals_full_forward(attention, dtype, atol, intel, monkeypatch):
    from dallecli.models import onednn
    from dallecli.models.cpu_decode import CPUDecoder
    from dallecli.models.onednn import BLASLinear, PackedLinear, packed_linear_available

    if not packed_linear_available():
        pytest.skip("this torch has no oneDNN packed linear")
    monkeypatch.setattr(onednn, "cpu_is_intel", lambda: intel)  # both kinds of product on any machine
    c = dataclasses.replace(MICRO, attention=attention)
    model = model_of(c)
    text, image = batch(c, B=3)
    _, full = model(text, image)
    cache = model.init_cache(batch=3)
    decoder = CPUDecoder.create(model, dtype, rows=3)
    assert {type(p) for p in decoder.blocks[0]} == {BLASLinear if intel else PackedLinear}
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):  # as generate_codes
        first = decoder.prefill(cache, text, image[:, :2])
    assert first.dtype == torch.float32 and cache.length == c.text_len + 3
    assert torch.allclose(first, full[:, :3], atol=atol)
    reference = model.init_cache(batch=3)
    model.prefill(reference, text, image[:, :2])
    assert torch.allclose(cache.k, reference.k, atol=atol) and torch.allclose(cache.v, reference.v, atol=atol)
    with pytest.raises(ValueError, match="leaves nothing to generate"):
        decoder.prefill(model.init_cache(batch=3), text, image)
    for j in range(2, c.image_len - 1):
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the sampler's context: the decoder sets its own
            logits = decoder.step(cache, image[:, j])
        assert logits.dtype == torch.float32 and logits.shape == (3, c.image_vocab)
        assert torch.allclose(logits, full[:, j + 1], atol=atol), f"step {j}"
    assert cache.length == c.seq_len  # text, BOS and every image token but the last
    with pytest.raises(ValueError, match="decode step"):
        decoder.step(cache, image[:, -1])


def test_cpu_decoder_reads_a_bf16_cache_exactly(monkeypatch):
    """bf16 products write keys and values that bf16 holds exactly: with a bf16 cache (`sample.cache_dtype`,
    long streams on a CPU) the decoder's logits are those of an fp32 cache, bit for bit, where both attend
    through the same kernel (the compiled one differs from SDPA by summation order: the next test)."""
    from dallecli.models import cpu_decode
    from dallecli.models.cpu_decode import CPUDecoder
    from dallecli.models.onednn import packed_linear_available

    if not packed_linear_available():
        pytest.skip("this torch has no oneDNN packed linear")
    monkeypatch.setattr(cpu_decode, "wide_attention", lambda q, k, v, mask: F.scaled_dot_product_attention(
        q, k.float(), v.float(), attn_mask=mask))
    c = dataclasses.replace(MICRO, attention="paper")
    model = model_of(c)
    text, image = batch(c, B=2)
    decoder = CPUDecoder.create(model, torch.bfloat16, rows=2)
    logits = {}
    for dtype in (torch.float32, torch.bfloat16):
        cache = model.init_cache(batch=2, dtype=dtype)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # as generate_codes prefills
            model.prefill(cache, text, image[:, :2])
            logits[dtype] = torch.stack([decoder.step(cache, image[:, j]) for j in range(2, c.image_len - 1)])
        assert cache.k.dtype == dtype
    assert torch.equal(logits[torch.float32], logits[torch.bfloat16])


@pytest.mark.parametrize("masked", [False, True])
def test_wide_attention_equals_sdpa_on_the_widened_cache(masked):
    """The decoder's attention over a bf16 cache (compiled where torch.compile runs) equals fp32 SDPA on the
    widened keys and values to float rounding, for every cache length (one graph, dynamic in the length)."""
    from dallecli.models import cpu_decode

    torch.manual_seed(0)
    B, nh, hs = 2, 3, 16
    q = torch.randn(B, nh, 1, hs)
    for T in (5, 37, 600):
        k, v = torch.randn(B, nh, T, hs).bfloat16(), torch.randn(B, nh, T, hs).bfloat16()
        mask = (torch.rand(1, T) > 0.4) | (torch.arange(T) == 0) if masked else None
        want = F.scaled_dot_product_attention(q, k.float(), v.float(), attn_mask=mask)
        got = cpu_decode.wide_attention(q, k, v, mask)
        assert got.dtype == torch.float32 and got.shape == want.shape
        assert torch.allclose(got, want, atol=1e-6, rtol=1e-5), T
        for b in range(B):  # each image's rows alone (batch 1), bit for bit: an image regenerates by itself
            alone = cpu_decode.wide_attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], mask)
            assert torch.equal(alone, got[b:b + 1]), (T, b)
    one = cpu_decode.wide_attention(q[:1, :1], k[:1, :1], v[:1, :1], mask)  # a single row
    assert torch.equal(one, got[:1, :1])


def test_long_streams_sample_on_a_bf16_cache_and_regenerate_alone():
    """End to end on a stream long enough for the bf16 cache (`sample.cache_dtype`): the sampler's codes
    repeat, and an image drawn alone is the one drawn in its batch."""
    from dallecli.models.onednn import packed_linear_available
    from dallecli.sample import SamplingConfig, cache_dtype, generate_codes

    if not packed_linear_available():
        pytest.skip("this torch has no oneDNN packed linear")
    c = PriorConfig(text_vocab=40, text_len=5, image_vocab=24, grid=23, d_model=16, n_layers=1, n_heads=2)
    assert cache_dtype(c, torch.bfloat16, torch.device("cpu")) == torch.bfloat16
    model = model_of(c)
    text, _ = batch(c, B=3)
    cfg = SamplingConfig()
    a, _ = generate_codes(model, text, [5, 6, 7], cfg, precision="bf16")
    assert torch.equal(a, generate_codes(model, text, [5, 6, 7], cfg, precision="bf16")[0])
    alone, _ = generate_codes(model, text[1:2], [6], cfg, precision="bf16")
    assert torch.equal(alone[0], a[1])


def test_wide_attention_falls_back_to_sdpa_when_compiling_fails(monkeypatch, capsys):
    from dallecli.models import cpu_decode

    def broken(*args):
        raise RuntimeError("no C++ compiler\nsecond line")

    monkeypatch.setattr(cpu_decode, "_compiled", [broken])
    q, k, v = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 9, 8).bfloat16(), torch.randn(1, 2, 9, 8).bfloat16()
    want = F.scaled_dot_product_attention(q, k.float(), v.float())
    assert torch.equal(cpu_decode.wide_attention(q, k, v, None), want)
    assert cpu_decode._compiled == [None]  # not tried again
    message = capsys.readouterr().err
    assert "no C++ compiler" in message and "second line" not in message
    assert torch.equal(cpu_decode.wide_attention(q, k, v, None), want)
    assert capsys.readouterr().err == ""  # warned once


def test_cache_dtype_on_a_cpu_is_bf16_only_for_long_streams_with_bf16_products():
    from types import SimpleNamespace

    from dallecli.models.prior import CPU_BF16_ATTENTION_FROM
    from dallecli.sample import cache_dtype

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    short, long = SimpleNamespace(seq_len=CPU_BF16_ATTENTION_FROM - 1), SimpleNamespace(seq_len=CPU_BF16_ATTENTION_FROM)
    assert cache_dtype(short, torch.bfloat16, cpu) == torch.float32
    assert cache_dtype(long, torch.bfloat16, cpu) == torch.bfloat16
    assert cache_dtype(long, torch.float32, cpu) == torch.float32
    assert cache_dtype(short, torch.bfloat16, gpu) == torch.bfloat16


def test_single_query_attention_on_a_bf16_cache_computes_in_fp32():
    from dallecli.models.prior import attend

    q, k, v = torch.randn(2, 3, 1, 8), torch.randn(2, 3, 600, 8), torch.randn(2, 3, 600, 8)
    kb, vb = k.bfloat16(), v.bfloat16()
    expected = F.scaled_dot_product_attention(q, kb.float(), vb.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = attend(q.bfloat16(), kb, vb, None, 0.0)
    assert got.dtype == torch.bfloat16
    widened = F.scaled_dot_product_attention(q.bfloat16().float(), kb.float(), vb.float())
    assert torch.allclose(got.float(), widened, atol=1e-2)
    assert torch.allclose(attend(q, kb, vb, None, 0.0).float(), expected, atol=1e-6)


def test_cache_is_reusable_and_checked():
    c = MICRO
    model = model_of(c)
    text, image = batch(c, B=2)
    cache = model.init_cache(batch=2)
    model.prefill(cache, text, image[:, :5])
    again = model.prefill(cache, text)  # a new prefill restarts the stream
    assert cache.length == c.text_len + 1
    assert torch.allclose(again[:, 0], model(text, image)[1][:, 0], atol=1e-5)
    with pytest.raises(ValueError, match="cache"):
        model.prefill(model.init_cache(batch=2, max_len=4), text)
    with pytest.raises(ValueError, match="nothing to generate"):
        model.prefill(cache, text, image)


def test_cached_decoding_under_bf16_autocast_with_an_fp32_cache():
    c = dataclasses.replace(MICRO, attention="paper")
    model = model_of(c)
    text, image = batch(c, B=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, full = model(text, image)
        cache = model.init_cache(batch=2)  # fp32: the parameters' dtype
        logits = [model.prefill(cache, text)[:, 0]] + [model.decode_step(cache, image[:, j]) for j in range(3)]
    assert cache.k.dtype == torch.float32 and logits[0].dtype == torch.float32
    assert torch.allclose(torch.stack(logits, 1), full[:, :4], atol=0.1)


def test_wrong_input_shapes_are_refused():
    model = model_of(MICRO)
    text, image = batch(MICRO, B=2)
    with pytest.raises(ValueError, match=r"expected text \(B, 5\)"):
        model(text[:, :4], image)
    with pytest.raises(ValueError, match="image"):
        model(text, image[:1])


def test_activation_checkpointing_gives_equal_gradients():
    c = MICRO
    text, image = batch(c)
    grads = []
    for flag in (False, True):
        model = model_of(dataclasses.replace(c, checkpoint_activations=flag)).train()
        loss, _ = prior_loss(*model(text, image), text, image, c.pad_id)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name


def test_param_groups_decay_only_linear_weights():
    model = model_of(MICRO)
    decay, no_decay = param_groups(model, 0.045)
    assert decay["weight_decay"] == 0.045 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert "text_head.weight" in decayed and "blocks.0.attn.c_attn.weight" in decayed
    assert all(n.endswith(".weight") and "ln" not in n and "embed" not in n for n in decayed)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert {"text_pad", "text_pos", "bos", "image_row", "text_embed.weight", "blocks.0.ln_1.weight",
            "blocks.0.mlp.c_fc.bias"} <= {names[id(p)] for p in no_decay["params"]}


def test_flops_per_token_formula():
    c = MICRO
    d, L, T = c.d_model, c.n_layers, c.seq_len
    blocks = L * (12 * d * d + 13 * d)
    heads = ((c.text_len - 1) * c.text_vocab + c.image_len * c.image_vocab) * d / T
    expected = 6 * (blocks + 2 * d + heads) + 12 * L * d * T
    assert math.isclose(flops_per_token(c), expected)
    assert flops_per_token(c, seq_len=2 * T) > flops_per_token(c)


def test_training_reduces_the_loss():
    c = MICRO
    model = model_of(c).train()
    text, image = batch(c)
    opt = torch.optim.AdamW(param_groups(model, 0.01), lr=3e-3)
    losses = []
    for _ in range(15):
        loss, _ = prior_loss(*model(text, image), text, image, c.pad_id)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_accumulated_micro_batches_weigh_every_caption_token_alike(tmp_path):
    """A batch of 8 in one go, or as 2 accumulated micro-batches of 4: the same samples, with captions of
    different lengths. The text loss is averaged over the tokens of the whole batch either way (§2.2), not per
    micro-batch (which weighs a micro-batch of short captions more), so the losses and the weights agree."""
    import json

    from dallecli import checkpoint
    from dallecli.train.loop import train
    from tests.fixtures import tasks
    from tests.fixtures.runs import make_prior_run

    run = make_prior_run(tmp_path / "run")
    cfg = dataclasses.replace(tasks.PRIOR_CFG, steps=3, eval_every=0, save_every=3, ema_decay=None)
    outs = {}
    for name, batch, accum in (("one", 8, 1), ("accumulated", 4, 2)):
        outs[name] = tmp_path / name
        train(tasks.prior_task(run, batch_size=batch, dropout=0.0),
              dataclasses.replace(cfg, batch_size=batch, grad_accum=accum), outs[name])

    def logged(folder):
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        return [(r["text_loss"], r["image_loss"]) for r in rows if r["split"] == "train"]

    one, accumulated = logged(outs["one"]), logged(outs["accumulated"])
    assert len(one) == len(accumulated) == 3
    for a, b in zip(one, accumulated):
        assert b == pytest.approx(a, rel=1e-5)
    wa = checkpoint.load(outs["one"], "prior").weights(ema=False)
    wb = checkpoint.load(outs["accumulated"], "prior").weights(ema=False)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-6)


def test_text_targets_count_what_prior_loss_normalises_by():
    from dallecli.models.prior import prior_loss, text_targets

    text = torch.tensor([[5, 6, 7, 0], [8, 0, 0, 0], [9, 4, 0, 0]])  # pad 0; position 0 is never a target
    assert text_targets(text, 0) == 3
    torch.manual_seed(0)
    tl, il, image = torch.randn(3, 3, 10), torch.randn(3, 4, 6), torch.randint(6, (3, 4))
    own, _ = prior_loss(tl, il, text, image, 0)
    given, _ = prior_loss(tl, il, text, image, 0, text_norm=text_targets(text, 0))
    torch.testing.assert_close(own, given)


def test_decode_drops_captions_at_the_cond_drop_rate_and_evaluates_without_dropout(tmp_path):
    import numpy as np

    from tests.fixtures import tasks
    from tests.fixtures.runs import make_prior_run

    run = make_prior_run(tmp_path / "run", n_train=12, n_val=0, per_shard=12, grid=4, vocab=32)
    task = tasks.prior_task(run, grid=4, vocab=32, cond_drop=0.2)
    caption = "a green cross to the left of a yellow circle"
    members = {"codes": np.zeros(16, "<u2").tobytes(), "txt": caption.encode()}
    pad = task.config.pad_id
    rng = np.random.default_rng(0)
    empty = sum(bool((task.decode(members, rng)[0] == pad).all()) for _ in range(2000))
    assert 320 < empty < 480  # ≈ 20 % of 2000
    plain = task.tokenizer.encode(caption)[: task.config.text_len]
    for seed in range(50):  # evaluation: neither caption dropout nor BPE-dropout
        text, _ = task.decode(members, np.random.default_rng(seed), train=False)
        assert text[: len(plain)].tolist() == plain and (text[len(plain):] == pad).all()
