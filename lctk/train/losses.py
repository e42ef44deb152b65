"""Losses from the final hidden states, chunk by chunk: nothing materialises a [T, vocab] tensor (shared by train and
distill).

`head_loss` sums a per-position loss of the logits W h_t (+ b) over all positions, CHUNK rows at a time. For each
chunk it computes the logits, the chunk's loss, and right there the gradient of that loss with respect to the logits
(by autograd on the chunk alone, or in closed form where the loss gives one), then folds it into dL/dh for the chunk's
rows and into dL/dW, which it keeps for backward; backward only scales them by the incoming gradient. This is Liger's
choice for its fused linear cross-entropy, taken here rather than recomputing each chunk's logits in backward because
a training loss is always followed by its backward pass: computing the gradients in forward costs three matmuls per chunk (logits, dh, dW)
instead of four, and what it keeps between forward and backward (dh, the size of h, and dW, which the parameter's
.grad holds anyway) does not grow with the vocabulary. Without grad (evaluation) only the loss is computed. Peak
memory of the loss is O(chunk x vocab), CHUNK_LOGITS logits per chunk: for cross-entropy one fp32 [chunk, vocab]
buffer turned into softmax - onehot in place plus its bf16 copy under autocast (autograd would hold about four fp32
copies: logits, log-softmax, its gradient, and the gradient again for dL/dW).

Chunked and full computations run the same row-wise ops on the same rows, so they agree to rounding: the softmax
math is fp32 inside the chunk, and under bf16 autocast the matmuls are bf16 as in the full path. On CUDA, when
`liger_kernel` is installed, the cross-entropy uses Liger's fused Triton kernel instead (LCTK_KERNELS=torch keeps
ours).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lctk.labels import IGNORE, shifted_targets

CHUNK_LOGITS = 2**23  # logits per chunk: 256 rows of a 32K vocabulary, 32 MiB per fp32 copy

ChunkLoss = Callable[[Tensor, slice], Tensor]  # (logits [rows, vocab], the rows' slice of [B*T]) -> summed loss


@dataclass
class LMHead:
    """What turns final hidden states into logits: finish(h W^T + b), finish = scaling then tanh soft-capping."""

    weight: Tensor
    bias: Tensor | None = None
    scale: float = 1.0  # Cohere's logit_scale, 1 / Granite's logits_scaling
    softcap: float | None = None  # Gemma 2's final_logit_softcapping

    @classmethod
    def of(cls, model: nn.Module) -> LMHead:
        """The output embeddings and logit post-processing of any HF causal LM (DDP-wrapped or not)."""
        model = getattr(model, "module", model)
        config = model.config
        if getattr(config, "dim_model_base", None) is not None:
            raise ValueError(f"{config.model_type}: hidden states are rescaled before the LM head (dim_model_base); "
                             "chunked losses do not support this model")
        head = model.get_output_embeddings()
        scale = (getattr(config, "logit_scale", None) or 1.0) / (getattr(config, "logits_scaling", None) or 1.0)
        return cls(head.weight, head.bias, scale, getattr(config, "final_logit_softcapping", None))

    def finish(self, raw: Tensor) -> Tensor:
        logits = raw * self.scale if self.scale != 1.0 else raw
        return torch.tanh(logits / self.softcap) * self.softcap if self.softcap else logits

    def logits(self, hidden: Tensor) -> Tensor:
        return self.finish(F.linear(hidden, self.weight, self.bias))


def final_hidden(model: nn.Module, inputs: dict, output_hidden_states: bool = False):
    """(final hidden states [B, T, D] after the last norm, the model's output) from a forward pass that computes no
    logits (an empty `logits_to_keep`). lctk models return them as `last_hidden_state`; any other HF causal LM as the
    last of its hidden states (HF's convention), which costs nothing extra in training (the autograd graph keeps
    every layer's input anyway)."""
    from lctk.models.modeling import HybridForCausalLM

    native = isinstance(getattr(model, "module", model), HybridForCausalLM)
    no_logits = torch.empty(0, dtype=torch.long, device=inputs["input_ids"].device)
    out = model(**inputs, use_cache=False, logits_to_keep=no_logits,
                output_hidden_states=output_hidden_states or not native)
    return (out.last_hidden_state if native else out.hidden_states[-1]), out


def token_ce(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-position cross-entropy in fp32, shaped like targets (logits [..., vocab]); 0 where the target is IGNORE."""
    return F.cross_entropy(logits.float().flatten(0, -2), targets.flatten(), ignore_index=IGNORE,
                           reduction="none").view_as(targets)


def cross_entropy_sum(hidden: Tensor, head: LMHead, labels: Tensor, chunk: int | None = None,
                      shifted: bool = False) -> Tensor:
    """Summed next-token cross-entropy from final hidden states [B, T, D] and unshifted labels [B, T] (IGNORE: none).
    shifted: labels are already each position's target (a shard of rows split across processes, shifted on the full
    rows: its last position predicts the next shard's first token)."""
    targets = (labels if shifted else shifted_targets(labels)).flatten()
    liger = _liger_cross_entropy() if hidden.is_cuda and head.scale == 1.0 else None
    if liger is not None:
        kwargs = {"softcap": head.softcap} if head.softcap else {}
        return liger(ignore_index=IGNORE, reduction="sum", **kwargs)(head.weight, hidden.flatten(0, -2), targets, head.bias)
    plain_logits = head.scale == 1.0 and not head.softcap  # the closed form is for the raw logits
    return head_loss(hidden, head, lambda logits, rows: token_ce(logits, targets[rows]).sum(), chunk,
                     (lambda raw, rows: ce_value_and_grad(raw, targets[rows])) if plain_logits else None)


def ce_value_and_grad(raw: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Summed cross-entropy of logits raw [rows, vocab] against targets [rows] (IGNORE: none) and its gradient,
    softmax - onehot in fp32, made in one buffer in place (raw itself is overwritten when it is already fp32)."""
    grad = raw.float()
    counted = (targets != IGNORE).unsqueeze(1)
    picked = targets.clamp(min=0).unsqueeze(1)
    top = grad.amax(-1, keepdim=True)
    target_logit = grad.gather(1, picked)
    total = grad.sub_(top).exp_().sum(-1, keepdim=True)
    value = ((total.log() + top - target_logit) * counted).sum()
    grad.div_(total).scatter_add_(1, picked, -counted.to(grad.dtype))
    return value, grad.mul_(counted)


LossGrad = Callable[[Tensor, slice], tuple[Tensor, Tensor]]  # (raw logits, rows) -> (summed loss, its fp32 gradient)


def head_loss(hidden: Tensor, head: LMHead, loss: ChunkLoss, chunk: int | None = None,
              loss_grad: LossGrad | None = None) -> Tensor:
    """sum over chunks of loss(head.logits(h[rows]), rows), rows running over the flattened positions [B*T].
    loss_grad, where given, computes the same loss of the raw logits (head.finish must be the identity) with its
    gradient, in place of autograd."""
    chunk = chunk or max(1, CHUNK_LOGITS // head.weight.shape[0])
    # under no_grad, needs_input_grad still says True for parameters: pass whether gradients will be asked for
    return _HeadLoss.apply(hidden.flatten(0, -2), head.weight, head.bias, head.finish, loss, chunk,
                           torch.is_grad_enabled(), loss_grad)


class _HeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, finish, loss, chunk, grad_enabled, loss_grad):
        wants = [grad_enabled and needed for needed in ctx.needs_input_grad[:3]]
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        grad_hidden = torch.empty_like(hidden) if wants[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if wants[1] else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if bias is not None and wants[2] else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        # the head in the matmul dtype once (autocast would cast it again for every chunk)
        if torch.is_autocast_enabled(hidden.device.type):
            dtype = torch.get_autocast_dtype(hidden.device.type)
            weight, bias = weight.to(dtype), None if bias is None else bias.to(dtype)
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            h = hidden[rows]
            raw = F.linear(h.to(weight.dtype), weight, bias)
            if not any(wants):
                total += loss(finish(raw), rows)
                continue
            if loss_grad is not None:
                value, grad_fp32 = loss_grad(raw, rows)
                del raw
                grad_raw = grad_fp32.to(weight.dtype)
            else:
                with torch.enable_grad():
                    raw = raw.detach().requires_grad_()
                    value = loss(finish(raw), rows)
                    (grad_raw,) = torch.autograd.grad(value, raw)
                grad_fp32 = None
            total += value.detach()
            if grad_hidden is not None:
                grad_hidden[rows] = grad_raw @ weight
            if grad_weight is not None:  # in place, in fp32: no [vocab, D] temporary per chunk
                grad_weight.addmm_(grad_raw.t().float() if grad_fp32 is None else grad_fp32.t(), h.float())
            if grad_bias is not None:
                grad_bias += grad_raw.sum(0)
            del grad_raw, grad_fp32
        # kept on ctx, not save_for_backward: they are results, not inputs, and backward frees them
        ctx.grads = (grad_hidden, grad_weight, grad_bias)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grads = [None if g is None else g.mul_(grad_total).to(dtype) for g, dtype in zip(ctx.grads, ctx.dtypes)]
        ctx.grads = None
        return (*grads, None, None, None, None, None)


@functools.cache
def _liger_cross_entropy():
    """Liger's fused linear cross-entropy class where installed (and not switched off by LCTK_KERNELS=torch)."""
    if os.environ.get("LCTK_KERNELS") == "torch":
        return None
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    return LigerFusedLinearCrossEntropyLoss
