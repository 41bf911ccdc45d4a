"""megavlm.kernels: fused kernels behind megavlm.ops (a subpackage, so every install has them).

Every kernel here has a plain-PyTorch reference in ``megavlm.ops`` that is its spec; the ops
dispatchers are the only callers. Importing this package (or any of its host modules) must work
on a machine without CUDA and without Triton: Triton is imported only when a kernel launches.

Where the sources live: in the repository's top-level ``kernels/`` folder (DESIGN.md's layout),
under the import name ``megavlm.kernels`` in every form (a separate top-level import name once
existed only after an install: a plain checkout had no kernels and the loss silently fell back to
the reference):

* wheel / ``pip install .``: setup.py installs ``kernels/`` as this package (``package_dir``) and
  puts this file beside the sources as its ``__init__``.
* plain checkout on PYTHONPATH, editable install: this file is found under ``megavlm/kernels/`` and
  points the package's ``__path__`` at ``<repo>/kernels`` (no symlink: works on every platform and
  in a source archive).

``kernels/`` itself has no ``__init__.py`` on purpose: a regular package named ``kernels`` at the
repository root would shadow the PyPI ``kernels`` package (a transformers dependency, which also
hooks into setuptools) whenever the root is on ``sys.path`` — ``python -m`` or a wheel build there.

Modules:
    masked_ce         host side of the fused masked linear cross-entropy (``supports``,
                      ``masked_linear_cross_entropy``)
    masked_ce_triton  its Triton kernel bodies
"""

from pathlib import Path as _Path

if not (_Path(__file__).parent / "masked_ce.py").is_file():  # a source checkout: sources at <repo>/kernels
    _SOURCES = _Path(__file__).resolve().parents[2] / "kernels"
    if not (_SOURCES / "masked_ce.py").is_file():
        raise ImportError(f"megavlm.kernels: {_SOURCES}/masked_ce.py is missing; the fused kernels live in the "
                          "repository's top-level kernels/ folder (restore it, or install megavlm from a wheel)")
    __path__ = [str(_SOURCES)]
del _Path
