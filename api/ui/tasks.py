"""The tasks the new-job form offers, each with its default budget in words (core.tasks)."""

from __future__ import annotations

from dataclasses import dataclass

from core.tasks.kinds import Task
from core.tasks.registry import HANDLERS


@dataclass(frozen=True)
class TaskChoice:
    task: Task
    default_budget: str


def task_choices() -> list[TaskChoice]:
    """Every task but auto, with the budget an empty budget field stands for (measured against labels)."""
    return [TaskChoice(task, handler(None).metric(True).describe_budget(handler.default_budget))
            for task, handler in HANDLERS.items()]
