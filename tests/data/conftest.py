"""Shared fixtures for the data tests: a real (tiny) sentencepiece tokenizer and synthetic corpora,
all built in temporary folders so the default suite needs no network and no cached assets."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

WORDS = ("the cat dog bird fish red blue green small large runs jumps sleeps eats near under over "
         "house tree river stone light dark quick slow happy sad old new one two three four five").split()


def synthetic_text(n_docs: int, seed: int = 0, min_words: int = 3, max_words: int = 200) -> list[str]:
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n_docs):
        k = int(rng.integers(min_words, max_words))
        docs.append(" ".join(WORDS[int(i)] for i in rng.integers(0, len(WORDS), k)) + ".")
    return docs


@pytest.fixture(scope="session")
def make_text():
    """synthetic_text(n_docs, seed=0, min_words=3, max_words=200) -> list of documents."""
    return synthetic_text


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory) -> Path:
    """A real sentencepiece BPE model (vocab 400 incl. specials) trained on synthetic sentences."""
    from megavlm.data.tokenizer import train_sentencepiece

    d = tmp_path_factory.mktemp("tok")
    txt = d / "train.txt"
    txt.write_text("\n".join(synthetic_text(2000, seed=1)) + "\nÄpfel über naïve café — “quotes” 123 456\n")
    train_sentencepiece([txt], d / "tok.model", vocab_size=400)
    return d / "tok.model"


@pytest.fixture(scope="session")
def tok(sp_model):
    from megavlm.data.tokenizer import load_tokenizer

    return load_tokenizer(sp_model)


def write_text_dataset(prefix: Path, tok, docs: list[str]) -> None:
    from megavlm.data.indexed import IndexedWriter, token_dtype

    with IndexedWriter(prefix, token_dtype(tok.vocab_size)) as w:
        for d in docs:
            w.add(tok.encode(d) + [tok.eod])


def write_caption_dataset(prefix: Path, tok, n: int, P: int, D: int, seed: int = 0,
                          dtype: str = "bfloat16") -> None:
    import torch

    from megavlm.data.indexed import EmbeddingWriter, IndexedWriter, token_dtype

    caps = synthetic_text(n, seed=seed, min_words=2, max_words=12)
    g = torch.Generator().manual_seed(seed)
    with EmbeddingWriter(f"{prefix}.embeds", encoder="test", num_patches=P, embed_dim=D, dtype=dtype,
                         image_size=32) as ew, IndexedWriter(prefix, token_dtype(tok.vocab_size)) as tw:
        for i, c in enumerate(caps):
            ew.add(torch.randn(P, D, generator=g), key=f"img{i}.png")
            tw.add(tok.encode(c))


def write_conversations(prefix: Path, tok, n: int, embeds: str | None, n_images: int, seed: int = 0) -> None:
    from megavlm.prep.conversations import preprocess_conversations

    rng = np.random.default_rng(seed)
    recs = []
    for i in range(n):
        img = f"img{int(rng.integers(n_images))}.png" if embeds and i % 3 else None
        q, a = synthetic_text(2, seed=seed * 1000 + i, max_words=20)
        rec = {"id": str(i), "conversations": [{"from": "human", "value": ("<image>\n" if img else "") + q},
                                               {"from": "gpt", "value": a}]}
        if img:
            rec["image"] = img
        recs.append(rec)
    src = prefix.with_name(prefix.name + "_src.json")
    src.write_text(json.dumps(recs))
    preprocess_conversations([src], prefix, tok, embeds=embeds)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory, sp_model, tok) -> Path:
    """A data root with tokenizer.model, text, captions (+embeds) and instructions; P=4, D=8."""
    import shutil

    root = tmp_path_factory.mktemp("corpus")
    shutil.copy(sp_model, root / "tokenizer.model")
    write_text_dataset(root / "text", tok, synthetic_text(300, seed=2, max_words=150))
    write_caption_dataset(root / "captions", tok, 120, P=4, D=8, seed=3)
    write_conversations(root / "instructions", tok, 80, str(root / "captions.embeds"), 120, seed=4)
    return root
