"""Run in the serving environment: greedy tokens from vLLM (the lctk plugin) for the prompts of a model folder's
reference.json, with chunked prefill (16-token steps) and prefix caching on. The last prompt is sent after the others
have finished, so it can reuse the cached blocks of the prompt it shares a prefix with. Prints one JSON line."""

import json
import sys

from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt


def main(folder: str) -> None:
    with open(f"{folder}/reference.json") as file:
        reference = json.load(file)
    llm = LLM(model=folder, skip_tokenizer_init=True, dtype="float32", enforce_eager=True, max_model_len=256,
              max_num_seqs=4, max_num_batched_tokens=16, enable_chunked_prefill=True, enable_prefix_caching=True,
              seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=len(reference["tokens"][0]), detokenize=False)
    *first, last = [TokensPrompt(prompt_token_ids=prompt) for prompt in reference["prompts"]]
    outputs = llm.generate(first, params, use_tqdm=False) + llm.generate([last], params, use_tqdm=False)
    print(json.dumps({"tokens": [list(out.outputs[0].token_ids) for out in outputs],
                      "cached": [out.num_cached_tokens or 0 for out in outputs]}))


if __name__ == "__main__":
    main(sys.argv[1])
