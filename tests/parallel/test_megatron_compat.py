"""megavlm.parallel.megatron_compat: the version pin is checked on every host, and each shim does
what it says — checked on behaviour (the megatron call it answers works, and where cheap, fails
without the shim), not on its comments. The optimizer-state shims are exercised by
tests/train/test_checkpoint_optimizer.py, the qk-norm flag by tests/model/test_build.py."""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from megavlm.parallel import megatron_compat as compat

ROOT = Path(__file__).resolve().parents[2]
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU shims apply only without CUDA")


def _python(code: str, tmp_path: Path, extra_path: str = "") -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (extra_path, str(ROOT)) if p))
    env.pop("MASTER_PORT", None)
    return subprocess.run([sys.executable, "-W", "ignore::DeprecationWarning", "-c", textwrap.dedent(code)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)


# ----------------------------------------------------------------------------- every host


def test_version_pin():
    compat.check_version("0.19.2")
    compat.check_version("0.19.2+local")
    for wrong in ("0.19.1", "0.20.0", "0.19.20"):
        with pytest.raises(RuntimeError, match=r"written for megatron-core 0\.19\.2, found " + wrong):
            compat.check_version(wrong)
    import megatron.core

    compat.check_version(megatron.core.__version__)  # the installed one


def test_apply_checks_the_pin_on_cuda_hosts_too(monkeypatch):
    import importlib.metadata

    monkeypatch.setattr(compat, "needed", lambda: False)  # as on a CUDA host
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.20.0")
    with pytest.raises(RuntimeError, match="found 0.20.0"):
        compat.apply()


_BROKEN_TE = 'raise OSError("libtransformer_engine.so: cannot open shared object file")\n'


@pytest.mark.slow
def test_te_that_fails_to_load_reads_as_absent(tmp_path):
    """An installed TE whose import raises OSError (a fake package stands in for a broken install)
    leaves megavlm on the local path: megatron's optimizer falls back to torch's AdamW, the TE
    backend is not selected, and a warning names the error. Without megavlm's guard the same
    install breaks ``import megatron.core``."""
    (tmp_path / "fake" / "transformer_engine").mkdir(parents=True)
    (tmp_path / "fake" / "transformer_engine" / "__init__.py").write_text(_BROKEN_TE)
    guarded = _python("""
        import warnings
        warnings.simplefilter("always")
        with warnings.catch_warnings(record=True) as seen:
            import megavlm
            import torch
            import megatron.core.optimizer as opt
        assert opt.Adam is torch.optim.AdamW and opt.USING_PYTORCH_OPTIMIZER, opt.Adam
        from megavlm.model.specs import select_backend
        assert select_backend("auto") == "local"
        msgs = [str(w.message) for w in seen if "Transformer Engine is installed but fails" in str(w.message)]
        assert len(msgs) == 1 and "libtransformer_engine.so" in msgs[0], msgs
        print("guarded ok")
    """, tmp_path, str(tmp_path / "fake"))
    assert guarded.returncode == 0 and "guarded ok" in guarded.stdout, guarded.stderr[-3000:]
    bare = _python("import megatron.core", tmp_path, str(tmp_path / "fake"))
    assert bare.returncode != 0 and "OSError: libtransformer_engine.so" in bare.stderr, bare.stderr[-2000:]


def test_te_guard_leaves_other_imports_and_import_errors_alone(tmp_path, monkeypatch):
    guard = compat._BrokenTEGuard()
    assert guard.find_spec("json") is None and guard.find_spec("transformer_engine_x") is None
    (tmp_path / "transformer_engine").mkdir()
    (tmp_path / "transformer_engine" / "__init__.py").write_text("import no_such_module_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "meta_path", [guard] + [f for f in sys.meta_path
                                                     if not isinstance(f, compat._BrokenTEGuard)])
    for name in [m for m in sys.modules if m.split(".")[0] == "transformer_engine"]:
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(ModuleNotFoundError, match="no_such_module_xyz"):  # TE's own ImportError
        importlib.import_module("transformer_engine")
    assert guard.failure is None
    (tmp_path / "transformer_engine" / "__init__.py").write_text(_BROKEN_TE)
    importlib.invalidate_caches()
    with pytest.warns(RuntimeWarning, match="fails to load"):
        with pytest.raises(ModuleNotFoundError, match="fails to load"):
            importlib.import_module("transformer_engine")
    with pytest.raises(ModuleNotFoundError, match="failed to load"):  # remembered, no retry
        importlib.import_module("transformer_engine.pytorch")
    assert "transformer_engine" not in sys.modules


# ------------------------------------------------------------------------------ CPU shims


@cpu_only
def test_every_listed_module_sees_the_cpu_view(parallel1):
    for name in compat.CPU_TORCH_MODULES:
        mod = importlib.import_module(name)
        assert isinstance(mod.torch, compat._CpuTorch), name
        assert "cuda" in inspect.getsource(mod), f"{name} no longer assumes CUDA: drop its shim"
        assert mod.torch.zeros(2, device="cuda").device.type == "cpu"
        assert mod.torch.empty(1, device=torch.device("cuda", 0)).device.type == "cpu"
        assert mod.torch.cuda.current_device() == "cpu"
        with mod.torch.cuda.stream(mod.torch.cuda.Stream()):
            mod.torch.cuda.synchronize()


@cpu_only
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
    with compat._tensors_act_as_cuda():
        t = torch.zeros(2)
        assert t.cuda() is t and t.type() == "torch.cuda.FloatTensor"
    assert torch.zeros(2).type() == "torch.FloatTensor"  # restored outside the block


@cpu_only
def test_rng_fork_warning_is_dropped(parallel1, monkeypatch):
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger = logging.getLogger("megatron.core.tensor_parallel.random")
    # other tests may have quietened megatron's loggers (megavlm.console) or disabled existing
    # loggers (a library's logging config): this one needs warnings. setLevel clears the cache.
    parent = logging.getLogger("megatron")
    saved = (parent.level, logger.level, logger.disabled, logging.root.manager.disable)
    parent.setLevel(logging.WARNING)
    logger.setLevel(logging.NOTSET)
    logger.disabled = False
    logging.disable(logging.NOTSET)
    logger.addHandler(handler)
    try:
        with get_cuda_rng_tracker().fork():
            torch.rand(3)  # moves the CPU generator, which *is* the tracked state on CPU
        logging.getLogger("megatron.core.tensor_parallel.random").warning("another message")
    finally:
        logger.removeHandler(handler)
        parent.setLevel(saved[0])
        logger.setLevel(saved[1])
        logger.disabled = saved[2]
        logging.disable(saved[3])
    assert seen == ["another message"]


@cpu_only
def test_tensor_method_shims(parallel1):
    from megatron.core.optimizer import clip_grads
    from megatron.core.optimizer import optimizer as moptimizer

    for modname, path, _ in compat.TENSOR_METHOD_SHIMS:  # each target is wrapped
        owner = importlib.import_module(modname)
        for part in path.split("."):
            owner = getattr(owner, part)
        assert hasattr(owner, "__wrapped__"), path
    for fn in (clip_grads.clip_grad_by_total_norm_fp32, moptimizer.clip_grad_by_total_norm_fp32):
        p = torch.nn.Parameter(torch.ones(4))
        p.grad = torch.tensor([0.0, 2.0, 0.0, 2.0])
        with pytest.raises(AssertionError):  # megatron's own check, without the shim
            fn.__wrapped__([p], 1.0, 4.0)
        fn([p], 1.0, 4.0)
        assert torch.allclose(p.grad, torch.tensor([0.0, 0.5, 0.0, 0.5]), atol=1e-6)


@cpu_only
def test_distributed_optimizer_param_check_needs_the_shim(parallel1, tmp_path, monkeypatch):
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    from megavlm.config import load_config
    from megavlm.model.build import build_model
    from megavlm.train.loop import build_optimizer, wrap_ddp
    from megavlm.train.plan import plan_run
    from tests import synthetic

    run = load_config(raw=synthetic.tiny_run(str(tmp_path), layers=1))
    chunks, tc = build_model(run, parallel1, torch.float32, backend="local")
    model = wrap_ddp(chunks, tc)
    build_optimizer(plan_run(run)[run.stages[0].name], model, torch.float32)  # works with the shim
    raw = DistributedOptimizer.__dict__["_build_model_and_main_param_groups"].__func__.__wrapped__
    monkeypatch.setattr(DistributedOptimizer, "_build_model_and_main_param_groups", classmethod(raw))
    chunks, tc = build_model(run, parallel1, torch.float32, backend="local")
    with pytest.raises(TypeError, match="Wrapped parameters must be one of"):
        build_optimizer(plan_run(run)[run.stages[0].name], wrap_ddp(chunks, tc), torch.float32)


@pytest.mark.slow
def test_paged_stash_stub_without_triton(tmp_path):
    """With triton absent (blocked here, as on a host without it) megatron's pipeline schedules
    still import, and the MoE paged-stash kernels raise when called; without the stub the import
    fails."""
    block = """
        import sys
        class NoTriton:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "triton":
                    raise ModuleNotFoundError("No module named 'triton'", name="triton")
        sys.meta_path.insert(0, NoTriton())
    """
    with_stub = _python(block + """
        from megavlm.parallel import megatron_compat
        megatron_compat._stub_paged_stash_ops()
        import megatron.core.pipeline_parallel.schedules
        from megatron.core.transformer.moe.ops import paged_stash
        try:
            paged_stash.paged_stash_copy_kernel()
        except RuntimeError as e:
            print("stub ok", e)
    """, tmp_path)
    assert with_stub.returncode == 0 and "stub ok" in with_stub.stdout, with_stub.stderr[-3000:]
    without = _python(block + "    import megatron.core.pipeline_parallel.schedules\n", tmp_path)
    assert without.returncode != 0 and "triton" in without.stderr, without.stderr[-2000:]


# ------------------------------------------------------------ the one-rank collective fast path


@cpu_only
def test_one_rank_collectives_match_gloo(parallel1):
    """Answered locally on a one-rank group, the collectives give what gloo gives."""
    x = torch.arange(6, dtype=torch.float32)
    for name, copy in (("all_reduce", False), ("broadcast", False)):
        fast = getattr(dist, name)
        assert hasattr(fast, "__wrapped__"), name  # the fast path is in place
        a, b = x.clone(), x.clone()
        args = {"all_reduce": (), "broadcast": (0,)}[name]
        fast(a, *args)
        fast.__wrapped__(b, *args)  # gloo
        assert torch.equal(a, b), name
        work = fast(a, *args, async_op=True)
        assert work.wait() and work.is_completed()
    for name in ("reduce_scatter_tensor", "all_gather_into_tensor"):
        fast = getattr(dist, name)
        out_fast, out_gloo = torch.zeros(6), torch.zeros(6)
        fast(out_fast, x)
        fast.__wrapped__(out_gloo, x)
        assert torch.equal(out_fast, out_gloo) and torch.equal(out_fast, x), name


_TWO_RANKS = """
import sys, torch, torch.distributed as dist
from megavlm.parallel.megatron_compat import _one_rank
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=rank, world_size=2)
all_reduce = _one_rank(dist.all_reduce, copy=False)
gather = _one_rank(dist.all_gather_into_tensor, copy=True)
x = torch.tensor([float(rank + 1)])
all_reduce(x)  # the world group has two ranks: this must go to gloo
out = torch.zeros(2)
gather(out, torch.tensor([float(rank)]))
singles = [dist.new_group([0]), dist.new_group([1])]
y = torch.tensor([float(rank + 1)])
all_reduce(y, group=singles[rank])  # one rank: answered locally, unchanged
print("result", x.item(), out.tolist(), y.item())
dist.destroy_process_group()
"""


@pytest.mark.distributed
def test_multi_rank_groups_still_go_to_gloo(tmp_path):
    script = tmp_path / "two.py"
    script.write_text(_TWO_RANKS)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    procs = [subprocess.Popen([sys.executable, str(script), str(r), str(tmp_path / "store")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for r in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    for r, (out, err) in enumerate(outs):
        assert procs[r].returncode == 0, err[-2000:]
        assert f"result 3.0 [0.0, 1.0] {r + 1.0}" in out, out + err[-2000:]
