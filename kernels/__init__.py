"""megavlm_kernels: fused kernels behind megavlm.ops (installed from the repo's kernels/ folder).

Every kernel here has a plain-PyTorch reference in ``megavlm.ops`` that is its spec; the ops
dispatchers are the only callers. Importing this package (or any of its host modules) must work
on a machine without CUDA and without Triton: Triton is imported only when a kernel launches.

Modules:
    masked_ce         host side of the fused masked linear cross-entropy (``supports``,
                      ``masked_linear_cross_entropy``)
    masked_ce_triton  its Triton kernel bodies
"""
