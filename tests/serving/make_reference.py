"""Run in lctk's own environment (transformers >= 5.24, which lctk's forward needs; vLLM's environment has < 5.20):
save a tiny random lctk model to a folder with `reference.json`, the prompts and the greedy tokens of lctk's own
`generate` for each. tests/serving/test_vllm.py runs it through that environment's python.

    python tests/serving/make_reference.py OUT PATTERN '{"mamba2": {"n_groups": 2}, ...}'
"""

import json
import sys

import torch

import lctk

PROMPT_LENGTHS = (5, 40, 200)  # a short one, one past the window of `S`, one past a cache block (128 tokens here)
NEW_TOKENS = 10


def main(out: str, pattern: str, overrides: str) -> None:
    torch.manual_seed(0)
    settings = {
        "vocab_size": 128, "hidden_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 512, "mamba2": {"state_size": 16, "head_dim": 16, "chunk_size": 8},
        "attention": {"window": 8},
    }
    settings.update(json.loads(overrides))
    model = lctk.HybridForCausalLM(lctk.HybridConfig(pattern=pattern, **settings)).eval()
    model.save_pretrained(out)
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 128, (length,), generator=generator).tolist() for length in PROMPT_LENGTHS]
    prompts.append(prompts[-1][:150] + prompts[0])  # shares the longest prompt's first block (prefix caching)
    tokens = [model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False)[0, len(prompt):]
              .tolist() for prompt in prompts]
    with open(f"{out}/reference.json", "w") as file:
        json.dump({"prompts": prompts, "tokens": tokens}, file)


if __name__ == "__main__":
    main(*sys.argv[1:4])
