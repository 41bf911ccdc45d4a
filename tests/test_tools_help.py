"""Every tool's --help shows the defaults of its options (megavlm.helpformat)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOOLS = sorted(p.stem for p in (REPO / "tools").glob("*.py") if "formatter_class" in p.read_text())


@pytest.mark.parametrize("name,option,default", [
    ("train_tokenizer", "--vocab-size", "8192"), ("preprocess_text", "--workers", "1"),
    ("encode_images", "--batch-size", "32"), ("encode_images", "--decoder", "auto"),
    ("export", "--dtype", "fp32"),
])
def test_tool_help_shows_defaults(name, option, default, capsys):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", REPO / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with pytest.raises(SystemExit):
        mod.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    options = text[text.index("options:"):]
    after = options[options.index(option + " "):]
    assert f"(default: {default})" in after[:400], after[:400]


def test_every_tool_uses_the_formatter():
    for name in TOOLS:
        assert "formatter_class=HelpFormatter" in (REPO / "tools" / f"{name}.py").read_text(), name


def test_eval_help_shows_defaults(capsys):
    from megavlm.eval.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["vision", "--help"])
    assert "(default: 128)" in " ".join(capsys.readouterr().out.split())
