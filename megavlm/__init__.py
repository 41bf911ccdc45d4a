"""megavlm: a Megatron-style trainer for vision-language models.

Implements the recipe of *Should VLMs be Pre-trained with Image Data?* (Keh et al., ICLR 2025):
text pre-training of a DCLM decoder, image-text pre-training resumed from a fraction of it with
its cosine continued, and instruction fine-tuning — on megatron-core, from one YAML recipe.
"""

__version__ = "0.1.0"

# Before anything imports megatron-core: a Transformer Engine that is installed but fails to load
# (OSError) must read as absent to megatron, whose imports catch only ImportError. Imports nothing.
from megavlm.parallel.megatron_compat import install_te_import_guard as _install_te_import_guard

_install_te_import_guard()
