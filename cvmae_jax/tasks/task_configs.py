"""The task configs shipped in ``configs/tasks/`` and how a ``--task`` value names one."""

from __future__ import annotations

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parents[2] / "configs" / "tasks"


def shipped_tasks() -> list[str]:
    """Names of the ACES task configs in ``configs/tasks/`` (sorted)."""
    return sorted(p.stem for p in TASKS_DIR.glob("*.yaml"))


def task_config(task: str) -> tuple[str, Path]:
    """(task name, config path) for ``--task``: a shipped task's name, or the path of a user's
    ACES config (``.yaml``; its file name, less the suffix, names the task). Raises
    FileNotFoundError naming the shipped tasks when neither exists."""
    path = Path(task)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise FileNotFoundError(f"--task={task}: no such ACES task config file")
        return path.stem, path
    if "/" in task or not (TASKS_DIR / f"{task}.yaml").is_file():
        raise FileNotFoundError(f"--task={task}: not a shipped task (configs/tasks/ has "
                                f"{', '.join(shipped_tasks()) or 'none'}) nor an ACES config "
                                "file (.yaml)")
    return task, TASKS_DIR / f"{task}.yaml"
