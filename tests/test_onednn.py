"""oneDNN linear layers: the same values and gradients as nn.Linear, and F.linear wherever they do not apply."""
import pytest
import torch
import torch.nn as nn

from dallecli.models.onednn import BLASLinear, Linear, PackedLinear, decode_linear, linear, packed_linear_available

pytestmark = pytest.mark.skipif(not packed_linear_available(), reason="this torch has no oneDNN linear ops")


@pytest.fixture
def not_intel(monkeypatch):
    """The oneDNN path as it runs on a non-Intel CPU (on Intel CPUs fp32 products stay with MKL)."""
    import dallecli.models.onednn as onednn

    monkeypatch.setattr(onednn, "cpu_is_intel", lambda: False)


@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_nn_linear_forward_and_backward(bias, not_intel):
    torch.manual_seed(0)
    assert type(Linear(3, 4)(torch.randn(2, 3)).grad_fn).__name__ == "_OneDNNLinearBackward"
    ours, ref = Linear(24, 40, bias=bias), nn.Linear(24, 40, bias=bias)
    ref.load_state_dict(ours.state_dict())  # the same parameters and state-dict names
    x = torch.randn(3, 7, 24, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = ours(x), ref(x_ref)
    assert y.shape == (3, 7, 40) and torch.allclose(y, y_ref, atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-5)
    assert torch.allclose(ours.weight.grad, ref.weight.grad, atol=1e-4)
    if bias:
        assert torch.allclose(ours.bias.grad, ref.bias.grad, atol=1e-5)


def test_linear_uses_oneDNN_only_for_fp32_cpu_outside_autocast_off_intel(not_intel, monkeypatch):
    import dallecli.models.onednn as onednn

    x, w = torch.randn(5, 8, requires_grad=True), torch.randn(6, 8, requires_grad=True)
    with monkeypatch.context() as m:  # an Intel CPU: MKL's AVX-512 products are the faster ones there
        m.setattr(onednn, "cpu_is_intel", lambda: True)
        assert "OneDNN" not in type(linear(x, w).grad_fn).__name__
    assert type(linear(x, w).grad_fn).__name__ == "_OneDNNLinearBackward"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = linear(x, w)
    assert y.dtype == torch.bfloat16 and "OneDNN" not in type(y.grad_fn).__name__
    assert "OneDNN" not in type(linear(x.double(), w.double()).grad_fn).__name__
    assert linear(x[:0], w).shape == (0, 6)  # no rows: F.linear


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.bfloat16, 5e-2)])
def test_packed_linear_matches_and_fuses_gelu(dtype, atol):
    torch.manual_seed(0)
    layer = nn.Linear(32, 48)
    x = torch.randn(4, 32)
    assert torch.allclose(PackedLinear(layer, dtype, rows=4)(x).float(), layer(x), atol=atol)
    gelu = PackedLinear(layer, dtype, rows=4, gelu=True)(x[:2])  # packed for 4 rows, run on 2
    assert torch.allclose(gelu.float(), nn.functional.gelu(layer(x[:2])), atol=atol)


def test_decode_linear_takes_mkl_for_small_fp32_weights_on_intel_only(monkeypatch):
    import dallecli.models.onednn as onednn

    torch.manual_seed(0)
    small, large = nn.Linear(32, 48), nn.Linear(512, onednn.BLAS_MAX_WEIGHT // 512 + 1)
    x = torch.randn(4, 32)
    monkeypatch.setattr(onednn, "cpu_is_intel", lambda: True)
    blas = decode_linear(small, torch.float32, rows=4)
    assert isinstance(blas, BLASLinear)
    assert torch.allclose(blas(x), small(x), atol=1e-5)
    assert torch.allclose(decode_linear(small, torch.float32, rows=4, gelu=True)(x[:2]),
                          nn.functional.gelu(small(x[:2])), atol=1e-5)
    no_bias = nn.Linear(32, 8, bias=False)
    assert torch.allclose(decode_linear(no_bias, torch.float32, rows=4)(x), no_bias(x), atol=1e-5)
    assert isinstance(decode_linear(small, torch.bfloat16, rows=4), PackedLinear)  # MKL has no bf16 product
    assert isinstance(decode_linear(large, torch.float32, rows=4), PackedLinear)
    monkeypatch.setattr(onednn, "cpu_is_intel", lambda: False)  # MKL's AVX2 code on other CPUs
    assert isinstance(decode_linear(small, torch.float32, rows=4), PackedLinear)
