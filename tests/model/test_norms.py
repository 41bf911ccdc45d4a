"""megavlm.model.norms: the norms compute LayerNorm and save no fp32 copy of a 16-bit activation.

The TP > 1 qk-norm (statistics all-reduced over the group) is checked here on a one-rank group
against torch's layer norm in float64, forward and backward (gradcheck); tests/parallel's TP 2
parity test runs it over two ranks."""


import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megavlm.config import ModelConfig, ParallelConfig
from megavlm.model.norms import FullWidthQKNorm, GainLayerNorm, _GroupLayerNorm
from megavlm.model.specs import transformer_config


def _config(dtype):
    model = ModelConfig(hidden_size=64, num_attention_heads=4, ffn_hidden_size=96)
    return transformer_config(model, ParallelConfig(), dtype=dtype, batch_p2p_comm=False)


def _saved(fn, x):
    seen = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(t) or t, lambda t: t):
        y = fn(x)
    return y, seen


@pytest.mark.parametrize("norm", ["gain", "qk"])
def test_bf16_norms_save_no_fp32_activation(parallel1, norm):
    cfg = _config(torch.bfloat16)
    m = GainLayerNorm(cfg, 64) if norm == "gain" else FullWidthQKNorm(cfg, 16)
    shape = (8, 2, 64) if norm == "gain" else (8, 2, 4, 16)
    x = torch.randn(shape, dtype=torch.bfloat16, requires_grad=True)
    y, seen = _saved(m, x)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    big = [t for t in seen if t.numel() >= x.numel()]
    assert big and all(t.dtype == torch.bfloat16 for t in big), [(t.dtype, t.shape) for t in big]
    want = F.layer_norm(x.detach().float().reshape(8, 2, 64), (64,), m.weight.float(), None, m.eps)
    assert (y.float().reshape(8, 2, 64) - want).abs().max() < 3e-2


def test_group_layer_norm_equals_layer_norm_forward_and_backward(parallel1):
    group = dist.new_group([0])
    x = torch.randn(5, 3, 12, dtype=torch.float64, requires_grad=True)
    w = torch.randn(12, dtype=torch.float64, requires_grad=True)
    got = _GroupLayerNorm.apply(x, w, group, 12, 1e-5)
    assert torch.allclose(got, F.layer_norm(x, (12,), w, None, 1e-5), atol=1e-12)
    assert torch.autograd.gradcheck(lambda a, b: _GroupLayerNorm.apply(a, b, group, 12, 1e-5), (x, w))
    # shifted by a large mean: no cancellation in the variance
    big = (x.detach() + 1e4).requires_grad_()
    assert torch.allclose(_GroupLayerNorm.apply(big, w, group, 12, 1e-5),
                          F.layer_norm(big, (12,), w, None, 1e-5), atol=1e-6)


def test_qk_norm_at_tp1_is_a_layer_norm_over_the_full_width(parallel1):
    m = FullWidthQKNorm(_config(torch.float32), 16)
    with torch.no_grad():
        m.weight.copy_(torch.randn(64))
    x = torch.randn(8, 2, 4, 16)
    want = F.layer_norm(x.reshape(8, 2, 64), (64,), m.weight, None, m.eps).reshape(x.shape)
    assert torch.allclose(m(x), want, atol=1e-6)
