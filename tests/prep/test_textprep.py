"""preprocess_text: formats, EOD, workers, errors, no half-written output, the CLI."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from megavlm.data.indexed import DataError, TokenData
from megavlm.prep.textprep import preprocess_text, read_documents


def test_jsonl_and_plain_text_with_eod(tmp_path, sp_model, tok, make_text):
    docs = make_text(50, seed=5)
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs[:30]) + "\n\n")
    (tmp_path / "b.txt").write_text("\n\n".join(docs[30:]) + "\n")
    st = preprocess_text([tmp_path / "a.jsonl", tmp_path / "b.txt"], tmp_path / "out", sp_model, progress=False)
    td = TokenData(tmp_path / "out")
    assert st.documents == len(td) == 50
    for i, d in enumerate(docs):
        assert td[i].tolist() == tok.encode(d) + [tok.eod]
    assert st.tokens == int(td.lengths.sum()) and st.tokens_per_s > 0


def test_two_workers_write_the_same_file(tmp_path, sp_model, make_text):
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in make_text(300, seed=6)))
    preprocess_text([tmp_path / "a.jsonl"], tmp_path / "one", sp_model, workers=1, chunk_docs=16, progress=False)
    preprocess_text([tmp_path / "a.jsonl"], tmp_path / "two", sp_model, workers=2, chunk_docs=16, progress=False)
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"one{ext}").read_bytes() == (tmp_path / f"two{ext}").read_bytes()


@pytest.mark.parametrize("workers", [1, 2])
def test_bad_input_names_file_and_line_and_writes_nothing(tmp_path, sp_model, workers):
    good = json.dumps({"text": "a cat"})
    (tmp_path / "u.jsonl").write_bytes((good + "\n").encode() * 40 + b'{"text": "bad \xff byte"}\n')
    with pytest.raises(DataError, match=r"u\.jsonl:41: invalid UTF-8"):
        preprocess_text([tmp_path / "u.jsonl"], tmp_path / "out", sp_model, workers=workers,
                        chunk_docs=4, progress=False)
    (tmp_path / "j.jsonl").write_text(good + "\n{not json\n")
    with pytest.raises(DataError, match=r"j\.jsonl:2: not valid JSON"):
        preprocess_text([tmp_path / "j.jsonl"], tmp_path / "out", sp_model, progress=False)
    (tmp_path / "f.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DataError, match=r"f\.jsonl:1: expected an object with a string field 'text'"):
        list(read_documents(tmp_path / "f.jsonl"))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(("out", ".out"))]


def test_cli(tmp_path, sp_model, capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
    try:
        import preprocess_text as tool
    finally:
        sys.path.pop(0)
    (tmp_path / "a.txt").write_text("first doc\n\nsecond doc\nstill second\n")
    assert tool.main(["--input", str(tmp_path / "a.txt"), "--tokenizer", str(sp_model),
                      "--output", str(tmp_path / "o"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "2 documents" in out and "tokens/s" in out
    assert tool.main(["--input", str(tmp_path / "none.txt"), "--tokenizer", str(sp_model),
                      "--output", str(tmp_path / "o2")]) == 1
