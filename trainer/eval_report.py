"""Evaluation reports of a pipeline: one row per task (evaluated by the model serving it), as a text table, a
JSON table and a heat-map image (tasks x metrics, each column coloured on its own scale)."""

from __future__ import annotations

from typing import Any

METRICS: list[tuple[str, str]] = [  # (column title, how to read it from a task row)
    ("mse", "action_mse"),
    ("base_mse", "baseline.action_mse"),
    ("mse/base", "ratio"),
    ("base", "action_mse_per_group.base"),
    ("torso", "action_mse_per_group.torso"),
    ("arms", "action_mse_per_group.arms"),
    ("grippers", "action_mse_per_group.grippers"),
    ("stage_acc", "stage_acc"),
    ("base_stage", "baseline.stage_acc"),
]
HIGHER_IS_BETTER = {"stage_acc", "base_stage"}


def _get(row: dict[str, Any], path: str) -> float:
    if path == "ratio":
        return row["action_mse"] / max(row["baseline"]["action_mse"], 1e-12)
    value: Any = row
    for part in path.split("."):
        value = value[part]
    return float(value)


def task_rows(results: dict[str, dict[str, Any]], serving: dict[int, str],
              reference: str | None = None) -> list[dict[str, Any]]:
    """[{task, model, <metric>: value, (pretrain_mse)}] with each task taken from the model that serves it;
    `reference` (e.g. "pretrain") adds its MSE on the same task for comparison."""
    rows = []
    for task in sorted(serving):
        model = serving[task]
        r = results[model]["tasks"][str(task)]
        row: dict[str, Any] = {"task": task, "model": model, "num_samples": r["num_samples"]}
        row.update({title: _get(r, path) for title, path in METRICS})
        if reference and reference in results and str(task) in results[reference]["tasks"]:
            row[f"{reference}_mse"] = results[reference]["tasks"][str(task)]["action_mse"]
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """Fixed-width text table of task_rows() output."""
    cols = ["task", "model"] + [t for t, _ in METRICS] + [k for k in rows[0] if k.endswith("_mse") and
                                                          k not in dict(METRICS) and k != "base_mse"] if rows else []
    widths = {c: max(len(c), 8) for c in cols}
    lines = ["  ".join(c.rjust(widths[c]) for c in cols)]
    for row in rows:
        cells = []
        for c in cols:
            v = row.get(c, "")
            cells.append((f"{v:.4f}" if isinstance(v, float) else str(v)).rjust(widths[c]))
        lines.append("  ".join(cells))
    return "\n".join(lines)


def heatmap_png(rows: list[dict[str, Any]], path: str, *, title: str) -> str:
    """Write a tasks x metrics heat-map to `path` (PNG). Colours are per column (darker = better); the cells
    show the values."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cols = [t for t, _ in METRICS] + ([k for k in rows[0] if k.endswith("_mse") and k not in dict(METRICS)
                                       and k != "base_mse"] if rows else [])
    values = np.array([[float(r.get(c, np.nan)) for c in cols] for r in rows])
    shade = np.zeros_like(values)
    for j, c in enumerate(cols):
        col = values[:, j]
        lo, hi = np.nanmin(col), np.nanmax(col)
        scaled = (col - lo) / (hi - lo) if hi > lo else np.full_like(col, 0.5)
        shade[:, j] = scaled if c in HIGHER_IS_BETTER else 1.0 - scaled
    fig, ax = plt.subplots(figsize=(1.1 * len(cols) + 2, 0.45 * len(rows) + 1.6))
    ax.imshow(shade, cmap="viridis", aspect="auto", vmin=0, vmax=1)
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), [f"task {r['task']} ({r['model']})" for r in rows])
    for i in range(len(rows)):
        for j in range(len(cols)):
            ax.text(j, i, f"{values[i, j]:.3g}", ha="center", va="center", fontsize=7,
                    color="white" if shade[i, j] < 0.6 else "black")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
