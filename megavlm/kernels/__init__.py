"""megavlm.kernels: fused kernels behind megavlm.ops (a subpackage, so every install has them).

Every kernel here has a plain-PyTorch reference in ``megavlm.ops`` that is its spec; the ops
dispatchers are the only callers. Importing this package (or any of its host modules) must work
on a machine without CUDA and without Triton: Triton is imported only when a kernel launches.

Why a subpackage: these sources used to live in a top-level ``kernels/`` folder that setup.py mapped
to a ``megavlm_kernels`` package. That name existed only after an install, so a plain checkout on
PYTHONPATH (an offline GPU box) had no kernels, their tests failed to collect and the loss fell
back to the reference. As ``megavlm.kernels`` they travel with megavlm in every form.

Modules:
    masked_ce         host side of the fused masked linear cross-entropy (``supports``,
                      ``masked_linear_cross_entropy``)
    masked_ce_triton  its Triton kernel bodies
"""
