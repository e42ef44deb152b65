"""Experiment trackers (wandb, TensorBoard, MLflow, ...) through accelerate's `log_with` / `init_trackers`.

What is on: the recipe's `logging.trackers` (accelerate's names: tensorboard, mlflow, comet_ml, aim, ...), plus wandb
when its mode is not `disabled`. The mode is `logging.wandb.mode`, else WANDB_MODE, else disabled: a run writes no
`wandb/` folder unless the recipe or the environment asks. The project is `logging.wandb.project`, else
WANDB_PROJECT, else "lctk". A recipe's explicit setting wins, as wandb.init's arguments win over its environment
variables (`--set logging.wandb.mode=disabled` turns a recipe's wandb off for one run). `check_trackers` runs before any work, so a missing package or an online run
without a wandb key is one line, not a prompt or a traceback after data preparation. Trackers stay open until the
command calls `accelerator.end_training()`, after its evals are logged (`log_results`).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from lctk.errors import UserError

WANDB_MODES = ("online", "offline", "disabled")
# the package each accelerate tracker imports
PACKAGES = {"wandb": "wandb", "tensorboard": "tensorboard", "mlflow": "mlflow", "comet_ml": "comet_ml", "aim": "aim",
            "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab", "trackio": "trackio"}


def wandb_mode(logging) -> str:
    mode = logging.wandb.mode or os.environ.get("WANDB_MODE") or "disabled"
    mode = {"dryrun": "offline", "run": "online"}.get(mode, mode)  # wandb's older names
    if mode not in WANDB_MODES:
        raise UserError(f"WANDB_MODE: {mode!r} is not one of {', '.join(WANDB_MODES)}")
    return mode


def tracker_names(logging) -> list[str]:
    return [*logging.trackers, *(["wandb"] if wandb_mode(logging) != "disabled" else [])]


def check_trackers(logging) -> None:
    """Before any work: every tracker's package is installed, and an online wandb run has a key."""
    for name in tracker_names(logging):
        if name not in PACKAGES:
            raise UserError(f"logging.trackers: unknown tracker {name!r}; known: {', '.join(sorted(PACKAGES))}")
        if importlib.util.find_spec(PACKAGES[name]) is None:
            raise UserError(f"logging: the {name} tracker needs its package: pip install {PACKAGES[name]}")
    if wandb_mode(logging) == "online":
        import wandb

        try:
            has_key = wandb.login(prompt=False, verify=False)  # reads WANDB_API_KEY / netrc; no network
        except Exception as error:  # wandb's own check of the key's form
            raise UserError(f"logging.wandb: {_first_line(error)}") from None
        if not has_key:
            raise UserError("logging.wandb.mode: online needs a wandb key: run `wandb login` or set WANDB_API_KEY "
                            "(or WANDB_MODE=offline to log locally)")


def start_trackers(accelerator, logging, run_dir: Path, run_name: str, config: dict, wandb_id: str | None) -> str | None:
    """Start the configured trackers on `accelerator` unless they run already (a command's later Trainer runs log
    into the same ones). Returns the wandb run id, which a resumed run passes back to continue the same wandb run."""
    names = tracker_names(logging)
    if not names or accelerator.trackers:
        return wandb_id
    from accelerate.tracking import filter_trackers

    accelerator.project_configuration.set_directories(str(run_dir))  # tensorboard and mlflow write under run_dir
    accelerator.log_with = filter_trackers(names, accelerator.logging_dir)
    settings = logging.wandb
    wandb_kwargs = {"entity": settings.entity, "name": settings.name or run_name, "tags": settings.tags,
                    "dir": str(run_dir), "mode": wandb_mode(logging), "id": wandb_id, "resume": "allow"}
    if "wandb" in names:
        import wandb

        wandb_kwargs["settings"] = wandb.Settings(silent=True, disable_git=True)
    try:
        accelerator.init_trackers(settings.project or os.environ.get("WANDB_PROJECT") or "lctk", config=config,
                                  init_kwargs={"wandb": wandb_kwargs})
    except Exception as error:  # a tracker that cannot start (no network, bad entity) is about the settings
        raise UserError(f"logging: cannot start the trackers {', '.join(names)} ({_first_line(error)})") from None
    wandb_tracker = next((t for t in accelerator.trackers if t.name == "wandb"), None)
    return wandb_tracker.run.id if wandb_tracker is not None else None


def finish_trackers(accelerator) -> None:
    """Close the trackers without accelerator.end_training(), which would also end the process group that later
    stages of the command still use."""
    for tracker in accelerator.trackers:
        tracker.finish()
    accelerator.trackers.clear()


def log_command_results(logging, run_dir: Path, run_name: str, config: dict, results: dict) -> None:
    """The results of a command whose last Trainer run has ended (extend: evals after the stages, or with no stage at
    all) in trackers of their own, on the main process."""
    if not tracker_names(logging):
        return
    from accelerate import Accelerator

    accelerator = Accelerator()  # joins the process's accelerate state; only its trackers are new
    start_trackers(accelerator, logging, run_dir, run_name, config, None)
    log_results(accelerator, results)
    finish_trackers(accelerator)


def steps_logged(accelerator) -> int:
    """Tracker steps used by earlier Trainer runs of this command (stages), so that each run logs after them."""
    return getattr(accelerator, "_lctk_tracker_steps", 0)


def set_steps_logged(accelerator, steps: int) -> None:
    accelerator._lctk_tracker_steps = steps


def log_results(accelerator, results: dict, prefix: str = "eval") -> None:
    """Every number in `results` (nested dicts: before/after, suites, scores) as `prefix/a/b/c`, and the
    before/after figures side by side as a table where the tracker has tables (wandb)."""
    if not accelerator.trackers:
        return
    flat = dict(_numbers(results, prefix))
    if flat:
        accelerator.log(flat)
    before, after = results.get("before"), results.get("after")
    if isinstance(before, dict) and isinstance(after, dict):
        rows = [[key, value, dict(_numbers(after, "")).get(key)] for key, value in _numbers(before, "")]
        for tracker in accelerator.trackers:
            if tracker.name == "wandb" and rows:
                tracker.log_table(f"{prefix}/before_after", columns=["metric", "before", "after"], data=rows)


def _numbers(tree, prefix: str):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _numbers(value, f"{prefix}/{key}" if prefix else str(key))
    elif isinstance(tree, int | float) and not isinstance(tree, bool):
        yield prefix, tree


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
