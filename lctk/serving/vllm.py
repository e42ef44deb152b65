"""lctk's HybridForCausalLM as a vLLM model, built from vLLM's own layers (registered by `lctk.serving.register`).

The block is lctk's: x = x + mixer(RMSNorm(x)); x = x + SwiGLU(RMSNorm(x)) (no MLP when config.mlp is false), then
the final norm and the LM head (tied to the embedding when tie_word_embeddings). Per letter:
- `A`, `S`: vLLM's Attention (paged KV, any of its backends) with RoPE from vLLM's get_rope over config.rope_parameters
  (rotate-half, as Llama and lctk), scale 1/sqrt(head_dim), grouped KV heads; `S` with per_layer_sliding_window =
  attention.window (lctk's window counts the query itself: key s is seen by query t when t - window < s <= t, which
  is how vLLM reads a sliding window too).
- `M`: vLLM's MambaMixer2 (its chunked scan, causal conv1d and selective state update; the recurrent state paged
  by vLLM's hybrid cache manager). lctk's Mamba-2 is the same layer: in_proj splits into z, xBC, dt in that order,
  a depthwise conv with bias and silu over xBC, dt = softplus(dt + dt_bias) without limits, A = -exp(A_log),
  y + D x, then RMSNorm(y * silu(z)) per group (norm_before_gate=False) and out_proj. Only the weight names and the
  conv weight's shape differ ([conv_dim, K] in lctk, [conv_dim, 1, K] in vLLM). With mamba2.xb_heads (distilled
  students: x and B shared across heads) the shared rows are repeated at load (`widen_shared_xb`), which gives the
  same numbers with vLLM's unshared layer.
Anything else is refused before any weight is read (`lctk.serving.check`), and so is a checkpoint with a missing or
an unexpected tensor (one line naming it).

Numbers: in fp32 the plugin's greedy tokens equal lctk's generate with chunked prefill and prefix caching on
(tests/serving); vLLM's kernels (chunked scan, paged attention) sum in other orders than lctk's torch references, so
the logits are close, not bit-identical.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import CacheConfig, ModelConfig, VllmConfig
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.mamba.mamba_mixer2 import MambaMixer2
from vllm.model_executor.layers.mamba.mamba_utils import (
    MambaStateCopyFuncCalculator,
    MambaStateDtypeCalculator,
    MambaStateShapeCalculator,
)
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.interfaces import HasInnerState, IsHybrid, SupportsMambaPrefixCaching
from vllm.model_executor.models.llama import LlamaMLP
from vllm.model_executor.models.utils import maybe_prefix
from vllm.sequence import IntermediateTensors

from lctk.serving.check import servable_problem

# lctk tensor name part -> (vLLM parameter name part, shard of a fused parameter or None)
STACKED = {
    ".q_proj.": (".qkv_proj.", "q"),
    ".k_proj.": (".qkv_proj.", "k"),
    ".v_proj.": (".qkv_proj.", "v"),
    ".gate_proj.": (".gate_up_proj.", 0),
    ".up_proj.": (".gate_up_proj.", 1),
}
RENAMED = {".conv_weight": ".conv1d.weight", ".conv_bias": ".conv1d.bias", ".A_log": ".A"}


def refuse_unservable(config) -> None:
    problem = servable_problem(config)
    if problem is not None:
        raise ValueError(f"lctk serving: {problem}")


class LctkAttention(nn.Module):
    """`A` / `S`: lctk's q/k/v/o projections (fused into qkv_proj here) around vLLM's paged Attention."""

    def __init__(self, config, letter: str, cache_config: CacheConfig | None,
                 quant_config: QuantizationConfig | None, prefix: str):
        super().__init__()
        settings = config.attention
        self.head_dim = config.head_dim
        self.q_size = config.num_attention_heads * self.head_dim
        self.kv_size = config.num_key_value_heads * self.head_dim
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, config.num_attention_heads,
                                          config.num_key_value_heads, bias=settings["qkv_bias"],
                                          quant_config=quant_config, prefix=f"{prefix}.qkv_proj")
        self.o_proj = RowParallelLinear(self.q_size, config.hidden_size, bias=settings["o_bias"],
                                        quant_config=quant_config, prefix=f"{prefix}.o_proj")
        self.rotary_emb = get_rope(self.head_dim, max_position=config.max_position_embeddings,
                                   rope_parameters=config.rope_parameters, is_neox_style=True)
        self.attn = Attention(config.num_attention_heads, self.head_dim, self.head_dim**-0.5,
                              num_kv_heads=config.num_key_value_heads, cache_config=cache_config,
                              quant_config=quant_config, prefix=f"{prefix}.attn",
                              per_layer_sliding_window=settings["window"] if letter == "S" else None)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        out, _ = self.o_proj(self.attn(q, k, v))
        return out


def mamba2_mixer(config, model_config: ModelConfig | None, cache_config: CacheConfig | None,
                 quant_config: QuantizationConfig | None, prefix: str) -> MambaMixer2:
    """`M`: vLLM's MambaMixer2 with lctk's mamba2 settings."""
    s = config.mamba2
    d_inner = s["expand"] * config.hidden_size
    return MambaMixer2(hidden_size=config.hidden_size, ssm_state_size=s["state_size"],
                       conv_kernel_size=s["conv_kernel"], intermediate_size=d_inner, use_conv_bias=True,
                       use_bias=False, n_groups=s["n_groups"], num_heads=d_inner // s["head_dim"],
                       head_dim=s["head_dim"], rms_norm_eps=config.rms_norm_eps, activation="silu",
                       model_config=model_config, cache_config=cache_config, quant_config=quant_config,
                       prefix=prefix)


class LctkBlock(nn.Module):
    def __init__(self, config, layer_idx: int, vllm_config: VllmConfig, prefix: str):
        super().__init__()
        self.letter = config.pattern[layer_idx]
        cache_config, quant_config = vllm_config.cache_config, vllm_config.quant_config
        self.mixer_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        if self.letter == "M":
            self.mixer = mamba2_mixer(config, vllm_config.model_config, cache_config, quant_config, f"{prefix}.mixer")
        else:
            self.mixer = LctkAttention(config, self.letter, cache_config, quant_config, f"{prefix}.mixer")
        self.mlp_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps) if config.mlp else None
        self.mlp = LlamaMLP(config.hidden_size, config.intermediate_size, "silu", quant_config=quant_config,
                            prefix=f"{prefix}.mlp") if config.mlp else None

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        normed = self.mixer_norm(hidden_states)
        mixed = self.mixer(normed) if self.letter == "M" else self.mixer(positions, normed)
        hidden_states = hidden_states + mixed
        if self.mlp is None:
            return hidden_states
        return hidden_states + self.mlp(self.mlp_norm(hidden_states))


@support_torch_compile(dynamic_arg_dims={"input_ids": 0, "positions": -1, "intermediate_tensors": 0,
                                         "inputs_embeds": 0})
class LctkHybridModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        refuse_unservable(config)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size,
                                                   prefix=f"{prefix}.embed_tokens")
        self.layers = nn.ModuleList(LctkBlock(config, index, vllm_config, f"{prefix}.layers.{index}")
                                    for index in range(len(config.pattern)))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        hidden_states = self.embed_input_ids(input_ids) if inputs_embeds is None else inputs_embeds
        for layer in self.layers:
            hidden_states = layer(positions, hidden_states)
        return self.norm(hidden_states)


class LctkHybridForCausalLM(nn.Module, HasInnerState, IsHybrid, SupportsMambaPrefixCaching):
    """vLLM's model class for config.json's `HybridForCausalLM` (lctk_hybrid). The state classmethods describe
    the Mamba-2 layers' conv and SSM states, as vLLM's own Mamba-2 hybrids do (NemotronH, Bamba)."""

    @classmethod
    def get_mamba_state_dtype_from_config(cls, vllm_config: VllmConfig) -> tuple[torch.dtype, ...]:
        cache = vllm_config.cache_config
        return MambaStateDtypeCalculator.mamba2_state_dtype(vllm_config.model_config.dtype, cache.mamba_cache_dtype,
                                                            cache.mamba_ssm_cache_dtype)

    @classmethod
    def get_mamba_state_shape_from_config(cls, vllm_config: VllmConfig):
        config = vllm_config.model_config.hf_config
        refuse_unservable(config)  # called while vLLM sizes its caches, before the model is built
        s = config.mamba2
        d_inner = s["expand"] * config.hidden_size
        return MambaStateShapeCalculator.mamba2_state_shape(
            tp_world_size=vllm_config.parallel_config.tensor_parallel_size, intermediate_size=d_inner,
            n_groups=s["n_groups"], num_heads=d_inner // s["head_dim"], head_dim=s["head_dim"],
            state_size=s["state_size"], conv_kernel=s["conv_kernel"], num_spec=vllm_config.num_speculative_tokens)

    @classmethod
    def get_mamba_state_copy_func(cls):
        return MambaStateCopyFuncCalculator.mamba2_state_copy_func()

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.model = LctkHybridModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        if config.tie_word_embeddings:
            self.lm_head = self.model.embed_tokens
        else:
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size,
                                          quant_config=vllm_config.quant_config, prefix=maybe_prefix(prefix, "lm_head"))
        self.logits_processor = LogitsProcessor(config.vocab_size)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """lctk's tensors onto vLLM's parameters (q/k/v and gate/up into fused ones, renamed Mamba-2 tensors);
        a tensor with no parameter, or a parameter (or shard of one) no tensor fills, is one ValueError."""
        params = dict(self.named_parameters())
        expected = {source for name in params for source in lctk_names(name)}
        loaded: set[str] = set()
        for name, tensor in weights:
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue  # the embedding is the head
            target, shard = vllm_name(name)
            if target not in params:
                raise ValueError(f"lctk serving: unexpected tensor {name} in the checkpoint (no such weight in a "
                                 f"`{self.config.pattern}` model)")
            param = params[target]
            if name.endswith((".in_proj.weight", ".conv_weight", ".conv_bias")):
                tensor = widen_shared_xb(tensor, self.config, in_proj=name.endswith(".in_proj.weight"))
            if name.endswith(".conv_weight"):
                tensor = tensor.unsqueeze(1)  # [conv_dim, K] -> conv1d's [conv_dim, 1, K]
            loader = getattr(param, "weight_loader", default_weight_loader)
            loader(param, tensor) if shard is None else loader(param, tensor, shard)
            loaded.add(name)
        missing = sorted(expected - loaded)
        if missing:
            raise ValueError(f"lctk serving: the checkpoint has no tensor {missing[0]}"
                             + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        return set(params)


def widen_shared_xb(tensor: torch.Tensor, config, in_proj: bool) -> torch.Tensor:
    """Mamba-2 with mamba2.xb_heads (the shape distillation from attention gives: x and B shared across heads as
    grouped-query attention shares V and K) as a layer where every head has its own x and every group its own B: the
    rows of in_proj (and of the depthwise conv, whose channels are independent) that make the shared x heads and B
    groups are repeated the way lctk repeats their outputs (head h reads shared head h // (H / xb_heads)). The layer
    computes the same numbers; in_proj and the conv state grow to the unshared sizes."""
    s = config.mamba2
    shared = s["xb_heads"]
    if not shared:
        return tensor
    d_inner = s["expand"] * config.hidden_size
    heads, head_dim, state, groups = d_inner // s["head_dim"], s["head_dim"], s["state_size"], s["n_groups"]
    z, x, b, c, dt = tensor.split([d_inner if in_proj else 0, shared * head_dim, shared * state, groups * state,
                                   heads if in_proj else 0])
    x = x.unflatten(0, (shared, head_dim)).repeat_interleave(heads // shared, 0).flatten(0, 1)
    b = b.unflatten(0, (shared, state)).repeat_interleave(groups // shared, 0).flatten(0, 1)
    return torch.cat([z, x, b, c, dt])


def vllm_name(name: str) -> tuple[str, str | int | None]:
    """An lctk tensor name -> (the vLLM parameter it fills, its shard in a fused parameter or None)."""
    for part, (fused, shard) in STACKED.items():
        if part in name:
            return name.replace(part, fused), shard
    for part, renamed in RENAMED.items():
        if name.endswith(part):
            return name[: -len(part)] + renamed, None
    return name, None


def lctk_names(param_name: str) -> list[str]:
    """The lctk tensors that fill a vLLM parameter (inverse of vllm_name)."""
    shards = [param_name.replace(fused, part) for part, (fused, _) in STACKED.items() if fused in param_name]
    if shards:
        return shards
    for part, renamed in RENAMED.items():
        if param_name.endswith(renamed):
            return [param_name[: -len(renamed)] + part]
    return [param_name]
