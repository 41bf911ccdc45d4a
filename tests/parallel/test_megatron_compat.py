"""The megatron-core CPU compatibility layer: pinned to the version it was written against, every
shim in place after apply(), and each answering the CUDA assumption it names."""

from __future__ import annotations

import importlib

import pytest
import torch

from megavlm.parallel import cpu

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU layer applies only without CUDA")


def test_pinned_version(parallel1):
    import megatron.core

    assert megatron.core.__version__.split("+")[0] == cpu.MEGATRON_CORE_VERSION


def test_every_module_sees_the_cpu_view_of_torch(parallel1):
    for name, why in cpu.CPU_TORCH_MODULES.items():
        mod = importlib.import_module(name)
        assert isinstance(mod.torch, cpu._CpuTorch), name
        assert ".py" in why  # each shim names the megatron file it answers


def test_tensor_method_shims_wrap_their_targets(parallel1):
    for modname, path, why in cpu.TENSOR_METHOD_SHIMS:
        owner = importlib.import_module(modname)
        *parents, attr = path.split(".")
        for p in parents:
            owner = getattr(owner, p)
        fn = getattr(owner, attr)
        assert getattr(fn, "__wrapped__", None) is not None, path
        assert ".py" in why


def test_shimmed_behaviour(parallel1):
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.tensor_parallel import get_cuda_rng_tracker
    from megatron.core.transformer.utils import get_default_causal_mask

    assert get_default_causal_mask(4).device.type == "cpu"
    assert RotaryEmbedding(kv_channels=8, rotary_percent=1.0)(6).shape == (6, 1, 1, 8)
    before = torch.get_rng_state()
    with get_cuda_rng_tracker().fork():
        torch.rand(3)
    assert torch.equal(torch.get_rng_state(), before)  # the fork restores the default stream
    with cpu._tensors_act_as_cuda():
        t = torch.zeros(2)
        assert t.cuda() is t and t.type() == "torch.cuda.FloatTensor"
    assert torch.zeros(2).type() == "torch.FloatTensor"  # restored outside the block


def test_gloo_uses_unbatched_p2p(parallel1):
    from megavlm.config import ModelConfig, ParallelConfig
    from megavlm.model.specs import transformer_config

    assert parallel1.backend == "gloo" and parallel1.p2p_batched is False
    tc = transformer_config(ModelConfig(), ParallelConfig(pp=2, vpp=2), dtype=torch.float32,
                            batch_p2p_comm=parallel1.p2p_batched)
    assert tc.batch_p2p_comm is False
