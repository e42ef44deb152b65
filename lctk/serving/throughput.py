"""One throughput measurement in vLLM, run in the serving venv by `python -m lctk.bench serve`:

    python -m lctk.serving.throughput MODEL --requests N --prompt P --output T --kv-bytes B

N requests of P random prompt tokens each, T greedy output tokens each (ignore_eos: every request makes exactly T),
all submitted at once; vLLM's cache gets exactly B bytes (kv_cache_memory_bytes: attention KV and recurrent state
together), so the number of sequences it runs at once is what the model's cache bytes allow. Eager mode (no
torch.compile: compiling takes minutes on a small CPU and is the same for every model). Prints one JSON line:
output tokens, seconds, output tokens/s, and the seconds of one warm-up request."""

from __future__ import annotations

import argparse
import json
import random
import time


def prompts_of(requests: int, prompt: int, vocab: int) -> list[list[int]]:
    """The random prompts every run gets, vLLM here and lctk in python -m lctk.bench serve."""
    rng = random.Random(0)
    return [[rng.randrange(1, vocab) for _ in range(prompt)] for _ in range(requests)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--requests", type=int, required=True)
    parser.add_argument("--prompt", type=int, required=True)
    parser.add_argument("--output", type=int, required=True)
    parser.add_argument("--kv-bytes", type=int, required=True)
    args = parser.parse_args()

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=args.model, dtype="bfloat16", kv_cache_memory_bytes=args.kv_bytes, skip_tokenizer_init=True,
              max_model_len=args.prompt + args.output, max_num_seqs=args.requests, enforce_eager=True,
              enable_prefix_caching=False, seed=0)
    vocab = llm.llm_engine.model_config.get_vocab_size()
    prompts = [TokensPrompt(prompt_token_ids=row) for row in prompts_of(args.requests, args.prompt, vocab)]
    params = SamplingParams(temperature=0.0, max_tokens=args.output, ignore_eos=True, detokenize=False)
    start = time.perf_counter()
    llm.generate(prompts[:1], SamplingParams(max_tokens=2, ignore_eos=True, detokenize=False), use_tqdm=False)
    warmup = time.perf_counter() - start
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    tokens = sum(len(out.outputs[0].token_ids) for out in outputs)
    print(json.dumps({"output_tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds, "warmup_s": warmup}))


if __name__ == "__main__":
    main()
