"""`python -m lctk.bench serve`'s pieces that run in lctk's own environment (the vLLM runs need make serve-setup):
the cache bytes a sequence needs as vLLM lays them out, and lctk's generate on the same requests."""

import torch

from lctk.bench.serve import cache_bytes_per_sequence, measure_lctk
from lctk.models import HybridConfig, HybridForCausalLM
from lctk.serving.throughput import prompts_of

MAMBA2 = dict(expand=2, n_groups=1, state_size=8, conv_kernel=4, head_dim=16)


def test_cache_bytes_count_attention_per_token_and_mamba2_once():
    llama = dict(num_attention_heads=4, num_key_value_heads=2, hidden_size=64, num_hidden_layers=3)
    assert cache_bytes_per_sequence(llama, 10) == 3 * 10 * 2 * 2 * 16 * 2  # layers x tokens x K,V x heads x dim x bf16
    hybrid = {**llama, "pattern": "AMM", "mamba2": MAMBA2}
    conv = 3 * (128 + 2 * 8) * 2  # kernel - 1 inputs of x, B, C in bf16
    ssm = 128 // 16 * 8 * 16 * 4  # heads x state x head_dim in fp32
    assert cache_bytes_per_sequence(hybrid, 10) == 10 * 2 * 2 * 16 * 2 + 2 * (conv + ssm)
    assert cache_bytes_per_sequence(hybrid, 1000) - cache_bytes_per_sequence(hybrid, 10) == 990 * 128


def test_every_request_gets_the_same_prompt_in_every_run():
    prompts = prompts_of(5, 7, 50)
    assert prompts == prompts_of(5, 7, 50) and len(prompts) == 5
    assert {len(row) for row in prompts} == {7} and all(1 <= token < 50 for row in prompts for token in row)


def test_lctk_generate_makes_every_output_token_in_batches():
    torch.manual_seed(0)
    config = HybridConfig(pattern="MA", vocab_size=40, hidden_size=32, num_attention_heads=2, eos_token_id=3)
    model = HybridForCausalLM(config).eval()
    found = measure_lctk(model, prompts_of(5, 6, 40), output=4, batch=2)
    assert found["output_tokens"] == 5 * 4 and found["batch"] == 2  # no row stops early at an end token
    assert found["tok_s"] == found["output_tokens"] / found["seconds"] > 0
