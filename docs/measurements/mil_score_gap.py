"""How far the MIL init's first-step scores (C_t . B_s = silu(q_t) . silu(k_s)) are from SmolLM2-135M's attention
logits, every third layer: Pearson correlation over the causal (t, s) pairs of each head, mean over heads, 256 tokens
of the builtin corpus. Needs `make setup-smollm2` and one distill run (the converted teacher in ~/.cache/lctk)."""

import glob
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from lctk.tasks.corpus import builtin_documents

LENGTH = 256
torch.set_num_threads(1)
folder = glob.glob(str(Path.home() / ".cache/lctk/teachers/*/"))[0]
tokenizer = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
ids = tokenizer("\n\n".join(builtin_documents()[-3:]), return_tensors="pt")["input_ids"][:, :LENGTH]
inputs = {}
for index, layer in enumerate(model.model.layers):
    layer.self_attn.register_forward_hook(
        lambda m, args, kwargs, out, i=index: inputs.update({i: (kwargs["hidden_states"], kwargs["position_embeddings"])}),
        with_kwargs=True,
    )
with torch.no_grad():
    model(ids)
config = model.config
head_dim = config.hidden_size // config.num_attention_heads
groups = config.num_attention_heads // config.num_key_value_heads
causal = torch.ones(LENGTH, LENGTH, dtype=torch.bool).tril()


def correlation(a, b):
    a, b = a[:, causal], b[:, causal]
    a, b = a - a.mean(-1, keepdim=True), b - b.mean(-1, keepdim=True)
    return float(((a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))).mean())


print("layer | logits vs q.k without RoPE | logits vs silu(q).silu(k) | softmax weights vs silu(q).silu(k)")
for index in range(0, config.num_hidden_layers, 3):
    hidden, (cos, sin) = inputs[index]
    attention = model.model.layers[index].self_attn
    with torch.no_grad():
        q = attention.q_proj(hidden).view(1, LENGTH, -1, head_dim).transpose(1, 2)
        k = attention.k_proj(hidden).view(1, LENGTH, -1, head_dim).transpose(1, 2).repeat_interleave(groups, 1)
        q_rope, k_rope = apply_rotary_pos_emb(q, k, cos, sin)
        logits = (q_rope @ k_rope.transpose(-1, -2))[0] / head_dim**0.5
        plain = (q @ k.transpose(-1, -2))[0] / head_dim**0.5
        mil = (F.silu(q) @ F.silu(k).transpose(-1, -2))[0] / head_dim**0.5
        weights = logits.masked_fill(~causal, float("-inf")).softmax(-1)
    print(f"{index} | {correlation(logits, plain):.3f} | {correlation(logits, mil):.3f} | {correlation(weights, mil):.3f}")
