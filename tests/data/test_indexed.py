"""Indexed token datasets and embedding stores: round trips, megatron compatibility, loud errors."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from megavlm.data.indexed import (DataError, EmbeddingStore, EmbeddingWriter, IndexedWriter, TokenData,
                                  token_dtype)


def write_tokens(prefix: Path, docs, vocab=1000):
    with IndexedWriter(prefix, token_dtype(vocab)) as w:
        for d in docs:
            w.add(d)


def test_token_round_trip_and_megatron_reads_it(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    docs = [[1, 2, 3], [4], list(range(100, 400))]
    write_tokens(tmp_path / "t", docs)
    td = TokenData(tmp_path / "t")
    assert td.lengths.tolist() == [3, 1, 300]
    assert td.get(2, 5, 3).tolist() == [105, 106, 107]
    mg = IndexedDataset(str(tmp_path / "t"))
    assert mg.index.dtype == np.uint16
    assert [mg[i].tolist() for i in range(3)] == docs
    write_tokens(tmp_path / "big", [[70000, 1]], vocab=100_000)
    assert TokenData(tmp_path / "big")[0].tolist() == [70000, 1]
    big = IndexedDataset(str(tmp_path / "big"))  # keep it alive: megatron closes its mmap on delete
    assert big.index.dtype == np.int32


def test_out_of_range_ids_and_aborted_write_leave_nothing(tmp_path):
    with pytest.raises(DataError, match="record 1 has values outside uint16"):
        write_tokens(tmp_path / "t", [[1], [70000]])
    assert list(tmp_path.iterdir()) == []


def test_truncated_and_mismatched_pairs(tmp_path):
    write_tokens(tmp_path / "a", [[1, 2, 3]] * 10)
    write_tokens(tmp_path / "b", [[1, 2]] * 10)
    bin_a = (tmp_path / "a.bin").read_bytes()
    (tmp_path / "a.bin").write_bytes(bin_a[:-7])
    with pytest.raises(DataError, match=r"a\.bin: .*ends inside record 8.*truncated or mismatched"):
        TokenData(tmp_path / "a")
    (tmp_path / "a.bin").write_bytes((tmp_path / "b.bin").read_bytes())
    with pytest.raises(DataError, match="a.bin"):
        TokenData(tmp_path / "a")
    (tmp_path / "b.idx").write_bytes((tmp_path / "b.idx").read_bytes()[:40])
    with pytest.raises(DataError, match=r"b\.idx: truncated index"):
        TokenData(tmp_path / "b")
    (tmp_path / "c.idx").write_bytes(b"garbage" * 10)
    (tmp_path / "c.bin").write_bytes(b"")
    with pytest.raises(DataError, match=r"c\.idx: not a megatron \.idx"):
        TokenData(tmp_path / "c")
    with pytest.raises(DataError, match=r"missing\.idx: missing"):
        TokenData(tmp_path / "missing")


@pytest.mark.parametrize("dtype,tdt", [("bfloat16", torch.bfloat16), ("float16", torch.float16)])
def test_embedding_round_trip_is_exact(tmp_path, dtype, tdt):
    x = [torch.randn(6, 5) * 10 for _ in range(3)]
    with EmbeddingWriter(tmp_path / "e", encoder="enc", num_patches=6, embed_dim=5, dtype=dtype,
                         image_size=64) as w:
        for i, t in enumerate(x):
            w.add(t, key=f"k{i}")
    st = EmbeddingStore(tmp_path / "e", embed_dim=5, num_patches=6)
    assert st.meta.keys == ["k0", "k1", "k2"] and st.meta.dtype == dtype and st.meta.image_size == 64
    for i, t in enumerate(x):
        assert torch.equal(st.get_tensor(i), t.to(tdt))
        assert st.get(i).dtype == np.uint16


def test_store_refuses_config_mismatch_nonfinite_and_incomplete(tmp_path):
    with EmbeddingWriter(tmp_path / "e", encoder="enc", num_patches=4, embed_dim=3) as w:
        for _ in range(3):
            w.add(torch.ones(4, 3))
    with pytest.raises(DataError, match="embed_dim=8"):
        EmbeddingStore(tmp_path / "e", embed_dim=8, num_patches=4)
    with pytest.raises(DataError, match="num_patches=9"):
        EmbeddingStore(tmp_path / "e", embed_dim=3, num_patches=9)
    with pytest.raises(DataError, match="from encoder 'enc' but the config says model.vision.encoder='siglip'"):
        EmbeddingStore(tmp_path / "e", embed_dim=3, num_patches=4, encoder="siglip")
    EmbeddingStore(tmp_path / "e", embed_dim=3, num_patches=4, encoder="enc")
    # NaN smuggled into record 2 on disk
    raw = bytearray((tmp_path / "e.bin").read_bytes())
    raw[2 * 12 * 2: 2 * 12 * 2 + 2] = np.array([0x7FC0], np.uint16).tobytes()
    (tmp_path / "e.bin").write_bytes(bytes(raw))
    st = EmbeddingStore(tmp_path / "e")
    st.get(1)
    with pytest.raises(DataError, match=r"e\.bin: record 2 has NaN/Inf"):
        st.get(2)
    with pytest.raises(DataError, match="record 1 .* NaN/Inf"):
        with EmbeddingWriter(tmp_path / "f", encoder="enc", num_patches=2, embed_dim=2) as w:
            w.add(torch.zeros(2, 2))
            w.add(torch.tensor([[0.0, float("inf")], [0, 0]]))
    assert not list(tmp_path.glob("f*")) and not list(tmp_path.glob(".f*"))
    with pytest.raises(DataError, match=r"shape \(3, 2\)"):
        with EmbeddingWriter(tmp_path / "g", encoder="enc", num_patches=2, embed_dim=2) as w:
            w.add(torch.zeros(3, 2))
    (tmp_path / "e.json").unlink()
    with pytest.raises(DataError, match=r"e\.json: missing"):
        EmbeddingStore(tmp_path / "e")


def test_store_count_and_width_consistency(tmp_path):
    with EmbeddingWriter(tmp_path / "e", encoder="enc", num_patches=2, embed_dim=2) as w:
        w.add(torch.zeros(2, 2))
    meta = json.loads((tmp_path / "e.json").read_text())
    meta["count"] = 5
    (tmp_path / "e.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="1 records but e.json says 5"):
        EmbeddingStore(tmp_path / "e")
    meta["count"], meta["embed_dim"] = 1, 3
    (tmp_path / "e.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="record 0 holds 4 values, expected 2x3=6"):
        EmbeddingStore(tmp_path / "e")


def test_megatron_rank_warning_is_silent_outside_a_distributed_job(monkeypatch):
    """A tool is no distributed job: megatron's 'Defaulting to rank 0' warning is not printed."""
    import warnings

    from megavlm.data.indexed import _megatron

    for var in ("RANK", "SLURM_PROCID"):
        monkeypatch.delenv(var, raising=False)
    from megatron.core._rank_utils import safe_get_rank

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")  # every warning shown, whatever was shown before ...
        _megatron()  # ... but the one megavlm silences
        assert safe_get_rank() == 0
    assert not [w for w in seen if "Could not determine rank" in str(w.message)]
