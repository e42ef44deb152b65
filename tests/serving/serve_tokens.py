"""Run in the serving environment: greedy tokens from vLLM (the lctk plugin) for the prompts of a model folder's
reference.json, with chunked prefill (16-token steps) and prefix caching on. The last prompt is sent after the others
have finished, so it can reuse the cached blocks of the prompt it shares a prefix with. Where reference.json has
`logprobs` (models with `G`, served in DTYPE bfloat16) it also gives the log-softmax at every position of those prompts
(teacher-forced: prompt_logprobs over the whole vocabulary). Prints one JSON line.

    python tests/serving/serve_tokens.py MODEL_FOLDER [DTYPE]
"""

import json
import sys

from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt


def main(folder: str, dtype: str = "float32") -> None:
    with open(f"{folder}/reference.json") as file:
        reference = json.load(file)
    with open(f"{folder}/config.json") as file:
        vocab = json.load(file)["vocab_size"]
    llm = LLM(model=folder, skip_tokenizer_init=True, dtype=dtype, enforce_eager=True, max_model_len=256,
              max_num_seqs=4, max_num_batched_tokens=16, enable_chunked_prefill=True, enable_prefix_caching=True,
              max_logprobs=vocab, seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=len(reference["tokens"][0]), detokenize=False)
    *first, last = [TokensPrompt(prompt_token_ids=prompt) for prompt in reference["prompts"]]
    outputs = llm.generate(first, params, use_tqdm=False) + llm.generate([last], params, use_tqdm=False)
    result = {"tokens": [list(out.outputs[0].token_ids) for out in outputs],
              "cached": [out.num_cached_tokens or 0 for out in outputs]}
    if "logprobs" in reference:
        scored = reference["prompts"][: len(reference["logprobs"]["float32"])]
        scoring = SamplingParams(max_tokens=1, prompt_logprobs=vocab, detokenize=False)
        outputs = llm.generate([TokensPrompt(prompt_token_ids=prompt) for prompt in scored], scoring, use_tqdm=False)
        result["logprobs"] = [[[position[token].logprob for token in range(vocab)]
                               for position in out.prompt_logprobs[1:]] for out in outputs]
    print(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:3])
