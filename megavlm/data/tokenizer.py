"""One tokenizer interface for every backend, with the special tokens the recipe needs.

The data pipeline needs, besides text encoding, a fixed set of special ids: EOD between
documents, SEP after the image and after every conversation turn, PAD for empty positions, the
image placeholder that marks patch positions, and the conversation role markers. Backends differ
in which of these their vocabularies already hold, so the rule is the same for all of them: a
special token present in the vocabulary keeps its id, a missing one is appended after the base
vocabulary (``vocab_size`` counts them). Our own sentencepiece models (``train_sentencepiece``)
carry all of them as *control* symbols, which raw text can never produce.

Backends: sentencepiece ``.model`` files and Hugging Face ``tokenizers`` ``tokenizer.json`` files
(GPT-NeoX-20B for DCLM-1B); ``from_bpe_files`` builds the latter from GPT-2 style
``encoder.json`` + ``vocab.bpe`` files.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

EOD = "<eod>"
SEP = "<sep>"
PAD = "<pad>"
IMAGE = "<image>"
SYSTEM = "<|system|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, EOD, SEP, IMAGE, SYSTEM, USER, ASSISTANT)
"""Every special token, in the order ids are appended when a vocabulary lacks them."""

ALIASES: dict[str, tuple[str, ...]] = {
    EOD: ("<eod>", "<|endoftext|>", "</s>", "<eos>"),
    PAD: ("<pad>", "<|padding|>"),
}
"""Existing vocabulary entries that may stand for a special token (GPT-2/NeoX end-of-text as EOD)."""


class TokenizerError(ValueError):
    """A tokenizer file that is missing, unreadable or unsuitable."""


@dataclass(frozen=True)
class SpecialIds:
    """Ids of the special tokens."""

    pad: int
    eod: int
    sep: int
    image: int
    system: int
    user: int
    assistant: int


SENTENCEPIECE_IDS = SpecialIds(pad=0, eod=2, sep=3, image=4, system=5, user=6, assistant=7)
"""The ids ``train_sentencepiece`` gives the special tokens: PAD 0, (unk 1), then the control
symbols in ``SPECIAL_TOKENS`` order. Synthetic data that has no tokenizer (engine tests,
benchmarks) uses these ids too, so its rows look like the demo's."""
FIRST_ORDINARY_ID = 8
"""The first id of a sentencepiece model trained here that is neither special nor unk."""


class Tokenizer:
    """Text <-> ids plus the special ids. Subclasses implement ``_encode_batch``/``_decode``."""

    name: str
    base_vocab_size: int
    special: SpecialIds

    def _resolve_specials(self, lookup) -> None:
        """Find each special token via ``lookup(piece) -> id | None``, appending missing ones."""
        ids: dict[str, int] = {}
        next_id = self.base_vocab_size
        for tok in SPECIAL_TOKENS:
            found = None
            for alias in ALIASES.get(tok, (tok,)):
                found = lookup(alias)
                if found is not None:
                    break
            if found is None:
                found = next_id
                next_id += 1
            ids[tok] = found
        self._id_to_special = {v: k for k, v in ids.items()}
        self.special = SpecialIds(pad=ids[PAD], eod=ids[EOD], sep=ids[SEP], image=ids[IMAGE],
                                  system=ids[SYSTEM], user=ids[USER], assistant=ids[ASSISTANT])
        self.vocab_size = max(next_id, max(ids.values()) + 1)

    # convenient names used throughout the pipeline
    @property
    def eod(self) -> int:
        return self.special.eod

    @property
    def sep(self) -> int:
        return self.special.sep

    @property
    def pad(self) -> int:
        return self.special.pad

    @property
    def image(self) -> int:
        return self.special.image

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` (no special tokens added)."""
        return self._encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._encode_batch(list(texts))

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; special ids are rendered as their names."""
        out: list[str] = []
        run: list[int] = []
        for i in ids:
            i = int(i)
            if i in self._id_to_special:
                if run:
                    out.append(self._decode(run))
                    run = []
                out.append(self._id_to_special[i])
            else:
                run.append(i)
        if run:
            out.append(self._decode(run))
        return "".join(out)

    def _encode_batch(self, texts: list[str]) -> list[list[int]]:
        raise NotImplementedError

    def _decode(self, ids: list[int]) -> str:
        raise NotImplementedError


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece ``.model`` (BPE or unigram)."""

    def __init__(self, path: str | Path):
        import sentencepiece as spm

        path = Path(path)
        if not path.is_file():
            raise TokenizerError(f"sentencepiece model not found: {path}")
        self.path = path
        self.name = f"sentencepiece:{path.name}"
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(str(path))
        except Exception as e:  # sentencepiece raises OSError/RuntimeError on a bad file
            raise TokenizerError(f"{path}: not a sentencepiece model ({e})") from None
        self.base_vocab_size = self._sp.GetPieceSize()
        unk = self._sp.unk_id()

        def lookup(piece: str) -> Optional[int]:
            i = self._sp.PieceToId(piece)
            return None if i == unk and piece != self._sp.IdToPiece(unk) else i

        self._resolve_specials(lookup)

    def _encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._sp.Encode(texts, out_type=int, num_threads=1)

    def _decode(self, ids: list[int]) -> str:
        return self._sp.Decode(ids)


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizers`` tokenizer (``tokenizer.json``)."""

    def __init__(self, path: str | Path | None = None, *, tokenizer=None, name: str = ""):
        from tokenizers import Tokenizer as _HF

        if tokenizer is None:
            path = Path(path)  # type: ignore[arg-type]
            if not path.is_file():
                raise TokenizerError(f"tokenizer.json not found: {path}")
            try:
                tokenizer = _HF.from_file(str(path))
            except Exception as e:
                raise TokenizerError(f"{path}: not a tokenizers JSON file ({e})") from None
            name = name or f"hf:{path.name}"
        self.path = Path(path) if path is not None else None
        self.name = name or "hf"
        self._tok = tokenizer
        self.base_vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self._resolve_specials(tokenizer.token_to_id)

    def _encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)


def from_bpe_files(vocab_json: str | Path, merges_txt: str | Path) -> HFTokenizer:
    """A byte-level BPE tokenizer from GPT-2 style ``encoder.json``/``vocab.json`` + merges files."""
    from tokenizers import Tokenizer as _HF, decoders, models, pre_tokenizers

    for p in (vocab_json, merges_txt):
        if not Path(p).is_file():
            raise TokenizerError(f"BPE file not found: {p}")
    tok = _HF(models.BPE.from_file(str(vocab_json), str(merges_txt)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return HFTokenizer(tokenizer=tok, name=f"bpe:{Path(vocab_json).name}")


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Open a tokenizer by file type: ``.json`` = tokenizers, anything else = sentencepiece."""
    path = Path(path).expanduser()
    if not path.exists():
        raise TokenizerError(f"tokenizer file not found: {path}")
    if path.suffix == ".json":
        return HFTokenizer(path)
    return SentencePieceTokenizer(path)


def train_sentencepiece(inputs: Sequence[str | Path], out_model: str | Path, vocab_size: int = 8192,
                        *, max_sentences: int = 2_000_000, threads: int = 2) -> SentencePieceTokenizer:
    """Train a BPE sentencepiece model whose vocabulary (``vocab_size`` in total) holds every
    special token as a control symbol. ``inputs`` are text files, one sentence/paragraph a line.
    Written to a temporary name, then renamed."""
    import sentencepiece as spm

    out_model = Path(out_model)
    out_model.parent.mkdir(parents=True, exist_ok=True)
    for p in inputs:
        if not Path(p).is_file():
            raise TokenizerError(f"tokenizer training input not found: {p}")
    tmp_prefix = out_model.with_name(f".{out_model.stem}.tmp{os.getpid()}")
    controls = [t for t in SPECIAL_TOKENS if t != PAD]
    try:
        spm.SentencePieceTrainer.Train(
            input=[str(p) for p in inputs], model_prefix=str(tmp_prefix), model_type="bpe",
            vocab_size=vocab_size, character_coverage=0.9995, byte_fallback=True,
            pad_id=0, pad_piece=PAD, unk_id=1, bos_id=-1, eos_id=-1,
            control_symbols=controls, input_sentence_size=max_sentences,
            shuffle_input_sentence=True, num_threads=threads, minloglevel=2,
            split_digits=True, allow_whitespace_only_pieces=True, normalization_rule_name="identity",
        )
    except RuntimeError as e:
        raise TokenizerError(f"sentencepiece training failed: {e}") from None
    Path(f"{tmp_prefix}.model").replace(out_model)
    vocab = Path(f"{tmp_prefix}.vocab")
    vocab.replace(out_model.with_suffix(".vocab"))
    tok = SentencePieceTokenizer(out_model)
    if tok.vocab_size != vocab_size:
        raise TokenizerError(f"{out_model}: trained vocabulary is {tok.vocab_size}, asked {vocab_size}")
    return tok


def describe(tok: Tokenizer) -> str:
    return json.dumps({"name": tok.name, "vocab_size": tok.vocab_size, **tok.special.__dict__})
