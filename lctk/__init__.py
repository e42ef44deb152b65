"""lctk: train, distil, extend and evaluate long-context hybrid language models.

Importing lctk registers HybridConfig / HybridForCausalLM with transformers' Auto classes. `lctk.kernels` must stay
importable on a bare GPU image with torch and triton only, so the model import is skipped when transformers is absent.
"""

__version__ = "0.1.0"

try:
    from lctk.models import HybridConfig, HybridForCausalLM, HybridModel
except ImportError as missing:  # only the kernels are usable without (a recent enough) transformers
    if (missing.name or "").split(".")[0] != "transformers":
        raise
else:
    __all__ = ["HybridConfig", "HybridForCausalLM", "HybridModel"]
