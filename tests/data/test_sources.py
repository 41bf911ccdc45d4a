"""Sources: sample layouts, lengths known up front, caption/image alignment, too-long policy."""
from __future__ import annotations

import numpy as np
import pytest

from megavlm.data.indexed import DataError, TokenData
from megavlm.data.sources import CaptionSource, TextSource


def test_text_pieces(corpus, tok):
    src = TextSource([corpus / "text", corpus / "text"])
    n = len(TokenData(corpus / "text"))
    assert len(src) == 2 * n
    whole = src.sample(n + 3)
    assert whole.tokens.dtype == np.int64 and whole.tokens[-1] == tok.eod and whole.target.all()
    piece = src.sample(n + 3, 2, 4)
    assert piece.tokens.tolist() == whole.tokens[2:6].tolist()


def test_caption_layout(corpus, tok):
    src = CaptionSource(corpus / "captions", tok, embed_dim=8, num_patches=4, seq_length=64)
    caps = TokenData(corpus / "captions")
    s = src.sample(5)
    assert s.tokens.tolist() == [tok.image] * 4 + [tok.sep] + caps[5].tolist() + [tok.eod]
    assert s.target.tolist() == [False] * 5 + [True] * (len(caps[5]) + 1)
    assert s.image.shape == (4, 8) and s.image.dtype == np.uint16 and s.image_start == 0
    assert np.array_equal(s.image, src.store.get(5))
    assert src.lengths[5] == len(s.tokens)


def test_caption_too_long_and_misaligned(corpus, tok, tmp_path):
    short = CaptionSource(corpus / "captions", tok, embed_dim=8, num_patches=4, seq_length=9)
    assert short.truncated > 0 and short.lengths.max() == 9
    assert len(short.sample(int(np.argmax(short.lengths))).tokens) == 9
    with pytest.raises(DataError, match=r"captions\.bin: record \d+ is \d+ positions, longer than"):
        CaptionSource(corpus / "captions", tok, embed_dim=8, num_patches=4, seq_length=9, too_long="reject")
    with pytest.raises(DataError, match="more than the sequence"):
        CaptionSource(corpus / "captions", tok, embed_dim=8, num_patches=4, seq_length=5)
    import shutil
    for ext in (".embeds.bin", ".embeds.idx", ".embeds.json"):
        shutil.copy(corpus / f"captions{ext}", tmp_path / f"c{ext}")
    from megavlm.data.indexed import IndexedWriter
    with IndexedWriter(tmp_path / "c", np.uint16) as w:
        w.add([5, 6])
    with pytest.raises(DataError, match="1 captions but 120 images"):
        CaptionSource(tmp_path / "c", tok, embed_dim=8, num_patches=4, seq_length=64)
