"""What a RULER run leaves behind: depth x length heatmaps, the length x score plot, the table, results.json's
per-server record, and the prompts as RULER / lm-eval jsonl."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..endpoint import Endpoint
from .prompts import split_answer_prefix
from .runner import Plan
from .scoring import Result, by_length
from .tasks import TASKS

Named = list[tuple[str, dict[str, dict[int, float]]]]  # (server name, by_length) per server


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_heatmaps(acc: dict[str, dict[int, dict[Any, float]]], out_dir: Path, title: str) -> list[Path]:
    """One depth x length heatmap per NIAH task, heatmap_<task>.png."""
    plt = _pyplot()
    paths = []
    for name, ls in acc.items():
        if TASKS[name].niah is None:
            continue
        lengths = sorted(ls)
        depths = sorted({d for ds in ls.values() for d in ds})
        grid = [[ls[L].get(d, float("nan")) for L in lengths] for d in depths]
        fig, ax = plt.subplots(figsize=(1.2 * len(lengths) + 3, 0.5 * len(depths) + 2))
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), [str(L) for L in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_xlabel("context length L (tokens, prompt + answer budget)")
        ax.set_ylabel("depth of the asked needle")
        ax.set_title(f"{name} - {title}")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8)
        fig.colorbar(im, ax=ax, label=TASKS[name].metric)
        fig.tight_layout()
        paths.append(out_dir / f"heatmap_{name}.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths


def plot_lines(named: Named, out_dir: Path) -> Path:
    """Length x score, one panel per task, one line per server: accuracy_by_length.png."""
    plt = _pyplot()
    tasks = list(named[0][1])
    cols = min(4, len(tasks))
    rows = math.ceil(len(tasks) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, name in zip(axes.flat, tasks, strict=False):
        for server, acc in named:
            ls = sorted(acc.get(name, {}))
            ax.plot(ls, [acc[name][L] for L in ls], marker="o", label=server)
        ax.set_xscale("log", base=2)
        ax.set_ylim(-0.05, 1.05)
        ax.set_title(name)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("score")
    for ax in list(axes.flat)[len(tasks) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    path = out_dir / "accuracy_by_length.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def format_table(named: Named) -> str:
    lines = ["", "=" * 20 + " loadtest.ruler " + "=" * 20]
    lines += [f"server {i}: {name}" for i, (name, _) in enumerate(named, 1)]
    lines.append(
        f"{'task':<18}{'metric':<19}{'length':>7}"
        + "".join(f"{'score ' + str(i):>10}" for i in range(1, len(named) + 1))
    )
    for name, ls in named[0][1].items():
        for L in sorted(ls):
            vals = [acc.get(name, {}).get(L, float("nan")) for _, acc in named]
            lines.append(f"{name:<18}{TASKS[name].metric:<19}{L:>7}" + "".join(f"{v:>10.3f}" for v in vals))
    lines.append("(mean per-trial score over all trials of the task and length; RULER prints it x 100)")
    return "\n".join(lines)


def server_record(
    ep: Endpoint, rows: list[Result], acc: dict[str, dict[int, dict[Any, float]]], failed: int
) -> dict[str, Any]:
    """One server's part of results.json: its card, RULER's per-task means, the depth cells (``acc``, from
    scoring.accuracy) and every trial."""
    return {
        "base_url": ep.base_url,
        "card": ep.card,
        "by_length": by_length(rows),
        "failed_requests": failed,
        "accuracy": {t: {str(L): {str(d): a for d, a in ds.items()} for L, ds in ls.items()} for t, ls in acc.items()},
        "trials": [asdict(r) for r in rows],
    }


def export_jsonl(plan: Plan, path: Path) -> int:
    """RULER's manifest rows (scripts/data/synthetic/*.py: input without the answer prefix, outputs, length,
    answer_prefix) plus what lm-eval's ruler tasks read (gen_prefix, joined to input by one space; max_length).
    Text prompts: the server adds its start / template tokens itself, counted in ``length``."""
    with path.open("w") as f:
        for i, t in enumerate(plan.trials):
            user, prefix = split_answer_prefix(plan.tok.decode(t.prompt_ids), t)
            f.write(
                json.dumps(
                    {
                        "index": i,
                        "task": t.task,
                        "input": user,
                        "outputs": t.refs,
                        "length": plan.reserve + len(t.prompt_ids) + t.budget,
                        "max_length": t.length,
                        "answer_prefix": prefix,
                        "gen_prefix": prefix.lstrip(" "),
                        "tokens_to_generate": t.budget,
                        "metric": TASKS[t.task].metric,
                        "depth": t.depth,
                        "seed": t.seed,
                    }
                )
                + "\n"
            )
    return len(plan.trials)
