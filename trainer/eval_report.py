"""Evaluation reports of a pipeline: one row per task (evaluated by the model serving it), as a text table, a
JSON table and a heat-map image (tasks x metrics).

Columns (MSE in the model's normalised action units: z-scores of the training episodes' actions):

    mse              the model's action MSE over the chunk and the 23 real dims
    mean_action_mse  the mean-action baseline's: always predicting the training mean (the number to beat; about 1
                     on training data, often more on held-out episodes)
    mse_ratio        mse / mean_action_mse (< 1: the model beats the mean action)
    robot_base, torso, arms, grippers   the model's MSE per action group (robot_base: the 3 base velocity dims)
    stage_acc        the stage head's accuracy; majority_acc: always guessing the task's most frequent stage
    <reference>_mse  e.g. pretrain_mse: the reference model's MSE on the same task
"""

from __future__ import annotations

from typing import Any

METRICS: list[tuple[str, str]] = [  # (column title, how to read it from a task row)
    ("mse", "action_mse"),
    ("mean_action_mse", "baseline.action_mse"),
    ("mse_ratio", "ratio"),
    ("robot_base", "action_mse_per_group.base"),
    ("torso", "action_mse_per_group.torso"),
    ("arms", "action_mse_per_group.arms"),
    ("grippers", "action_mse_per_group.grippers"),
    ("stage_acc", "stage_acc"),
    ("majority_acc", "baseline.stage_acc"),
]
ACCURACY_COLUMNS = {"stage_acc", "majority_acc"}  # higher is better; every other coloured column is an MSE
RATIO_COLUMNS = {"mse_ratio"}  # shown, not coloured (neither an MSE nor an accuracy)
LEGEND = ("mse, robot_base..grippers: the model's action MSE (normalised units); mean_action_mse: always predicting "
          "the training mean action; mse_ratio = mse / mean_action_mse (< 1 beats it); majority_acc: always the "
          "task's most frequent stage; pretrain_mse: the pretrained model on the same task")
_ROW_KEYS = {"task", "model", "num_samples"}


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


def columns(rows: list[dict[str, Any]]) -> list[str]:
    """The metric columns of task_rows() output: METRICS, then reference columns such as pretrain_mse."""
    titles = [t for t, _ in METRICS]
    extra = [k for k in rows[0] if k not in _ROW_KEYS and k not in titles] if rows else []
    return titles + extra


def format_table(rows: list[dict[str, Any]]) -> str:
    """Fixed-width text table of task_rows() output."""
    cols = ["task", "model"] + columns(rows) if rows else []
    widths = {c: max(len(c), 8) for c in cols}
    lines = ["  ".join(c.rjust(widths[c]) for c in cols)]
    for row in rows:
        cells = []
        for c in cols:
            v = row.get(c, "")
            cells.append((f"{v:.4f}" if isinstance(v, float) else str(v)).rjust(widths[c]))
        lines.append("  ".join(cells))
    return "\n".join(lines)


def heatmap_figure(rows: list[dict[str, Any]], *, title: str):
    """A matplotlib Figure: tasks x metrics, every cell showing its value. Darker = better in every column: the
    MSE columns share one log colour scale (lower MSE = darker) and the accuracies one [0, 1] scale (higher =
    darker), each with its colour bar; mse_ratio is left uncoloured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import LogNorm, Normalize
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    cols = columns(rows)
    values = np.array([[float(r.get(c, np.nan)) for c in cols] for r in rows])
    is_acc = np.array([c in ACCURACY_COLUMNS for c in cols])
    is_mse = ~is_acc & np.array([c not in RATIO_COLUMNS for c in cols])
    mse = values[:, is_mse]
    lo, hi = float(np.nanmin(mse)), float(np.nanmax(mse))
    lo = max(lo, 1e-6)
    mse_norm = LogNorm(vmin=lo, vmax=max(hi, lo * 1.01))
    fig, ax = plt.subplots(figsize=(1.05 * len(cols) + 4.5, 0.45 * len(rows) + 2.4))
    ax.imshow(np.full(values.shape, 0.93), cmap="gray", vmin=0, vmax=1, aspect="auto")  # uncoloured cells
    mse_img = ax.imshow(np.ma.masked_where(~is_mse[None, :] | ~(values > 0), values), cmap="viridis",
                        norm=mse_norm, aspect="auto")
    acc_img = ax.imshow(np.ma.masked_where(np.broadcast_to(~is_acc, values.shape), values), cmap="viridis_r",
                        norm=Normalize(0.0, 1.0), aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), [f"task {r['task']} ({r['model']})" for r in rows])
    for i in range(len(rows)):
        for j in range(len(cols)):
            if is_mse[j]:
                shade = float(mse_norm(values[i, j])) if values[i, j] > 0 else 1.0
            elif is_acc[j]:
                shade = 1.0 - values[i, j]
            else:
                shade = 1.0
            ax.text(j, i, f"{values[i, j]:.3g}", ha="center", va="center", fontsize=7,
                    color="white" if shade < 0.55 else "black")
    # The later colour bar sits next to the cells: the MSE one, which most columns use.
    fig.colorbar(acc_img, ax=ax, fraction=0.035, pad=0.06).set_label(
        "stage accuracy\nhigher = darker = better", fontsize=8)
    bar = fig.colorbar(mse_img, ax=ax, fraction=0.035, pad=0.02)
    bar.set_label("action MSE (log scale)\nlower = darker = better", fontsize=8)
    bar.ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 3.0, 5.0)))
    bar.ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    bar.ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_title(title, fontsize=9)
    fig.text(0.01, 0.01, LEGEND, fontsize=6.5, wrap=True, va="bottom")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig


def heatmap_png(rows: list[dict[str, Any]], path: str, *, title: str) -> str:
    """Write heatmap_figure() to `path` (PNG); darker = better in every column, colour bars for both scales."""
    import matplotlib.pyplot as plt

    fig = heatmap_figure(rows, title=title)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
