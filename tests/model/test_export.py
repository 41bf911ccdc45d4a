"""megavlm.model.export.full_tensors hands the tensor-parallel all-gather tensors on the
parameter's own device (NCCL takes no host tensors), in the parameter's dtype, and returns host
fp32 copies. A fake 2-rank group records what reaches the collective."""

import pytest
import torch
import torch.distributed as dist

from megavlm.model import export


class _Chunk(torch.nn.Module):
    def __init__(self, device, dtype):
        super().__init__()
        self.decoder = torch.nn.Module()
        self.decoder.layers = torch.nn.ModuleList()
        self.output_layer = torch.nn.Linear(4, 3, bias=False, device=device, dtype=dtype)
        w = self.output_layer.weight
        w.tensor_model_parallel, w.partition_dim, w.partition_stride = True, 0, 1


class _Reached(Exception):
    pass


def _fake_group(monkeypatch, seen, *, stop: bool):
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)

    def all_gather(parts, t, group=None):
        seen.append((t.device, t.dtype))
        if stop:
            raise _Reached
        for p in parts:
            p.copy_(t)

    monkeypatch.setattr(dist, "all_gather", all_gather)


def test_gather_runs_on_the_parameter_device(monkeypatch):
    # "meta" stands for a CUDA device here: anything but the host. The old code moved the shard
    # to the host first (a meta tensor cannot even be copied there).
    seen = []
    _fake_group(monkeypatch, seen, stop=True)
    chunk = _Chunk("meta", torch.bfloat16)
    with pytest.raises(_Reached):
        export.full_tensors([chunk], tp_group=object())
    assert seen == [(torch.device("meta"), torch.bfloat16)]


def test_gathered_tensors_come_back_on_the_host_in_fp32(monkeypatch):
    seen = []
    _fake_group(monkeypatch, seen, stop=False)
    chunk = _Chunk("cpu", torch.bfloat16)
    out = export.full_tensors([chunk], tp_group=object())
    w = out["output_layer.weight"]
    assert (w.device.type, w.dtype, tuple(w.shape)) == ("cpu", torch.float32, (6, 4))
    assert torch.equal(w, torch.cat([chunk.output_layer.weight.float()] * 2))
    assert seen == [(torch.device("cpu"), torch.bfloat16)]
    w.add_(1)  # a snapshot, not a view of the live parameter
    assert not torch.equal(w[:3], chunk.output_layer.weight.float())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gather_on_cuda_hands_nccl_cuda_tensors(monkeypatch):
    seen = []
    _fake_group(monkeypatch, seen, stop=False)
    chunk = _Chunk("cuda", torch.bfloat16)
    out = export.full_tensors([chunk], tp_group=object())
    assert seen == [(chunk.output_layer.weight.device, torch.bfloat16)]
    assert out["output_layer.weight"].device.type == "cpu"
