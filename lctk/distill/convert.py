"""Conversion of a transformer into an lctk hybrid, and attention -> recurrent-mixer initialisation.

Two steps, so that every stage of a schedule runs the same code:
  1. `student_from_teacher(teacher)`: an all-attention HybridForCausalLM that computes what the teacher computes.
     Embeddings, norms, MLPs, lm_head and every attention layer are copied (RoPE settings, GQA, q/k/v/o biases,
     sliding windows); Llama's input_layernorm / self_attn / post_attention_layernorm / mlp become the block's
     mixer_norm / mixer / mlp_norm / mlp.
  2. `replace_layers(student, layers, mixer)`: a new student in which the attention layers `layers` become `mixer`
     layers initialised from that layer's attention weights; every other tensor (earlier recurrent layers with their
     trained weights included) is carried over unchanged.

Mamba-2 (MIL initialisation, "The Mamba in the Llama", Wang et al. 2024; Apriel-H1): softmax(q k^T) v is read as the
linear recurrence h_t = a_t h_{t-1} + B_t x_t^T, y_t = C_t^T h_t with
    x <- V (v_proj rows),  B <- K (k_proj rows),  C <- Q (q_proj rows),  out_proj <- O (o_proj)
    head_dim = state_size = the attention head_dim, n_groups = query heads, xb_heads = kv heads (GQA sharing),
    expand = heads * head_dim / hidden_size.
z (the gate rows of in_proj), dt rows, dt_bias, D and the gated norm keep Mamba-2's fresh initialisation.
`init: mil` (the default) also starts the recurrence close to what attention computes: the convolution is the
identity (last tap 1, other taps and the bias 0; attention has no short convolution, so x, B, C start as
silu(V u), silu(K u), silu(Q u)) and A = 0.1 for every head, so that exp(A dt) >= 0.99 at Mamba-2's initial
dt <= 0.1 (attention does not forget). `init: mil-plain` leaves conv and A_log at Mamba-2's fresh values, as the
MIL reference code does. `init: random` copies nothing. On a tiny teacher (a 4-layer Llama trained on a copy task,
one layer replaced, two seeds, 20 steps of reverse-KL distillation at lr 1e-2, held-out KL summed over the seeds):
layers 0 and 1 sit on the same plateau whatever the init (6.92 mil, 6.92 mil-plain, 6.94 random: the copy circuit is
lost and 20 steps do not rebuild it), layer 2 gives 0.19 / 0.23 / 0.19 and layer 3 0.04 / 0.08 / 0.08, so tiny
teachers do not separate the inits. SmolLM2-135M decides the default (BENCHMARKS.md, issue 18): the same 8 layers
replaced, 40 steps of recipes/distill-smollm2.yaml, held-out KL 1.473 with `mil` against 1.500 with `mil-plain`
(perplexity 52.2 vs 53.7, top-1 agreement 0.494 vs 0.489), so `mil` stays the default, by a small margin (one seed).
Mamba-2's in_proj and out_proj have no bias: q/k/v/o biases (Qwen2) are not carried into it. RoPE has no
counterpart in the recurrence and is dropped.

Apriel-H1's student is Mamba-1-style (per-channel dt from a low-rank dt_proj, A of shape d_inner x d_state, conv on x
only, raw B and C, no gated norm), so its C . B equals the teacher's q . k without RoPE at initialisation; ours passes
B and C through silu(conv(.)). It is not offered as a student: a decay per channel and per state (exp(dt_c A_cn))
does not fit the scalar-per-head SSD kernel family. Within a chunk the score of (t, s) would become
sum_n C_tn B_sn exp(sum dt_c A_cn), a different [L, L] matrix for every channel c, i.e. heads of head_dim 1 and a
GLA-style per-key-dimension decay: about P N / (P + N) times the intra-chunk FLOPs of SSD (32x at P = N = 64), done as
elementwise products instead of matmuls, and a new kernel. Measured instead (BENCHMARKS.md, SmolLM2-135M, 256 tokens):
the correlation of the MIL student's first-step scores silu(q) . silu(k) with the teacher's attention logits is -0.01
to 0.45 over layers 0, 3, ..., 27, against 0.37 to 0.86 for the raw q . k that Apriel's B, C give (the rest of the gap
is RoPE): the silu on B and C is what opens it.

BASED (`based`): v_proj / o_proj are copied (kv heads repeated up to the query heads, GQA-style) when
num_heads = the attention's heads and hidden_size / heads = head_dim; q_proj / k_proj too when feature_dim equals
head_dim (otherwise they keep BASED's fresh initialisation).
Gated DeltaNet (`gated_deltanet`) and Kimi Delta Attention (`kda`), as Apriel2 (Fast-LLM) and MambaInLlama map
attention onto their recurrent layers: softmax(q k^T) v is read as the delta rule's S_t q_t with keys k_t and values
v_t, so
    q_proj <- Q, k_proj <- K, v_proj <- V (kv heads repeated up to the query heads, GQA-style), o_proj <- O
    num_heads = query heads, head_dim = the attention head_dim, expand_v = 1.
What starts fresh: the write strength b_proj, the decay (a_proj, A_log, dt_bias for `G`; the low-rank f_proj,
A_log, dt_bias for `K`), the output gate g_proj and its norm, and the short convolution. `init: mil` also makes the
convolution the identity (last tap 1: q, k, v start as silu(Q u), silu(K u), silu(V u) before the L2 norm) and sets
A = 0.1 per head (for `G` exp(g) >= 0.99 at the initial dt <= 0.1; for `K` exp(g) ~ 0.93 per channel at dt_bias 0),
so that the new layer starts out remembering as attention does; `mil-plain` copies the projections only.
The output's RMSNorm and gate have no counterpart in attention, so the converted layer is not the teacher's at
initialisation (as Mamba-2's gated norm), and the L2-normalised q, k put no temperature on the scores (attention's
softmax has one); distillation fits both.
LaCT (`lact`): its sliding-window attention shares one qkv projection with the fast weights; qkv <- [Q; K; V]
(kv heads repeated) and o_proj <- O, so that at initialisation the window part is the teacher's attention
restricted to the window (the fast-weight part starts fresh).
Sliding-window attention (`sliding_window`, `S`): the same attention layer with its keys limited to the last `window`
tokens (lctk.models.mixers.attention), so everything maps and nothing starts fresh: q/k/v/o_proj and their biases are
copied as they are (GQA kept), RoPE is the model's (rope_parameters, shared by every layer). With a window at least
the sequence length the student is the teacher exactly; a shorter one changes only what each query can see, and its
KV cache holds window - 1 tokens whatever the context. `student.settings: {window: N}` sets it; the default is
lctk's own `attention.window` default (DEFAULT_WINDOW = 512, the `S` of the BASED recipe), chosen over the 4,096 of
Mistral-7B / Gemma 2 because distillation rows are short (256-4,096 tokens): a window at or above the recipe's
seq_len trains nothing that differs from the teacher, so keep the window below data.seq_len. A model has one
window (the `attention` section), so a teacher that already has sliding layers (Mistral) keeps its own, and a
different `window` is an error. `init: random` copies nothing here either.

What maps and what starts fresh, by target:
    M  Mamba-2          maps V, K, Q, O (x, B, C, out_proj); fresh: z gate, dt, dt_bias, D, gated norm (conv and A
                        set attention-like by `mil`); q/k/v/o biases and RoPE dropped
    B  BASED            maps V, O (and Q, K when feature_dim = head_dim); fresh: the rest
    L  LaCT             maps Q, K, V into qkv and O; fresh: the fast weights and their learning rates
    G  Gated DeltaNet   maps Q, K, V, O; fresh: b_proj, a_proj/A_log/dt_bias, g_proj + norm, conv (`mil`: identity
                        conv, A = 0.1)
    K  KDA              as G, with the low-rank f_proj in place of a_proj
    S  sliding window   maps everything (Q, K, V, O, biases, RoPE); fresh: nothing, only the window is new
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable

import torch
from torch import nn

from lctk.errors import UserError
from lctk.models import HybridConfig, HybridForCausalLM
from lctk.models.mixers import MIXERS, section_of

ATTENTION_LETTERS = "AS"
STUDENT_MIXERS = {"mamba2": "M", "based": "B", "lact": "L", "gated_deltanet": "G", "kda": "K", "sliding_window": "S"}
INITS = ("mil", "mil-plain", "random")
INITIAL_DECAY_RATE = 0.1  # A for `init: mil`
DEFAULT_WINDOW = 512  # `S` students: lctk's attention.window default (see the module doc)


def hybrid_config_from(teacher_config, attention: dict | None = None) -> HybridConfig:
    """The all-attention HybridConfig with the teacher's shapes, RoPE, token ids and sliding windows."""
    c = teacher_config
    if getattr(c, "hidden_act", "silu") != "silu":
        raise UserError(f"distill.teacher: hidden_act {c.hidden_act!r} is not supported (lctk blocks use a SwiGLU MLP)")
    if getattr(c, "mlp_bias", False):
        raise UserError("distill.teacher: mlp_bias is not supported (lctk blocks use a SwiGLU MLP without biases)")
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    layer_types = getattr(c, "layer_types", None) or ["full_attention"] * c.num_hidden_layers
    window = getattr(c, "sliding_window", None)
    if getattr(c, "model_type", None) == "mistral" and window is not None:
        layer_types = ["sliding_attention"] * c.num_hidden_layers
    pattern = "".join("S" if kind == "sliding_attention" and window else "A" for kind in layer_types)
    qkv_bias = bool(getattr(c, "attention_bias", False)) or getattr(c, "model_type", None) == "qwen2"
    settings = {"qkv_bias": qkv_bias, "o_bias": bool(getattr(c, "attention_bias", False))}
    if window and "S" in pattern:
        settings["window"] = window
    return HybridConfig(
        pattern=pattern,
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_attention_heads=heads,
        num_key_value_heads=getattr(c, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        max_position_embeddings=c.max_position_embeddings,
        rope_parameters=copy.deepcopy(dict(c.rope_parameters)),
        tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
        rms_norm_eps=c.rms_norm_eps,
        pad_token_id=getattr(c, "pad_token_id", None),
        bos_token_id=getattr(c, "bos_token_id", None),
        eos_token_id=getattr(c, "eos_token_id", None),
        attention={**settings, **(attention or {})},
    )


@torch.no_grad()
def student_from_teacher(teacher, attention: dict | None = None) -> HybridForCausalLM:
    """An all-attention hybrid equal to the teacher (a Llama / Mistral / Qwen2 causal LM), in the teacher's dtype."""
    config = hybrid_config_from(teacher.config, attention)
    dtype = next(teacher.parameters()).dtype
    student = HybridForCausalLM(config).to(dtype)
    source, target = teacher.model, student.model
    _copy(target.embed_tokens.weight, source.embed_tokens.weight)
    _copy(target.norm.weight, source.norm.weight)
    if not config.tie_word_embeddings:
        _copy(student.lm_head.weight, teacher.lm_head.weight)
    for theirs, ours in zip(source.layers, target.layers, strict=True):
        _copy(ours.mixer_norm.weight, theirs.input_layernorm.weight)
        _copy(ours.mlp_norm.weight, theirs.post_attention_layernorm.weight)
        for name in ("gate_proj", "up_proj", "down_proj"):
            _copy(getattr(ours.mlp, name).weight, getattr(theirs.mlp, name).weight)
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            _copy_linear(getattr(ours.mixer, name), getattr(theirs.self_attn, name))
    student.generation_config = copy.deepcopy(teacher.generation_config)
    return student.eval()


def mixer_section(config: HybridConfig, letter: str, overrides: dict | None = None) -> dict:
    """Settings for the student mixer, shaped so that the attention weights map onto it (see the module doc)."""
    heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    settings: dict = {}
    if letter == "M":
        inner = heads * head_dim
        if inner % config.hidden_size:
            raise UserError(
                f"distill.student: heads * head_dim = {inner} is not a multiple of hidden_size {config.hidden_size}; "
                "Mamba-2 cannot take this attention's shape"
            )
        settings = {
            "expand": inner // config.hidden_size,
            "head_dim": head_dim,
            "state_size": head_dim,
            "n_groups": heads,
            "xb_heads": kv_heads,
        }
    elif letter == "B":
        settings = {"num_heads": heads}
    elif letter in "GK":
        settings = {"num_heads": heads, "head_dim": head_dim, "expand_v": 1.0}
    elif letter == "S":  # the attention section is shared with the remaining `A` layers: only the window is new
        unknown = sorted(set(overrides or {}) - {"window"})
        if unknown:
            raise UserError(f"distill.student.settings: {unknown[0]!r} is not a sliding_window setting (only window)")
        settings = {**config.attention, "window": DEFAULT_WINDOW}
    return {**settings, **(overrides or {})}


@torch.no_grad()
def replace_layers(
    student: HybridForCausalLM,
    layers: Iterable[int],
    mixer: str = "mamba2",
    init: str = "mil",
    settings: dict | None = None,
    seed: int = 0,
) -> HybridForCausalLM:
    """A new student with the attention layers `layers` replaced by `mixer` layers initialised by `init` (see the
    module doc). Everything else is carried over. `settings` overrides the mixer's config section."""
    if mixer not in STUDENT_MIXERS:
        raise UserError(f"distill.student.mixer: {mixer!r} is not one of {', '.join(STUDENT_MIXERS)}")
    if init not in INITS:
        raise UserError(f"distill.student.init: {init!r} is not one of {', '.join(INITS)}")
    letter = STUDENT_MIXERS[mixer]
    layers = sorted(set(layers))
    config = student_config(student.config, layers, mixer, settings)

    dtype = next(student.parameters()).dtype
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        new = HybridForCausalLM(config).to(dtype)
    fresh = {f"model.layers.{i}.mixer." for i in layers}
    carried = {k: v for k, v in student.state_dict().items() if not k.startswith(tuple(fresh))}
    missing, unexpected = new.load_state_dict(carried, strict=False)
    assert not unexpected and all(k.startswith(tuple(fresh)) for k in missing), (missing, unexpected)
    if init != "random":
        for index in layers:
            attention = student.model.layers[index].mixer
            target = new.model.layers[index].mixer
            if letter == "M":
                init_mamba2_from_attention(target, attention, attention_like=init == "mil")
            elif letter == "B":
                init_based_from_attention(target, attention)
            elif letter == "L":
                init_lact_from_attention(target, attention)
            elif letter in "GK":
                init_delta_from_attention(target, attention, attention_like=init == "mil")
            elif letter == "S":
                for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                    _copy_linear(getattr(target, name), getattr(attention, name))
    new.generation_config = copy.deepcopy(student.generation_config)
    return new.train(student.training)


def student_config(old: HybridConfig, layers: list[int], mixer: str, settings: dict | None = None) -> HybridConfig:
    """The config of `old` with the attention layers `layers` replaced by `mixer` layers (`settings` override the
    mixer's config section); a bad setting is a UserError naming it."""
    letter = STUDENT_MIXERS[mixer]
    for index in layers:
        if not 0 <= index < len(old.pattern) or old.pattern[index] not in ATTENTION_LETTERS:
            raise ValueError(f"layer {index} is not an attention layer of pattern {old.pattern!r}")
    values = old.to_dict()
    values["pattern"] = "".join(letter if i in layers else p for i, p in enumerate(old.pattern))
    section = section_of(letter)
    if getattr(old, section) is None or letter not in old.pattern:
        values[section] = mixer_section(old, letter, settings)
    elif letter == "S" and (settings or {}).get("window", old.attention["window"]) != old.attention["window"]:
        raise UserError(f"distill.student.settings.window: {settings['window']} differs from the sliding window "
                        f"{old.attention['window']} the model already has (one window per model)")
    for name in ("model_type", "transformers_version", "architectures", "num_hidden_layers"):
        values.pop(name, None)
    try:
        return HybridConfig(**values)
    except ValueError as error:
        raise UserError(f"distill.student.settings: {error}") from None


def init_mamba2_from_attention(mamba: nn.Module, attention: nn.Module, attention_like: bool = True) -> None:
    """MIL: in_proj rows [z | x <- V | B <- K | C <- Q | dt], out_proj <- O; with `attention_like`, an identity
    convolution and a slow decay (see the module doc)."""
    rows = _mamba2_rows(mamba)
    _copy(mamba.in_proj.weight[rows["x"]], attention.v_proj.weight)
    _copy(mamba.in_proj.weight[rows["B"]], attention.k_proj.weight)
    _copy(mamba.in_proj.weight[rows["C"]], attention.q_proj.weight)
    _copy(mamba.out_proj.weight, attention.o_proj.weight)
    if attention_like:
        mamba.conv_weight.zero_()
        mamba.conv_weight[:, -1] = 1.0
        mamba.conv_bias.zero_()
        mamba.A_log.fill_(math.log(INITIAL_DECAY_RATE))


def _mamba2_rows(mamba: nn.Module) -> dict[str, slice]:
    sizes = {"z": mamba.d_inner, "x": mamba.conv_split[0], "B": mamba.conv_split[1], "C": mamba.conv_split[2]}
    rows, start = {}, 0
    for name, size in sizes.items():
        rows[name] = slice(start, start + size)
        start += size
    rows["dt"] = slice(start, start + mamba.num_heads)
    return rows


def init_based_from_attention(based: nn.Module, attention: nn.Module) -> None:
    groups = attention.num_heads // attention.num_kv_heads
    if based.num_heads != attention.num_heads or based.value_dim != attention.head_dim:
        return
    _copy(based.v_proj.weight, _repeat_kv_rows(attention.v_proj.weight, attention.head_dim, groups))
    _copy(based.o_proj.weight, attention.o_proj.weight)
    if based.feature_dim == attention.head_dim:
        _copy(based.q_proj.weight, attention.q_proj.weight)
        _copy(based.k_proj.weight, _repeat_kv_rows(attention.k_proj.weight, attention.head_dim, groups))


def init_lact_from_attention(lact: nn.Module, attention: nn.Module) -> None:
    groups = attention.num_heads // attention.num_kv_heads
    k = _repeat_kv_rows(attention.k_proj.weight, attention.head_dim, groups)
    v = _repeat_kv_rows(attention.v_proj.weight, attention.head_dim, groups)
    _copy(lact.qkv.weight, torch.cat([attention.q_proj.weight, k, v]))
    _copy(lact.o_proj.weight, attention.o_proj.weight)


def init_delta_from_attention(delta: nn.Module, attention: nn.Module, attention_like: bool = True) -> None:
    """q/k/v/o projections (kv heads repeated) when the shapes fit; with `attention_like`, an identity convolution and
    a slow decay (see the module doc)."""
    head_dim, groups = attention.head_dim, attention.num_heads // attention.num_kv_heads
    if (delta.num_heads, delta.key_dim, delta.value_dim) != (attention.num_heads, head_dim, head_dim):
        return
    _copy(delta.q_proj.weight, attention.q_proj.weight)
    _copy(delta.k_proj.weight, _repeat_kv_rows(attention.k_proj.weight, head_dim, groups))
    _copy(delta.v_proj.weight, _repeat_kv_rows(attention.v_proj.weight, head_dim, groups))
    _copy(delta.o_proj.weight, attention.o_proj.weight)
    if attention_like:
        delta.conv_weight.zero_()
        delta.conv_weight[:, -1] = 1.0
        delta.A_log.fill_(math.log(INITIAL_DECAY_RATE))


def _repeat_kv_rows(weight: torch.Tensor, head_dim: int, groups: int) -> torch.Tensor:
    """[kv_heads * head_dim, in] -> [kv_heads * groups * head_dim, in], query head h reading kv head h // groups."""
    return weight.unflatten(0, (-1, head_dim)).repeat_interleave(groups, dim=0).flatten(0, 1)


def attention_layers(model: HybridForCausalLM) -> list[int]:
    return [i for i, letter in enumerate(model.config.pattern) if letter in ATTENTION_LETTERS]


def layout(model: HybridForCausalLM) -> dict:
    """What a stage's student is made of, for layout.json and the report."""
    pattern = model.config.pattern
    return {
        "pattern": pattern,
        "attention_layers": attention_layers(model),
        "replaced_layers": [i for i, p in enumerate(pattern) if p not in ATTENTION_LETTERS],
        "mixers": {MIXERS[p].__name__: pattern.count(p) for p in sorted(set(pattern))},
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def _copy(target: torch.Tensor, source: torch.Tensor) -> None:
    if target.shape != source.shape:
        raise ValueError(f"shape mismatch: {tuple(target.shape)} <- {tuple(source.shape)}")
    target.copy_(source)


def _copy_linear(target: nn.Linear, source: nn.Linear) -> None:
    _copy(target.weight, source.weight)
    if (target.bias is None) != (source.bias is None):
        raise UserError("distill.teacher: attention bias layout differs from what its config declares")
    if target.bias is not None:
        _copy(target.bias, source.bias)
