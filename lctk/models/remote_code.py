"""The `auto_map` entries and code files saved with every lctk model, so that software which does not import lctk
(`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`, the `lm_eval` command, serving tools) loads
it, as long as lctk is installed.

The code files only re-export lctk's installed classes: transformers' dynamic module loader copies each file the
auto_map names into its module cache and imports it from there (checking first that its imports, here `lctk`, are
installed; a missing lctk is reported as such). So a folder holds no model code of its own, and a folder saved by an
older lctk loads with a newer one.

Inside lctk (and in any process that has imported lctk) the folder's code files are never run: importing
`lctk.models` registers `lctk_hybrid` with the Auto classes, and transformers builds a registered non-transformers
class in preference to the folder's auto_map (its `explicit_local_code`), with or without trust_remote_code. That is
why lctk's own loader (lctk.models.loading) loads lctk's folders without --trust-remote-code and needs no check of
their code files: what runs is the installed lctk, whatever the files say.
"""

from __future__ import annotations

from pathlib import Path

AUTO_MAP = {
    "AutoConfig": "configuration_lctk_hybrid.HybridConfig",
    "AutoModel": "modeling_lctk_hybrid.HybridModel",
    "AutoModelForCausalLM": "modeling_lctk_hybrid.HybridForCausalLM",
}
_HEADER = '"""lctk\'s {what}, re-exported for from_pretrained(folder, trust_remote_code=True); needs `pip install lctk`."""\n\n'
CODE_FILES = {
    "configuration_lctk_hybrid.py": _HEADER.format(what="HybridConfig")
    + "from lctk.models.config import HybridConfig\n\n__all__ = [\"HybridConfig\"]\n",
    "modeling_lctk_hybrid.py": _HEADER.format(what="HybridModel and HybridForCausalLM")
    + "from lctk.models.modeling import HybridForCausalLM, HybridModel\n\n"
    + "__all__ = [\"HybridForCausalLM\", \"HybridModel\"]\n",
}


def write_code_files(folder: str | Path) -> None:
    for name, text in CODE_FILES.items():
        (Path(folder) / name).write_text(text)
