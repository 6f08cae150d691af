"""loadtest.ruler: RULER's long-context tasks (NVIDIA/RULER) against any OpenAI server; ``python -m loadtest.ruler``.

By concern: tasks (RULER's registry and templates), haystack (essay / noise / needle haystacks to an exact token
budget), prompts (each task's prompt in the server's tokens), qa (SQuAD / HotpotQA), scoring (RULER's metrics),
runner (build once, send, score), report (plots, table, results.json, jsonl export), cli (flags and --help).

The public surface, for scripts that want RULER numbers:
    run(base_url, Spec(tasks=..., lengths=..., trials=...), model=...) -> list[Result]
    prepare(endpoints, spec) -> Plan, then send(endpoint, plan) -> list[Result] (one build, several servers)
    TASKS: {name: Task(budget, metric, niah)}; by_length / accuracy: the means RULER reports
"""

from .cli import main
from .prompts import Builder, Trial
from .runner import DEPTHS, Plan, Spec, prepare, run, send
from .scoring import Result, accuracy, by_length, score
from .tasks import NIAH_TASKS, TASKS, NiahSpec, Task

__all__ = [
    "DEPTHS",
    "NIAH_TASKS",
    "TASKS",
    "Builder",
    "NiahSpec",
    "Plan",
    "Result",
    "Spec",
    "Task",
    "Trial",
    "accuracy",
    "by_length",
    "main",
    "prepare",
    "run",
    "score",
    "send",
]
