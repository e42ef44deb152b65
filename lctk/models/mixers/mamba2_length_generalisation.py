"""Length generalisation for Mamba-2 (lctk.models.mixers.mamba2): the settings that mitigate state collapse past the
training length, their checks, and the two scans that replace the chunked SSD recurrence when a setting asks for it.
Training-free, from the state-collapse literature, all off by default (then the layer runs as without them); chosen
and calibrated by `lctk extend` (lctk.extend.recurrent).

Each setting is one value for every Mamba-2 layer, or a list with one entry per layer of the pattern (index = the
layer's position in `config.pattern`, as in `model.model.layers[i]` and the cache; null at layers that are not `M`),
so calibrated per-layer values live in config.json:

    dt_scale        dt <- s dt: the decay exp(A s dt) and the input s dt B x both change (MambaExtend's scaled
                    discretisation; s > 1 forgets faster, s < 1 remembers longer)
    b_scale         B <- s B: less written into the state per token ("remember less"), the decay unchanged
    state_norm_cap  the state carried past every `state_norm_every`-th token of a document (counting its real
                    tokens from its start, so chunked prefill, decoding, packing and padding all agree) is rescaled
                    to Frobenius norm <= c per head, h <- h min(1, c / ||h||); c is one value for all heads or a
                    list per head, calibrated on in-length input. The chunked kernel runs between caps (in between,
                    the norm can pass c by what those tokens add).
    state_window    only the last r tokens are in the state: h_t - (prod_{t-r<u<=t} a_u) h_{t-r}
                        = sum_{t-r<s<=t} (prod_{s<u<=t} a_u) k_s v_s^T,
                    computed exactly as a banded (sliding-window) form of the SSD "attention"; the cache keeps the
                    last r - 1 tokens' (B, x dt, A dt) in place of a growing history, and its `ssm` tensor holds the
                    windowed state. Cannot be combined with state_norm_cap.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lctk.models.sequence import SequenceInfo

LENGTH_SETTINGS = ("dt_scale", "b_scale", "state_norm_cap", "state_window")


def check_length_settings(settings: dict[str, Any], pattern: str, heads: int) -> None:
    """Validate the length-generalisation settings: a value for every Mamba-2 layer, or one per layer of the
    pattern (null where the layer is not `M`). None means off."""
    for key in LENGTH_SETTINGS:
        value = settings[key]
        if not isinstance(value, list):
            _check_length_value(f"mamba2.{key}", key, value, heads)
            continue
        if len(value) != len(pattern):
            raise ValueError(
                f"mamba2.{key}: a per-layer list needs one entry per layer of the pattern ({len(pattern)}), got {len(value)}"
            )
        for index, (letter, entry) in enumerate(zip(pattern, value)):
            if letter != "M" and entry is not None:
                raise ValueError(f"mamba2.{key}[{index}]: layer {index} is {letter!r}, not Mamba-2; use null")
            _check_length_value(f"mamba2.{key}[{index}]", key, entry, heads)
    per_layer = {key: settings[key] if isinstance(settings[key], list) else [settings[key]] * len(pattern)
                 for key in ("state_window", "state_norm_cap")}  # fmt: skip
    for index, (window, cap) in enumerate(zip(per_layer["state_window"], per_layer["state_norm_cap"])):
        if window is not None and cap is not None:
            raise ValueError(f"mamba2.state_window: cannot be combined with state_norm_cap (layer {index})")


def _is_positive_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _check_length_value(name: str, key: str, value: Any, heads: int) -> None:
    if value is None:
        return
    if key == "state_window":
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}: must be a positive integer number of tokens or null, got {value!r}")
    elif key == "state_norm_cap" and isinstance(value, list):
        if len(value) != heads or not all(_is_positive_number(cap) for cap in value):
            raise ValueError(f"{name}: a per-head list needs {heads} positive numbers, got {value!r}")
    elif not _is_positive_number(value):
        raise ValueError(f"{name}: must be a positive number or null, got {value!r}")


def capped_scan(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    caps: Tensor,
    every: int,
    seq: SequenceInfo,
    seen: Tensor | None,
    initial: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The SSD recurrence with each head's state rescaled to norm <= caps[h] when carried past every `every`-th real
    token of a document (the token itself reads the state before the cap).

    q, k [B, T, G, N]; v [B, T, H, P]; g [B, T, H]; seen [B] real tokens each row's current document had before
    this call, initial [B, H, N, P] (None: a fresh start). Each row is cut into pieces that end at a cap or a
    document end, each computed in closed form as one SSD chunk. Returns (o [B, T, H, P], final states, tokens
    seen)."""
    batch, length, heads, head_dim = v.shape
    states = initial if initial is not None else v.new_zeros(batch, heads, k.shape[-1], head_dim, dtype=torch.float32)
    seen = seen if seen is not None else torch.zeros(batch, dtype=torch.long, device=v.device)
    docs = seq.seq_idx if seq.seq_idx is not None else torch.zeros(batch, length, dtype=torch.long, device=v.device)
    real = seq.token_mask if seq.token_mask is not None else torch.ones(batch, length, dtype=torch.bool, device=v.device)
    out, finals, counted = torch.empty_like(v), [], []
    for row in range(batch):
        doc, counts = docs[row], real[row].long().cumsum(0)
        starts = torch.cat([doc.new_zeros(1, dtype=torch.bool), doc[1:] != doc[:-1]])
        counts = counts - torch.where(starts, counts - real[row].long(), 0).cummax(0).values  # restart per document
        counts = counts + seen[row] * (doc == doc[0])  # the first document continues the cache's
        capped = real[row] & (counts % every == 0)
        ends = (torch.nonzero(capped | torch.cat([starts[1:], starts.new_ones(1)])).flatten() + 1).tolist()
        state, begin = states[row].float(), 0
        for end in ends:
            if starts[begin]:
                state = torch.zeros_like(state)
            y, state = _one_chunk(*[t[row, begin:end] for t in (q, k, v, g)], state)
            if capped[end - 1]:
                norms = state.flatten(1).norm(dim=-1)  # [H]
                state = state * (caps / norms.clamp(min=torch.finfo(norms.dtype).tiny)).clamp(max=1.0)[:, None, None]
            out[row, begin:end] = y
            begin = end
        finals.append(state)
        counted.append(counts[-1])
    return out, torch.stack(finals), torch.stack(counted)


def _one_chunk(q: Tensor, k: Tensor, v: Tensor, g: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
    """A few tokens of the recurrence in closed form (one SSD chunk, no batch): q, k [L, G, N]; v [L, H, P];
    g [L, H]; state [H, N, P]. Returns (o [L, H, P] in v's dtype, the state after the last token)."""
    repeat = v.shape[1] // k.shape[1]
    q, k = q.float().repeat_interleave(repeat, dim=1), k.float().repeat_interleave(repeat, dim=1)
    cumulative = g.float().cumsum(0)  # [L, H]
    relative = cumulative.T[:, :, None] - cumulative.T[:, None, :]  # [H, L, L]: G_t - G_s
    causal = torch.ones(len(g), len(g), dtype=torch.bool, device=g.device).tril()
    weights = torch.einsum("thn,shn->hts", q, k) * torch.exp(relative.masked_fill(~causal, float("-inf")))
    o = torch.einsum("hts,shp->thp", weights, v.float())
    o = o + torch.exp(cumulative)[..., None] * torch.einsum("thn,hnp->thp", q, state)
    to_end = torch.exp(cumulative[-1] - cumulative)  # [L, H]
    state = torch.exp(cumulative[-1])[:, None, None] * state + torch.einsum("sh,shn,shp->hnp", to_end, k, v.float())
    return o.to(v.dtype), state


_WINDOW_QUERY_BLOCK = 256  # queries per banded block: bounds the [Q, Q + r - 1] temporaries


def windowed_scan(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    window: int,
    past: tuple[Tensor, Tensor, Tensor] | None,
    seq_idx: Tensor | None,
    want_state: bool,
) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor], Tensor | None]:
    """The SSD recurrence restricted to the last `window` tokens:
    o_t = sum_{t-r<s<=t, same document} (q_t . k_s) exp(G_t - G_s) v_s, with G the cumulative log-decay.

    q, k [B, T, G, N]; v [B, T, H, P]; g [B, T, H]; past = the previous r - 1 tokens' (k, v, g) (zeros: none; they
    belong to the call's first document) or None. Returns (o [B, T, H, P], the last r - 1 tokens' (k, v, g) with
    those of finished documents zeroed, and the windowed state [B, H, N, P] at the last token when want_state)."""
    batch, length, heads, head_dim = v.shape
    repeat = heads // k.shape[2]
    kept = window - 1
    if past is None:
        past = (k.new_zeros(batch, kept, *k.shape[2:]), v.new_zeros(batch, kept, heads, head_dim), g.new_zeros(batch, kept, heads))
    k_all = torch.cat([past[0].to(k.dtype), k], dim=1)
    v_all = torch.cat([past[1].to(v.dtype), v], dim=1)
    g_all = torch.cat([past[2].float(), g.float()], dim=1)  # token t of this call sits at t + kept
    doc_all = None if seq_idx is None else F.pad(seq_idx, (kept, 0), value=0)

    out = v.new_empty(batch, length, heads, head_dim)
    for start in range(0, length, _WINDOW_QUERY_BLOCK):
        stop = min(start + _WINDOW_QUERY_BLOCK, length)
        keys = slice(start, stop + kept)  # every key some query of the block sees; the queries are its last ones
        log_decay = g_all[:, keys].cumsum(1).transpose(1, 2)  # [B, H, S], local to the block: no long cumsum
        distance = (torch.arange(kept, stop - start + kept, device=v.device)[:, None]
                    - torch.arange(stop - start + kept, device=v.device)[None, :])  # fmt: skip
        visible = ((distance >= 0) & (distance < window)).expand(batch, 1, -1, -1)  # [B, 1, Q, S]
        if doc_all is not None:
            visible = visible & (doc_all[:, start + kept : stop + kept, None] == doc_all[:, None, keys]).unsqueeze(1)
        relative = log_decay[..., kept:, None] - log_decay[..., None, :]  # [B, H, Q, S]
        decay = torch.exp(relative.masked_fill(~visible, float("-inf")))
        scores = torch.einsum("bqgn,bsgn->bgqs", q[:, start:stop].float(), k_all[:, keys].float())
        weights = scores.repeat_interleave(repeat, dim=1) * decay
        out[:, start:stop] = torch.einsum("bhqs,bshp->bqhp", weights, v_all[:, keys].float()).to(v.dtype)

    tail = slice(k_all.shape[1] - kept, None)
    in_last_doc = None if doc_all is None else (doc_all == seq_idx[:, -1:])  # [B, r - 1 + T]
    keep = [t[:, tail] for t in (k_all, v_all, g_all)]
    if in_last_doc is not None:
        keep = [t * in_last_doc[:, tail].view(batch, -1, *[1] * (t.dim() - 2)).to(t.dtype) for t in keep]

    state = None
    if want_state:
        last = slice(k_all.shape[1] - window, None)
        log_decay = g_all[:, last].cumsum(1)  # [B, r, H]
        weight = torch.exp(log_decay[:, -1:] - log_decay)
        if in_last_doc is not None:
            weight = weight * in_last_doc[:, last].unsqueeze(-1)
        k_heads = k_all[:, last].float().repeat_interleave(repeat, dim=2)
        state = torch.einsum("bsh,bshn,bshp->bhnp", weight, k_heads, v_all[:, last].float())
    return out, tuple(keep), state
