"""``megavlm selftest``: the acceptance run a user starts on a new machine or cluster after
installing (``make selftest``).

It reports what the machine has and which paths megavlm will take (environment), then checks
that they work and how fast (checks): the fused masked cross-entropy against its reference, the
TE layer spec against the local one when TE is usable, the masked-CE benchmark and a short
training-throughput run with MFU. It needs no network and installs nothing. On a GPU the sizes
are the recipe's (minutes on an H100/H200); without CUDA the same checks run at small sizes
(``--size small``), which is how CI tests it. Exit status: 0 when every check passed or was
skipped for a missing optional piece (the report names it), 1 when a check found a wrong result,
2 when a forced path cannot run (``MEGAVLM_MASKED_CE=fused`` without Triton/CUDA).
"""
