"""The hybrid model: HybridConfig, HybridModel, HybridForCausalLM, HybridCache; registered with the Auto classes.
preallocated_cache / preallocated_generation give any causal LM a cache allocated once (lctk.models.cache)."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from lctk.models.cache import HybridCache, preallocated_cache, preallocated_generation
from lctk.models.config import HybridConfig
from lctk.models.modeling import HybridForCausalLM, HybridModel

AutoConfig.register(HybridConfig.model_type, HybridConfig, exist_ok=True)
AutoModel.register(HybridConfig, HybridModel, exist_ok=True)
AutoModelForCausalLM.register(HybridConfig, HybridForCausalLM, exist_ok=True)

__all__ = [
    "HybridCache", "HybridConfig", "HybridForCausalLM", "HybridModel", "preallocated_cache", "preallocated_generation"
]
