"""The offline demo in one place: the paper's comparison in miniature on real data from Debian packages.

* ``debian`` — fetching the packages (apt-get download, cached) and parsing their file formats;
* ``corpus`` — the demo corpus: raw JSONL/LLaVA files from those sources, prepared by the same
  megavlm.prep functions as the tools (tokenizer, text, encoded images, conversations);
* ``short_vqa`` — short-answer visual questions for the instruction mix (LLaVA-1.5's recipe);
* ``suites`` — the offline evaluation suites from the demo's held-out assets (``OfflineSuite``, a
  megavlm.eval.api.Suite).

``megavlm demo`` itself (training the branches and scoring them) is megavlm.experiment.demo.

Building happens before training (megavlm.prepare); the trainer only reads the prepared files.
"""
