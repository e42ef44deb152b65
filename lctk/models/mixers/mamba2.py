"""Mamba-2 mixer (`M`), from Dao & Gu, "Transformers are SSMs" (2024), the SSD layer:

    z, x, B, C, dt = in_proj(u)                       x: H heads of P channels; B, C: G groups of N states
    x, B, C = silu(causal_conv1d([x, B, C]))          depthwise, kernel K, per channel
    dt = softplus(dt + dt_bias),  A = -exp(A_log)     one scalar decay per head
    h_t = exp(A dt_t) h_{t-1} + dt_t B_t x_t^T        state [N, P] per head (head h reads group h // (H / G))
    y_t = C_t^T h_t + D x_t
    out = out_proj(RMSNorm(y * silu(z)))              norm per group (norm_before_gate = False)

The recurrence is `lctk.kernels.ssd.ssd` with q = C, k = B, v = x * dt, g = A * dt. Initialisation as the paper's
reference code: dt_bias = softplus^-1(dt0) with dt0 log-uniform in [dt_min, dt_max] (floored at dt_init_floor),
A_log = log(U[1, 16]), D = 1. Padding tokens get dt = 0 and zero conv input, so they leave the state untouched.
Rows split across processes (lctk.parallel.context): the convolution takes the previous shard's last K - 1 inputs, and
the recurrence the earlier shards' state through `ssd_rows` (a gathered scan of final states and decays).

`xb_heads` (default: off) shares x and B across heads the way grouped-query attention shares V and K: in_proj makes
xb_heads heads of x and xb_heads groups of B, repeated up to H heads and G groups after the convolution. This is the
shape an attention layer maps onto (Mamba-in-Llama / Apriel-H1 initialisation: V -> x, K -> B, Q -> C, O -> out_proj
with n_groups = query heads, xb_heads = kv heads, state_size = head_dim = attention head_dim).

Long rows in training: with segment recompute on (`HybridForCausalLM.recompute_in_segments`, the recipe's
`train.recompute_segment` S) the layer runs a row longer than S in segments of S tokens, each under activation
checkpointing, carrying the conv inputs and the SSD state from one segment to the next (as a cache does). Autograd
keeps only each segment's input and carried state; backward recomputes one segment at a time, last first, so the
layer's working set in backward is O(S) instead of O(T) (at width 768 the whole layer holds ~106 KB per token in
forward + backward). The price is one more forward of the layer. Rows with padding, rows split across processes and
the state_window / state_norm_cap settings run whole.

Length generalisation (training-free, from the state-collapse literature; all off by default, and then the layer
runs exactly as above): dt_scale and b_scale are applied here, state_norm_cap and state_window run the recurrence
through their own scans. The settings, their equations, their checks and the scans are in
lctk.models.mixers.mamba2_length_generalisation.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from torch.utils.hooks import RemovableHandle
from transformers import initialization as init

from lctk.models.layers import GatedRMSNorm, init_short_conv, short_conv
from lctk.models.mixers.base import Mixer, MixerState, require_positive, short_shard
from lctk.models.mixers.linear_recurrence import recurrent_step, ssd_rows
from lctk.models.mixers.mamba2_length_generalisation import capped_scan, check_length_settings, windowed_scan
from lctk.models.sequence import SequenceInfo


@dataclass
class Mamba2State(MixerState):
    conv: Tensor  # [B, K-1, conv_dim] the last inputs of the convolution
    ssm: Tensor  # [B, H, N, P] fp32


@dataclass
class Mamba2WindowState(Mamba2State):
    """With `state_window` r: the last r - 1 tokens' inputs to the recurrence (zeros = no token: v = 0 adds
    nothing and g = 0 decays nothing)."""

    window_k: Tensor  # [B, r-1, G, N]
    window_v: Tensor  # [B, r-1, H, P]
    window_g: Tensor  # [B, r-1, H] fp32


@dataclass
class Mamba2CapState(Mamba2State):
    """With `state_norm_cap`: how many tokens of its document each row has taken, which places the next cap."""

    seen: Tensor  # [B] int64


class Mamba2(Mixer):
    section = "mamba2"
    special_settings = ("dt_scale", "b_scale")  # or per-layer lists: check_length_settings

    def __init__(self, config, letter: str):
        super().__init__(config, letter)
        s = self.settings
        self.d_inner = s["expand"] * config.hidden_size
        self.head_dim, self.d_state, self.n_groups = s["head_dim"], s["state_size"], s["n_groups"]
        self.num_heads = self.d_inner // self.head_dim
        self.xb_heads = s["xb_heads"] or self.num_heads
        self.b_groups = s["xb_heads"] or self.n_groups
        self.conv_kernel, self.chunk_size = s["conv_kernel"], s["chunk_size"]
        self.conv_split = [self.xb_heads * self.head_dim, self.b_groups * self.d_state, self.n_groups * self.d_state]
        self.conv_dim = sum(self.conv_split)
        self.in_proj = nn.Linear(config.hidden_size, self.d_inner + self.conv_dim + self.num_heads, bias=False)
        self.conv_weight = nn.Parameter(torch.empty(self.conv_dim, self.conv_kernel))
        self.conv_bias = nn.Parameter(torch.empty(self.conv_dim))
        self.dt_bias = nn.Parameter(torch.empty(self.num_heads))
        self.A_log = nn.Parameter(torch.empty(self.num_heads))
        self.D = nn.Parameter(torch.empty(self.num_heads))
        self.norm = GatedRMSNorm(self.d_inner, self.n_groups, eps=config.rms_norm_eps)
        self.out_proj = nn.Linear(self.d_inner, config.hidden_size, bias=False)
        self._state_probes: OrderedDict[int, Callable[..., None]] = OrderedDict()  # as torch's hooks (weak-referable)
        self.init_special_parameters()

    @classmethod
    def default_settings(cls, config) -> dict[str, Any]:
        return {
            "state_size": 64,
            "head_dim": 64 if 2 * config.hidden_size % 64 == 0 else config.head_dim,
            "expand": 2,
            "n_groups": 1,
            "conv_kernel": 4,
            "chunk_size": 64,
            "dt_min": 0.001,
            "dt_max": 0.1,
            "dt_init_floor": 1e-4,
            "xb_heads": None,
            "dt_scale": 1.0,
            "b_scale": 1.0,
            "state_norm_cap": None,
            "state_norm_every": 64,
            "state_window": None,
        }

    @classmethod
    def check_settings(cls, settings: dict[str, Any], config) -> None:
        d_inner = settings["expand"] * config.hidden_size
        if d_inner % settings["head_dim"]:
            raise ValueError(f"mamba2.head_dim: {settings['head_dim']} does not divide expand * hidden_size = {d_inner}")
        heads = d_inner // settings["head_dim"]
        if heads % settings["n_groups"]:
            raise ValueError(f"mamba2.n_groups: {settings['n_groups']} does not divide the number of heads {heads}")
        shared = settings["xb_heads"]
        if shared is not None:
            require_positive("mamba2.xb_heads", shared, integer=True)
            if heads % shared or settings["n_groups"] % shared:
                raise ValueError(
                    f"mamba2.xb_heads: {shared} must divide the number of heads {heads} and n_groups {settings['n_groups']}"
                )
        if not 0 < settings["dt_min"] <= settings["dt_max"]:
            raise ValueError("mamba2.dt_min: needs 0 < dt_min <= dt_max")
        check_length_settings(settings, config.pattern, heads)

    @torch.no_grad()
    def init_special_parameters(self) -> None:
        s = self.settings
        log_dt = torch.rand(self.num_heads) * (math.log(s["dt_max"]) - math.log(s["dt_min"])) + math.log(s["dt_min"])
        dt = log_dt.exp().clamp(min=s["dt_init_floor"])
        init.copy_(self.dt_bias, dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
        init.copy_(self.A_log, torch.empty(self.num_heads).uniform_(1, 16).log())
        init.ones_(self.D)
        init_short_conv(self.conv_weight, self.conv_bias)

    @classmethod
    def context_parallel_problem(cls, config, shard_length: int) -> str | None:
        settings = config.mamba2
        for key in ("state_window", "state_norm_cap"):
            values = settings[key] if isinstance(settings[key], list) else [settings[key]]
            if any(value is not None for value in values):
                return f"`M` with mamba2.{key} does not run context-parallel"
        return short_shard("M", settings["conv_kernel"] - 1, "mamba2.conv_kernel - 1", shard_length)

    def length_setting(self, key: str):
        """This layer's value of a length-generalisation setting (resolving a per-layer list)."""
        value = self.settings[key]
        if not isinstance(value, list):
            return value
        if self.layer_idx is None:
            raise RuntimeError(f"mamba2.{key}: a per-layer list needs the mixer's layer_idx (set by HybridBlock)")
        return value[self.layer_idx]

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> Mamba2State:
        conv = torch.zeros(batch_size, self.conv_kernel - 1, self.conv_dim, device=device, dtype=dtype)
        ssm = torch.zeros(batch_size, self.num_heads, self.d_state, self.head_dim, device=device)
        window = self.length_setting("state_window")
        if window is not None:
            return Mamba2WindowState(
                conv=conv,
                ssm=ssm,
                window_k=torch.zeros(batch_size, window - 1, self.n_groups, self.d_state, device=device, dtype=dtype),
                window_v=torch.zeros(batch_size, window - 1, self.num_heads, self.head_dim, device=device, dtype=dtype),
                window_g=torch.zeros(batch_size, window - 1, self.num_heads, device=device),
            )
        if self.length_setting("state_norm_cap") is not None:
            return Mamba2CapState(conv=conv, ssm=ssm, seen=torch.zeros(batch_size, dtype=torch.long, device=device))
        return Mamba2State(conv=conv, ssm=ssm)

    def state_size(self, seq_len: int) -> int:
        size = (self.conv_kernel - 1) * self.conv_dim + self.num_heads * self.d_state * self.head_dim
        window = self.length_setting("state_window")
        if window is not None:
            size += (window - 1) * (self.n_groups * self.d_state + self.num_heads * (self.head_dim + 1))
        return size

    def register_state_probe(self, probe: Callable[..., None]) -> RemovableHandle:
        """Have `probe(dt=, decay=, b=, x=)` called on every forward (every segment of a segmented one) with what
        writes the state, as the recurrence gets it: dt [B, T, H] fp32 (after softplus, padding and dt_scale), the
        decay exp(A dt) [B, T, H], b [B, T, G, N] (after b_scale) and x [B, T, H, P] (after the convolution). The
        state-collapse suite (lctk.evals) reads them this way. `handle.remove()` stops the calls, as torch's
        module hooks."""
        handle = RemovableHandle(self._state_probes)
        self._state_probes[handle.id] = probe
        return handle

    def forward(self, hidden_states: Tensor, seq: SequenceInfo, state: Mamba2State | None = None) -> Tensor:
        batch, length, _ = hidden_states.shape
        segment = seq.recompute_segment
        if segment and length > segment and state is None and torch.is_grad_enabled() and self._runs_segmented(seq):
            return self._segmented(hidden_states, seq, segment)
        z, xbc, dt = self.in_proj(hidden_states).split([self.d_inner, self.conv_dim, self.num_heads], dim=-1)
        xbc = short_conv(xbc, self.conv_weight, self.conv_bias, seq, state, tag=f"{self.letter} conv")
        x, b, c = xbc.split(self.conv_split, dim=-1)

        dt = F.softplus(dt.float() + self.dt_bias.float())  # [B, T, H]
        if seq.token_mask is not None:
            dt = dt * seq.token_mask.unsqueeze(-1)
        dt_scale, b_scale = self.length_setting("dt_scale"), self.length_setting("b_scale")
        if dt_scale not in (None, 1.0):
            dt = dt * dt_scale
        g = -torch.exp(self.A_log.float()) * dt
        x = repeat_heads(x.unflatten(-1, (self.xb_heads, self.head_dim)), self.num_heads // self.xb_heads)
        b = repeat_heads(b.unflatten(-1, (self.b_groups, self.d_state)), self.n_groups // self.b_groups)
        if b_scale not in (None, 1.0):
            b = b * b_scale
        c = c.unflatten(-1, (self.n_groups, self.d_state))
        for probe in self._state_probes.values():
            probe(dt=dt, decay=torch.exp(g), b=b, x=x)
        v = x * dt.unsqueeze(-1).to(x.dtype)

        window, cap = self.length_setting("state_window"), self.length_setting("state_norm_cap")
        if window is not None:
            y = self._windowed(c, b, v, g, seq, state, window)
        elif cap is not None:
            caps = torch.as_tensor(cap, dtype=torch.float32, device=v.device).expand(self.num_heads)
            seen, initial = (None, None) if state is None else (state.seen, state.ssm)
            y, final, counted = capped_scan(c, b, v, g, caps, self.settings["state_norm_every"], seq, seen, initial)
            if state is not None:
                state.ssm, state.seen = final, counted
        elif state is not None and length == 1 and not seq.has_documents and not torch.is_grad_enabled():
            y = recurrent_step(c[:, 0], b[:, 0], v[:, 0], g[:, 0], state.ssm).unsqueeze(1)
        else:
            y, final = ssd_rows(c, b, v, g, seq, None if state is None else state.ssm, self.chunk_size, "M state")
            if state is not None:
                state.ssm = final
        y = y + x * self.D.to(x.dtype).unsqueeze(-1)
        return self.out_proj(self.norm(y.flatten(-2), z))

    def _runs_segmented(self, seq: SequenceInfo) -> bool:
        plain = all(self.length_setting(key) is None for key in ("state_window", "state_norm_cap"))
        return plain and seq.token_mask is None and seq.shard is None

    def _segmented(self, hidden_states: Tensor, seq: SequenceInfo, segment: int) -> Tensor:
        """The layer over segments of `segment` tokens, each checkpointed, the state carried between them."""
        batch, length, _ = hidden_states.shape
        carried = self.init_state(batch, hidden_states.device, hidden_states.dtype)
        conv, ssm, outputs = carried.conv, carried.ssm, []
        for start in range(0, length, segment):
            part = slice(start, start + segment)
            if start:  # a document starting exactly here does not continue the carried state
                continues = (seq.position_ids[:, start] != 0).view(-1, 1, 1)
                conv, ssm = conv * continues.to(conv.dtype), ssm * continues.unsqueeze(-1).to(ssm.dtype)
            out, conv, ssm = checkpoint(self._segment, hidden_states[:, part], conv, ssm, seq.segment(part),
                                        use_reentrant=False, preserve_rng_state=False)
            outputs.append(out)
        return torch.cat(outputs, dim=1)

    def _segment(self, hidden_states: Tensor, conv: Tensor, ssm: Tensor, seq: SequenceInfo):
        state = Mamba2State(conv=conv, ssm=ssm)
        return self.forward(hidden_states, seq, state), state.conv, state.ssm

    def _windowed(
        self, c: Tensor, b: Tensor, v: Tensor, g: Tensor, seq: SequenceInfo, state: Mamba2WindowState | None, window: int
    ) -> Tensor:
        past = None if state is None else (state.window_k, state.window_v, state.window_g)
        y, keep, windowed_state = windowed_scan(c, b, v, g, window, past, seq.seq_idx, want_state=state is not None)
        if state is not None:
            (state.window_k, state.window_v, state.window_g), state.ssm = keep, windowed_state
        return y


def repeat_heads(x: Tensor, times: int) -> Tensor:
    """[B, T, h, d] -> [B, T, h * times, d], each head repeated in place (no copy when times is 1)."""
    return x if times == 1 else x.repeat_interleave(times, dim=2)
