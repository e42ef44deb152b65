"""`python -m lctk.bench generate` at toy sizes (--dry-run): every row gets its bytes, FLOPs, roofline and fraction,
the cost model counts what a step must read, over-large caches are skipped, and bad flags are one error line."""

import pytest

from lctk.bench import generate


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    path = tmp_path_factory.mktemp("generate") / "figures.json"
    return generate.main(["--dry-run", "--models", "llama-static,A30,M30,teacher,student-8,student-8-G", "--dtypes", "fp32",
                          "--json", str(path)])


def rows(results, model):
    return {(r["batch"], r["context"]): r for r in results["rows"] if r["model"] == model}


def test_every_row_is_measured_against_its_roofline(results):
    assert len(results["rows"]) == 6 * 2 * 2  # models x batches x contexts
    for row in results["rows"]:
        assert row["step_s"] > 0 and row["decode_tok_s"] == pytest.approx(row["batch"] / row["step_s"])
        assert row["bytes"] > 0 and row["flops"] > 0
        parts = row["parts"]
        assert row["bytes"] == sum(part["bytes"] for part in parts.values()) > 0
        rates = {int(rows): rate for rows, rate in row["rate"].items()}
        assert row["roofline_s"] == pytest.approx(sum(
            max(part["bytes"] / row["bandwidth"], part["flops"] / rates[part["rows"]] if part["rows"] else 0)
            for part in parts.values()))
        assert row["roofline_s"] >= row["bytes"] / row["bandwidth"] * (1 - 1e-9)
        assert row["fraction"] == pytest.approx(row["roofline_s"] / row["step_s"])
    prefilled = [row for row in results["rows"] if "prefill_tok_s" in row]
    assert prefilled and all(row["batch"] == 1 and row["context"] == 64 for row in prefilled)


def test_the_cost_model_counts_caches_and_states(results):
    llama, ours, mamba = rows(results, "llama-static"), rows(results, "A30"), rows(results, "M30")
    for key in llama:  # same shape: the same bytes and FLOPs per step
        assert ours[key]["bytes"] == llama[key]["bytes"] and ours[key]["flops"] == llama[key]["flops"]
    # attention reads 2 x layers x KV heads x head_dim x 4 bytes more per token of context and row
    per_token = 2 * 4 * 2 * 16 * 4
    assert ours[(8, 128)]["bytes"] - ours[(8, 64)]["bytes"] == 8 * 64 * per_token
    assert mamba[(1, 128)]["bytes"] == mamba[(1, 64)]["bytes"]  # recurrent states do not grow
    delta = rows(results, "student-8-G")  # 1 of the toy teacher's 4 layers is Gated DeltaNet: 3 caches grow
    assert delta[(1, 128)]["bytes"] - delta[(1, 64)]["bytes"] == 64 * per_token * 3 // 4
    layer = 2 * (4 * 4 * 16 * 16 + 4 * 3 * (2 * 4 * 16 + 4 * 16))  # 4 heads of 16 x 16 fp32, conv window of q, k, v
    assert delta[(1, 64)]["parts"]["states"]["bytes"] == layer


def test_ratios_and_the_budget_are_reported(results):
    pairs = {line["pair"] for line in results["ratios"]}
    assert {"A30/llama-static", "M30/A30", "student-8/teacher", "student-8-G/teacher"} <= pairs
    for row in results["budget"]:  # the largest batch whose weights and caches fit
        assert row["batch"] == int((row["budget_gb"] * 2**30 - row["weights"]) // row["bytes_per_row"]) >= 1
        assert row["decode_tok_s"] == pytest.approx(row["batch"] / row["step_s"])


def test_caches_over_the_limit_are_skipped():
    found = generate.main(["--dry-run", "--models", "A30", "--dtypes", "fp32", "--max-cache-gb", "0.0001",
                           "--budget-gb", "0"])
    assert all("skipped" in row and "step_s" not in row for row in found["rows"] if row["batch"] == 8)
    assert found["budget"] == []


@pytest.mark.parametrize("flags, message", [
    (["--models", "gpt5"], "--models: unknown gpt5"),
    (["--contexts", "2k"], "--contexts: comma-separated numbers"),
    (["--dtypes", "fp8"], "--dtypes"),
])
def test_bad_flags_are_one_error_line(capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        generate.parse(["--dry-run", *flags])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
