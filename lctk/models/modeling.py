"""HybridModel / HybridForCausalLM: embeddings, a stack of blocks following `config.pattern`, final norm, LM head.

Each block: h = h + mixer(RMSNorm(h)); h = h + SwiGLU(RMSNorm(h)). The forward pass takes, besides the usual HF
arguments, document boundaries of packed rows (position_ids restarting at 0, or `cu_seqlens` for a batch of one
row); see `lctk.models.sequence`. Generation keeps one state per layer in a `HybridCache`. `context_shard`
(lctk.parallel.context.ContextShard) runs this process's shard of rows split across processes: input_ids and
position_ids are the shard's tokens, positions those of the full rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils import logging
from transformers.utils.generic import can_return_tuple

from lctk.models.cache import HybridCache
from lctk.models.config import HybridConfig
from lctk.models.layers import RMSNorm, RotaryEmbedding, SwiGLU
from lctk.models.mixers import MIXERS, Mixer, MixerState
from lctk.models.sequence import SequenceInfo, build_sequence_info

logger = logging.get_logger(__name__)


class HybridBlock(GradientCheckpointingLayer):
    def __init__(self, config: HybridConfig, layer_idx: int):
        super().__init__()
        letter = config.pattern[layer_idx]
        self.mixer_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mixer = MIXERS[letter](config, letter)
        self.mixer.layer_idx = layer_idx  # per-layer settings (e.g. calibrated dt scales) are lists over the pattern
        self.mlp_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps) if config.mlp else None
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size) if config.mlp else None

    def forward(self, hidden_states: Tensor, seq: SequenceInfo, state: MixerState | None = None) -> Tensor:
        hidden_states = hidden_states + self.mixer(self.mixer_norm(hidden_states), seq, state)
        if self.mlp is None:
            return hidden_states
        segment = seq.recompute_segment
        if segment and hidden_states.shape[1] > segment and torch.is_grad_enabled():
            # position-wise: each segment keeps only its input, and backward recomputes one segment at a time
            return torch.cat([checkpoint(self._mlp_half, part, use_reentrant=False, preserve_rng_state=False)
                              for part in hidden_states.split(segment, dim=1)], dim=1)
        return self._mlp_half(hidden_states)

    def _mlp_half(self, hidden_states: Tensor) -> Tensor:
        return hidden_states + self.mlp(self.mlp_norm(hidden_states))


class HybridPreTrainedModel(PreTrainedModel):
    config: HybridConfig
    config_class = HybridConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["HybridBlock"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _is_stateful = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, Mixer) and hasattr(module, "init_special_parameters"):
            module.init_special_parameters()

    def get_correct_attn_implementation(self, requested_attention: str | None, is_init_check: bool = False) -> str:
        """Nothing asked (attn_implementation unset): the config's attention.backend, so that config.
        _attn_implementation tells what runs. The attention layers follow it (lctk.models.mixers.attention)."""
        if requested_attention is None and (self.config.attention or {}).get("backend") == "eager":
            requested_attention = "eager"
        return super().get_correct_attn_implementation(requested_attention, is_init_check)

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoModel") -> None:
        """Nothing to register: the config writes lctk's auto_map and code files (see HybridConfig's)."""

    def recompute_in_segments(self, tokens: int | None) -> None:
        """Training memory: rows longer than `tokens` run each block's norm + MLP, and each Mamba-2 layer, in segments of
        `tokens`, every segment checkpointed (its input kept, the rest recomputed in backward, one segment at a time),
        so that what those parts hold in backward no longer grows with T. The results are the same; the price is
        one more forward of the segmented parts. None turns it off. With activation checkpointing of whole blocks
        it bounds the recompute of each block too."""
        if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1):
            raise ValueError(f"recompute_in_segments: needs a positive number of tokens or None, got {tokens!r}")
        getattr(self, "model", self).recompute_segment = tokens

    def compile_decoding(self, enable: bool = True, cuda_graphs: bool | None = None, **options) -> None:
        """torch.compile the decode step: a call of one token per row that continues a cache (every generate()
        step after the prefill) runs the blocks through a compiled function; prefill and training stay eager. The
        first step compiles (tens of seconds on a CPU); blocks of one letter share a graph.

        On a CPU the graph is compiled with dynamic shapes (one graph for every context length). cuda_graphs
        (default: the model is on CUDA) adds mode="reduce-overhead" and makes attention read its whole preallocated
        buffer under a mask of the filled slots, so that no shape changes between steps and a captured CUDA graph
        replays. `options`: more torch.compile keywords. enable=False goes back to eager.
        `python -m lctk.bench generate --compile` measures what it gives."""
        base = getattr(self, "model", self)
        cuda_graphs = next(self.parameters()).is_cuda if cuda_graphs is None else cuda_graphs
        for layer in base.layers:
            if layer.mixer.letter in "AS":
                layer.mixer.static_decode = enable and cuda_graphs
        if not enable:
            base.compiled_layers = None
            return
        settings = {**({"mode": "reduce-overhead"} if cuda_graphs else {"dynamic": True}), **options}
        made = getattr(base, "_compiled", None)
        if made is None or made[0] != settings:  # a new torch.compile would compile again: kept for a later enable
            base._compiled = (settings, torch.compile(base.run_layers, **settings))
        base.compiled_layers = base._compiled[1]

    def state_size(self, seq_len: int) -> list[int]:
        """Per-layer inference state in elements per sequence after seq_len tokens: attention grows with seq_len,
        recurrent mixers do not."""
        base = getattr(self, "model", self)
        return [layer.mixer.state_size(seq_len) for layer in base.layers]


class HybridModel(HybridPreTrainedModel):
    def __init__(self, config: HybridConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(HybridBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)
        self.uses_rotary = any(MIXERS[letter].rotary for letter in config.pattern)
        self.gradient_checkpointing = False
        self.recompute_segment: int | None = None  # set by recompute_in_segments
        self.compiled_layers = None  # set by compile_decoding
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    @can_return_tuple
    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: HybridCache | None = None,
        inputs_embeds: Tensor | None = None,
        use_cache: bool | None = None,
        cu_seqlens: Tensor | None = None,
        output_hidden_states: bool | None = None,
        past_key_values: HybridCache | None = None,
        context_shard=None,
        output_attentions: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """transformers' conventions: output_* and return_dict default to the config's; hidden_states are the input of
        every layer plus the last hidden state (after the final norm); attentions are the weights of `A`/`S` layers
        (computed on the eager path, attn_implementation="eager") and None for the other layers."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        hidden_states = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        batch, length = hidden_states.shape[:2]
        cache = cache if cache is not None else past_key_values
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training and context_shard is None
        if use_cache and cache is None:
            cache = HybridCache.for_model(self, batch, hidden_states.device, hidden_states.dtype)
        past_length = cache.seen_tokens if cache is not None else 0
        if context_shard is not None:
            self._check_context_shard(context_shard, cache, attention_mask, cu_seqlens, length)

        seq = build_sequence_info(
            batch, length, past_length, hidden_states.device, position_ids, attention_mask, cu_seqlens, context_shard
        )
        if self.uses_rotary:
            seq.rotary = self.rotary_emb(hidden_states, seq.position_ids)
        seq.recompute_segment = self.recompute_segment if self.training else None
        if self.config.output_attentions if output_attentions is None else output_attentions:
            if self.config._attn_implementation != "eager" and any(letter in "AS" for letter in self.config.pattern):
                logger.warning_once("output_attentions: attention weights need attn_implementation='eager'; "
                                    f"with {self.config._attn_implementation!r} they are None")
            seq.attentions = {}
        hidden_wanted = self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        all_hidden = [] if hidden_wanted else None

        decode_step = length == 1 and past_length > 0 and all_hidden is None and seq.attentions is None
        if decode_step and self.compiled_layers is not None:
            hidden_states = self.compiled_layers(hidden_states, seq, cache)
        else:
            hidden_states = self.run_layers(hidden_states, seq, cache, all_hidden)
        if cache is not None:
            cache.seen_tokens += length
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            cache=cache if use_cache else None,
            hidden_states=(*all_hidden, hidden_states) if all_hidden is not None else None,
            attentions=tuple(map(seq.attentions.get, range(len(self.layers)))) if seq.attentions is not None else None,
        )

    def run_layers(self, hidden_states: Tensor, seq: SequenceInfo, cache: HybridCache | None,
                   all_hidden: list | None = None) -> Tensor:
        """Every block, then the final norm (what compile_decoding compiles for decode steps)."""
        for i, layer in enumerate(self.layers):
            if all_hidden is not None:
                all_hidden.append(hidden_states)
            hidden_states = layer(hidden_states, seq, cache[i] if cache is not None else None)
        return self.norm(hidden_states)

    def _check_context_shard(self, shard, cache, attention_mask, cu_seqlens, length: int) -> None:
        if cache is not None or attention_mask is not None or cu_seqlens is not None:
            raise ValueError("context_shard: split rows take no cache, attention_mask or cu_seqlens (use position_ids)")
        for letter in dict.fromkeys(self.config.pattern):
            problem = MIXERS[letter].context_parallel_problem(self.config, length)
            if problem:
                raise ValueError(f"context_shard: {problem}")


@dataclass
class HybridCausalLMOutput(CausalLMOutputWithPast):
    """With the final hidden states (after the final norm, before the LM head): chunked losses
    (lctk.train.losses) take them with an empty `logits_to_keep`, so no logits are computed."""

    last_hidden_state: Tensor | None = None


class HybridForCausalLM(HybridPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: HybridConfig):
        super().__init__(config)
        self.model = HybridModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # forward() creates its own HybridCache

    def _prepare_cache_for_generation(
        self, generation_config, model_kwargs: dict, generation_mode, batch_size: int, max_cache_length: int
    ) -> None:
        """A HybridCache sized for the whole generation (prompt + max_new_tokens): attention allocates its buffers
        once, as transformers' StaticCache does."""
        # transformers would only warn and ignore it: a static (or other) cache asked for is refused instead
        if generation_config.cache_implementation not in (None, "dynamic"):
            raise ValueError(
                f"cache_implementation={generation_config.cache_implementation!r}: lctk models keep their own "
                "HybridCache (preallocated from max_new_tokens; fixed-size for recurrent layers); leave "
                "cache_implementation unset"
            )
        if model_kwargs.get("cache") is not None or model_kwargs.get("past_key_values") is not None:
            return super()._prepare_cache_for_generation(
                generation_config, model_kwargs, generation_mode, batch_size, max_cache_length
            )
        if generation_config.use_cache is False:
            return None
        rows = max(generation_config.num_beams or 1, generation_config.num_return_sequences or 1) * batch_size
        model_kwargs["cache"] = HybridCache.for_model(self, rows, max_length=max_cache_length)
        return None

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    @can_return_tuple
    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: HybridCache | None = None,
        inputs_embeds: Tensor | None = None,
        labels: Tensor | None = None,
        use_cache: bool | None = None,
        cu_seqlens: Tensor | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int | Tensor = 0,
        past_key_values: HybridCache | None = None,
        context_shard=None,
        output_attentions: bool | None = None,
        **kwargs,
    ) -> HybridCausalLMOutput:
        outputs = self.model(
            return_dict=True,
            output_attentions=output_attentions,
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache if cache is not None else past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            cu_seqlens=cu_seqlens,
            output_hidden_states=output_hidden_states,
            context_shard=context_shard,
        )
        hidden_states = last_hidden_state = outputs.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden_states = hidden_states[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, Tensor):
            hidden_states = hidden_states[:, logits_to_keep]
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return HybridCausalLMOutput(
            loss=loss, logits=logits, cache=outputs.cache, hidden_states=outputs.hidden_states,
            attentions=outputs.attentions, last_hidden_state=last_hidden_state,
        )


def parameter_count(config: HybridConfig) -> int:
    """Parameters of the model `config` describes, counted on the meta device (nothing is allocated)."""
    with torch.device("meta"):
        return sum(p.numel() for p in HybridForCausalLM(config).parameters())
