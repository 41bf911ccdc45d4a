"""The preparation tests use the data tests' tiny tokenizer and synthetic corpora (one definition)."""
from tests.data.conftest import corpus, make_text, sp_model, tok  # noqa: F401
