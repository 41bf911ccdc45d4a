"""``megavlm selftest``: the acceptance run a user starts on a new machine or cluster after
installing (``make selftest``).

It reports what the machine has and which paths megavlm will take (environment), then checks
that they work and how fast (checks): the fused masked cross-entropy against its reference, the
TE layer spec against the local one when TE is usable, the masked-CE benchmark, a short
training-throughput run with MFU (text rows, packed rows of several documents — the varlen
attention path — and image-text rows), a checkpoint write with a bitwise resume of the next step,
and a short generation with the KV cache (megavlm.selftest.engine). It needs no network and
installs nothing. On a GPU the sizes are the recipe's (about 4 minutes on an H200); without CUDA
the same checks run at small sizes (``--size small``, under a minute), which is how CI tests it.
Every subprocess is bounded (300 s). SIGINT/SIGTERM stops the running check and writes the report
of what ran so far (no stop checkpoint: the training it runs installs no stop handlers; its
temporary checkpoints are removed). Every report goes to ``--out-dir``. Exit status: 0 when every
check passed or was skipped for a missing optional piece (the report names it), 1 when a check
found a wrong result, 2 when a forced path cannot run (``MEGAVLM_MASKED_CE=fused`` without
Triton/CUDA), 128 + the signal when interrupted.
"""
