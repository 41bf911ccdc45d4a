"""Offline data preparation: raw text, images and conversations -> the files megavlm.data reads.

* ``textprep`` — documents (JSONL / plain text) -> token datasets (``.bin/.idx``, EOD appended);
* images -> an embedding store (``.embeds``) and caption tokens, by a frozen encoder: megavlm.encoders
  (outside this package because evaluation encodes benchmark images with the same code);
* ``conversations`` — LLaVA-format conversations -> tokens, loss masks and image references.

Why apart from megavlm.data: preparation runs once, before training, with its own costs (encoders,
multiprocessing, package downloads for the demo) and its own failures; the run-time package only
reads its output. tools/*.py are thin command lines over these functions; ``megavlm prepare``
(megavlm.prepare) runs what a recipe needs.
"""
