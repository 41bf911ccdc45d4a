"""The user turn, built in one place for training and evaluation.

Why this module exists: training formats the first human turn of a conversation
(``"<image>\\nWhat colour?"``) and evaluation formats a question through the recipe's
``data.prompt_template`` (``"\\n{question}"``). When the two normalise text differently — training
stripped the text after removing ``<image>``, evaluation kept the template's leading ``"\\n"`` —
every evaluation question starts with tokens the model never saw after an image, and a model
that learned its task scores like chance. So both sides call :func:`user_turn` (text of a human
turn -> ids) and evaluation asks through :func:`question_prompt`, which is ``user_turn`` of the
template applied to the question followed by the assistant marker: the evaluation prompt is
then, token for token, the training conversation's prefix up to the answer.

It imports only the tokenizer, so megavlm.prep (preprocessing) and megavlm.eval can both use it.
"""

from __future__ import annotations

from megavlm.data.tokenizer import IMAGE, Tokenizer

IMAGE_TAG = IMAGE
"""The LLaVA image placeholder in a human turn's text; the image itself goes first in the sample."""


def user_text(value: str) -> str:
    """The text of a human turn as the model sees it: ``<image>`` removed, outer whitespace
    stripped (the image and the role marker stand where LLaVA puts the tag and its newline)."""
    return value.replace(IMAGE_TAG, "").strip()


def user_turn(tok: Tokenizer, value: str) -> list[int]:
    """``[USER] text [SEP]``: the ids of one human turn (masked in training)."""
    return [tok.special.user] + tok.encode(user_text(value)) + [tok.special.sep]


def question_prompt(tok: Tokenizer, template: str, question: str) -> list[int]:
    """What follows the image when evaluation asks ``question``: the human turn of
    ``template.format(question=question)``, then the assistant marker the answer follows."""
    if "{question}" not in template:
        raise ValueError(f"prompt template {template!r} must contain {{question}}")
    return user_turn(tok, template.format(question=question)) + [tok.special.assistant]
