"""lctk: train, distil, extend and evaluate long-context hybrid language models.

Importing lctk registers HybridConfig / HybridForCausalLM with transformers' Auto classes. `lctk.kernels` must stay
importable on a bare GPU image with torch and triton only, so the model import is skipped when transformers is absent.

`lctk.kernels` and `lctk.evals` are the repository's top-level `kernels/` and `evals/` folders. They have no
`__init__.py`: a regular package there would shadow the Hugging Face `kernels` package (which transformers imports)
whenever the repository root is on sys.path. A wheel installs them inside `lctk/`; in a source checkout (run from the
root, or installed editable, where setuptools' finder cannot map a namespace sub-package) the finder below does.
"""

import importlib.machinery
import sys
from pathlib import Path

__version__ = "0.1.0"

_CHECKOUT_ROOT = Path(__file__).resolve().parent.parent


class _CheckoutFolders:
    """Meta-path finder for `lctk.kernels` / `lctk.evals` in a source checkout: namespace packages over the root
    folders of the same name. Consulted after the regular path finder, so an installed wheel's copies win."""

    folders = {"lctk.kernels": "kernels", "lctk.evals": "evals"}

    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        folder = cls.folders.get(fullname)
        if folder is None or not (_CHECKOUT_ROOT / folder).is_dir():
            return None
        spec = importlib.machinery.ModuleSpec(fullname, None, is_package=True)
        spec.submodule_search_locations = [str(_CHECKOUT_ROOT / folder)]
        return spec


if not (Path(__file__).parent / "kernels").is_dir() and _CheckoutFolders not in sys.meta_path:
    sys.meta_path.append(_CheckoutFolders)

try:
    from lctk.models import HybridConfig, HybridForCausalLM, HybridModel
except ImportError as missing:  # only the kernels are usable without (a recent enough) transformers
    if (missing.name or "").split(".")[0] != "transformers":
        raise
else:
    __all__ = ["HybridConfig", "HybridForCausalLM", "HybridModel"]
