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
- `G`: vLLM's Gated DeltaNet in Qwen3.5's flat layout (QwenGatedDeltaNetAttention, gqa_interleaved_layout=False: one
  fused [q, k, v, z] projection and a [b, a] one, filled as shards from lctk's q/k/v/g_proj and b/a_proj, so nothing
  is interleaved); conv without bias and silu over [q, k, v], L2-normed q/k in the kernel, scale 1/sqrt(d_k),
  g = -exp(A_log) softplus(a + dt_bias), beta = sigmoid(b), RMSNorm per head before the silu gate (eps rms_norm_eps),
  out_proj: lctk's definition (`lctk.serving.check` says where the numbers differ). expand_v value channels per key
  channel run as expand_v value heads (LctkGatedDeltaNet). Its CPU kernels run only in bfloat16 (the recurrent state
  in fp32) and prefill only heads of 64 or 128 channels, so on a CPU a model with `G` is served in bfloat16 with
  gated_deltanet.head_dim 64 or 128 (one line names the problem otherwise).
Anything else is refused before any weight is read (`lctk.serving.check`), and so is a checkpoint with a missing or
an unexpected tensor (one line naming it).

Numbers: in fp32 the plugin's greedy tokens equal lctk's generate with chunked prefill and prefix caching on
(tests/serving); vLLM's kernels (chunked scan, paged attention) sum in other orders than lctk's torch references, so
the logits are close, not bit-identical. With `G` (bf16) the tests bound vLLM's prompt log-probabilities against
lctk's fp32 forward by lctk's own bf16 error.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from types import SimpleNamespace

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import CacheConfig, ModelConfig, VllmConfig
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm, RMSNormGated
from vllm.model_executor.layers.linear import QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.mamba.gdn.qwen_gdn_linear_attn import QwenGatedDeltaNetAttention
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
from vllm.platforms import current_platform
from vllm.sequence import IntermediateTensors
from vllm.v1.kv_cache_interface import MambaSpec

from lctk.serving.check import servable_problem

# per layer letter: lctk tensor name part -> (vLLM parameter name part, shard of a fused parameter or None)
MLP = {".gate_proj.": (".gate_up_proj.", 0), ".up_proj.": (".gate_up_proj.", 1)}
ATTENTION = {".q_proj.": (".qkv_proj.", "q"), ".k_proj.": (".qkv_proj.", "k"), ".v_proj.": (".qkv_proj.", "v")}
NAME_PARTS = {
    "A": {**MLP, **ATTENTION},
    "S": {**MLP, **ATTENTION},
    "M": {**MLP, ".conv_weight": (".conv1d.weight", None), ".conv_bias": (".conv1d.bias", None),
          ".A_log": (".A", None)},
    "G": {**MLP, ".q_proj.": (".in_proj_qkvz.", 0), ".k_proj.": (".in_proj_qkvz.", 1),
          ".v_proj.": (".in_proj_qkvz.", 2), ".g_proj.": (".in_proj_qkvz.", 3), ".b_proj.": (".in_proj_ba.", 0),
          ".a_proj.": (".in_proj_ba.", 1), ".conv_weight": (".conv1d.weight", None), ".o_norm.": (".norm.", None),
          ".o_proj.": (".out_proj.", None)},
}
LAYER = re.compile(r"\.layers\.(\d+)\.")


def refuse_unservable(config, dtype: torch.dtype) -> None:
    problem = servable_problem(config) or (cpu_problem(config, dtype) if current_platform.is_cpu() else None)
    if problem is not None:
        raise ValueError(f"lctk serving: {problem}")


def cpu_problem(config, dtype: torch.dtype) -> str | None:
    """What vLLM's CPU Gated DeltaNet kernels cannot run (bf16 only; prefill heads of 64 or 128 channels)."""
    if "G" not in config.pattern:
        return None
    if dtype != torch.bfloat16:
        return f"`G` (Gated DeltaNet) runs in vLLM's CPU kernels only in bfloat16, not {dtype} (--dtype bfloat16)"
    head_dim = config.gated_deltanet["head_dim"]
    if head_dim not in (64, 128):
        return f"gated_deltanet.head_dim = {head_dim}: vLLM's CPU Gated DeltaNet prefills only heads of 64 or 128"
    return None


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


class LctkGatedDeltaNet(QwenGatedDeltaNetAttention):
    """`G`: vLLM's Gated DeltaNet (Qwen3.5's flat q/k/v/z layout) with lctk's gated_deltanet settings. lctk's head
    of d_v = expand_v * d_k value channels runs as expand_v value heads of d_k (vLLM's grouped values, the shape its
    CPU kernels take: d_v = d_k): the delta rule updates each value channel on its own from the head's q, k, g and
    beta, so value heads that share them (b, a, A_log, dt_bias repeated at load, `widen_value_heads`) are the same
    recurrence. Only the gated RMSNorm spans a whole lctk head, so it normalises d_v channels (a view, no copy)."""

    def __init__(self, config, vllm_config: VllmConfig, prefix: str):
        s = config.gated_deltanet
        layer_config = SimpleNamespace(
            hidden_size=config.hidden_size, hidden_act="silu", rms_norm_eps=config.rms_norm_eps,
            output_gate_type="silu", linear_num_key_heads=s["num_heads"], linear_key_head_dim=s["head_dim"],
            linear_num_value_heads=s["num_heads"] * value_heads_per_head(config), linear_value_head_dim=s["head_dim"],
            linear_conv_kernel_dim=s["conv_kernel"])
        super().__init__(layer_config, vllm_config, prefix=prefix, gqa_interleaved_layout=False)
        self.lctk_value_dim = round(s["expand_v"] * s["head_dim"])
        self.norm = RMSNormGated(self.lctk_value_dim, eps=config.rms_norm_eps, norm_before_gate=True,
                                 activation="silu", device=self.norm.weight.device)

    def _output_projection(self, core_attn_out: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        per_head = (core_attn_out.shape[0], -1, self.lctk_value_dim)  # [T, H * r, d_k] -> [T, H, d_v]
        return super()._output_projection(core_attn_out.reshape(per_head), z.reshape(per_head))


def value_heads_per_head(config) -> int:
    return round(config.gated_deltanet["expand_v"])


def widen_value_heads(tensor: torch.Tensor, config) -> torch.Tensor:
    """A `G` layer's per-head b_proj / a_proj rows, A_log, dt_bias -> one per vLLM value head (LctkGatedDeltaNet)."""
    return tensor.repeat_interleave(value_heads_per_head(config), 0)


class LctkBlock(nn.Module):
    def __init__(self, config, layer_idx: int, vllm_config: VllmConfig, prefix: str):
        super().__init__()
        self.letter = config.pattern[layer_idx]
        cache_config, quant_config = vllm_config.cache_config, vllm_config.quant_config
        self.mixer_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        if self.letter == "M":
            self.mixer = mamba2_mixer(config, vllm_config.model_config, cache_config, quant_config, f"{prefix}.mixer")
        elif self.letter == "G":
            self.mixer = LctkGatedDeltaNet(config, vllm_config, f"{prefix}.mixer")
        else:
            self.mixer = LctkAttention(config, self.letter, cache_config, quant_config, f"{prefix}.mixer")
        self.mlp_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps) if config.mlp else None
        self.mlp = LlamaMLP(config.hidden_size, config.intermediate_size, "silu", quant_config=quant_config,
                            prefix=f"{prefix}.mlp") if config.mlp else None

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        normed = self.mixer_norm(hidden_states)
        mixed = self.mixer(normed) if self.letter in "MG" else self.mixer(positions, normed)
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
        refuse_unservable(config, vllm_config.model_config.dtype)
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
    the recurrent layers' conv and SSM states, as vLLM's own hybrids do (NemotronH, Bamba for Mamba-2; Qwen3.5 for
    Gated DeltaNet); a model with both has two state layouts, which vLLM sizes its pages for through
    get_mamba_specs_from_config (as for Qwen4Exp's GDN and short-conv states)."""

    @classmethod
    def get_mamba_specs_from_config(cls, vllm_config: VllmConfig) -> tuple[MambaSpec, ...]:
        config = vllm_config.model_config.hf_config
        refuse_unservable(config, vllm_config.model_config.dtype)  # called while vLLM sizes its caches
        dtypes = cls.get_mamba_state_dtype_from_config(vllm_config)
        return tuple(MambaSpec(shapes=state_shapes(config, letter, vllm_config), dtypes=dtypes, block_size=-1)
                     for letter in "MG" if letter in config.pattern)

    @classmethod
    def get_mamba_state_dtype_from_config(cls, vllm_config: VllmConfig) -> tuple[torch.dtype, ...]:
        """(conv, SSM) dtypes: the same rule for Mamba-2 and Gated DeltaNet (vLLM's gated_delta_net_state_dtype
        is mamba2_state_dtype)."""
        cache = vllm_config.cache_config
        return MambaStateDtypeCalculator.mamba2_state_dtype(vllm_config.model_config.dtype, cache.mamba_cache_dtype,
                                                            cache.mamba_ssm_cache_dtype)

    @classmethod
    def get_mamba_state_shape_from_config(cls, vllm_config: VllmConfig):
        """The first recurrent layout's shapes (IsHybrid asks for one; each layer reports its own to the cache)."""
        return cls.get_mamba_specs_from_config(vllm_config)[0].shapes

    @classmethod
    def get_mamba_state_copy_func(cls):
        """Conv then SSM state, for Mamba-2 and Gated DeltaNet alike (gated_delta_net_state_copy_func is the same
        pair)."""
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
        """lctk's tensors onto vLLM's parameters (q/k/v, gate/up and G's q/k/v/g and b/a into fused ones, renamed
        Mamba-2 and G tensors, per layer letter: NAME_PARTS); a tensor with no parameter, or a parameter (or shard
        of one) no tensor fills, is one ValueError."""
        params = dict(self.named_parameters())
        pattern = self.config.pattern
        expected = {source for name in params for source in lctk_names(name, pattern)}
        loaded: set[str] = set()
        for name, tensor in weights:
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue  # the embedding is the head
            target, shard = vllm_name(name, pattern)
            if target not in params:
                raise ValueError(f"lctk serving: unexpected tensor {name} in the checkpoint (no such weight in a "
                                 f"`{self.config.pattern}` model)")
            param = params[target]
            letter = layer_letter(name, pattern)
            if letter == "M" and name.endswith((".in_proj.weight", ".conv_weight", ".conv_bias")):
                tensor = widen_shared_xb(tensor, self.config, in_proj=name.endswith(".in_proj.weight"))
            if letter == "G" and name.endswith((".b_proj.weight", ".a_proj.weight", ".A_log", ".dt_bias")):
                tensor = widen_value_heads(tensor, self.config)
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


def state_shapes(config, letter: str, vllm_config: VllmConfig) -> tuple[tuple[int, ...], ...]:
    """The (conv, SSM) state shapes of one `M` or `G` layer, as vLLM's own layer computes them."""
    tp, num_spec = vllm_config.parallel_config.tensor_parallel_size, vllm_config.num_speculative_tokens
    if letter == "G":
        s = config.gated_deltanet
        return MambaStateShapeCalculator.gated_delta_net_state_shape(
            tp, s["num_heads"], s["num_heads"] * value_heads_per_head(config), s["head_dim"], s["head_dim"],
            s["conv_kernel"], num_spec)
    s = config.mamba2
    d_inner = s["expand"] * config.hidden_size
    return MambaStateShapeCalculator.mamba2_state_shape(
        tp_world_size=tp, intermediate_size=d_inner, n_groups=s["n_groups"], num_heads=d_inner // s["head_dim"],
        head_dim=s["head_dim"], state_size=s["state_size"], conv_kernel=s["conv_kernel"], num_spec=num_spec)


def layer_letter(name: str, pattern: str) -> str | None:
    """The pattern letter of the layer a tensor or parameter name belongs to (None outside the layers)."""
    found = LAYER.search(name)
    return pattern[int(found.group(1))] if found and int(found.group(1)) < len(pattern) else None


def vllm_name(name: str, pattern: str) -> tuple[str, str | int | None]:
    """An lctk tensor name -> (the vLLM parameter it fills, its shard in a fused parameter or None)."""
    for part, (target, shard) in NAME_PARTS.get(layer_letter(name, pattern), {}).items():
        if part in name:
            return name.replace(part, target), shard
    return name, None


def lctk_names(param_name: str, pattern: str) -> list[str]:
    """The lctk tensors that fill a vLLM parameter (inverse of vllm_name)."""
    parts = NAME_PARTS.get(layer_letter(param_name, pattern), {})
    return [param_name.replace(target, part) for part, (target, _) in parts.items() if target in param_name] or [
        param_name]
