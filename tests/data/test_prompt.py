"""One prompt path: the evaluation prompt of a question is, token for token, the training
conversation's prefix up to the answer (megavlm.data.prompt, used by megavlm.prep.conversations
and megavlm.eval.vision)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from megavlm.config import DEFAULT_PROMPT_TEMPLATE
from megavlm.data.prompt import question_prompt, user_text
from megavlm.prep.conversations import format_conversation

SUFFIX = "\nAnswer the question using a single word or phrase."


@pytest.mark.parametrize("human,template", [
    ("<image>\nthe red cat?", "\n{question}"),  # the docs' template for plain questions
    ("<image>\nthe red cat?" + SUFFIX, DEFAULT_PROMPT_TEMPLATE),  # LLaVA-1.5 short answers
    ("the red cat?\n<image>", "{question}"),  # tag after the question
    ("<image>\nthe red cat?", "{question}"),
])
def test_eval_prompt_is_the_training_prefix_up_to_the_answer(tok, human, template):
    from megavlm.eval.vision import prompt_ids

    rec = {"image": "x.png", "conversations": [{"from": "human", "value": human},
                                               {"from": "gpt", "value": "red"}]}
    ids, tgt = format_conversation(rec, tok, "rec")
    model = SimpleNamespace(tok=tok, encode=tok.encode)  # what prompt_ids uses of a CheckpointModel
    asked = prompt_ids(model, "the red cat?", template)
    assert asked == question_prompt(tok, template, "the red cat?")
    assert ids[:len(asked)] == asked, (tok.decode(ids), tok.decode(asked))
    answer = ids[len(asked):]
    assert answer == tok.encode("red") + [tok.sep, tok.eod]
    assert all(tgt[len(asked):]) and not any(tgt[:len(asked)])  # the prefix is exactly the untrained part


def test_a_leading_newline_would_change_the_tokens(tok):
    """Why the shared function matters: the raw template text tokenizes differently."""
    assert tok.encode("\nthe red cat?") != tok.encode("the red cat?")
    assert user_text("\nthe red cat?") == user_text("<image>\nthe red cat?") == "the red cat?"


def test_template_without_question_is_an_error(tok):
    with pytest.raises(ValueError, match="must contain"):
        question_prompt(tok, "\nwhat?", "q")
