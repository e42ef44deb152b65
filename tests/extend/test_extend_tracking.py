"""`lctk extend` with a tracker: each training stage is a tracker run of its own, and the before/after evals reach
a tracker that is then closed (wandb offline only: no network)."""

from test_extend_command import QUICK_EVAL, invoke, tiny_model_dir  # noqa: F401  (a fixture)


def test_extend_logs_its_evals(tiny_model_dir, tmp_path, monkeypatch):  # noqa: F811
    from accelerate.tracking import WandBTracker

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_PROJECT", "lctk-extend-test")
    events = []
    for method in ("start", "log", "finish"):
        real = getattr(WandBTracker, method)

        def record(self, *args, _real=real, _method=method, **kwargs):
            events.append((_method, sorted(args[0]) if _method == "log" else self.run_name))
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(WandBTracker, method, record)
    out = tmp_path / "run"
    invoke("--model", tiny_model_dir, "--method", "yarn", "--factor", 2, "--output", out, *QUICK_EVAL)
    assert events[0] == ("start", "lctk-extend-test") and events[-1][0] == "finish"
    assert {e[0] for e in events[1:-1]} == {"log"}
    logged = {key for _, keys in events[1:-1] for key in keys}
    assert "eval/before_after" in logged  # the table
    assert any(k.startswith("eval/before/perplexity") for k in logged)
    assert any(k.startswith("eval/after/perplexity") for k in logged)
    assert (out / "wandb").is_dir()
