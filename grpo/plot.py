"""Curves of one or more runs from their metrics.jsonl, one panel per quantity, runs overlaid by name.

    python -m grpo.plot runs/a runs/b [...] -o curves.png

GRPO runs: reward, each reward function, accuracy (train rollouts and eval/accuracy when evaluated),
KL, completion length, clip ratio and step time. SFT runs (no reward): loss and tokens/s. A panel is
drawn when at least one run has its quantity; a run is named by its directory (`name=DIR` names it).
"""

from __future__ import annotations

import argparse
import json
import math
import os

COLUMNS = 3  # panels per row
PANEL_SIZE = (4.5, 3.0)  # inches per panel
DPI = 100

# GRPO panels: title -> metrics key (each reward function and the accuracy panel are added per run).
GRPO_PANELS = {
    "reward (train rollouts)": "reward",
    "KL to reference (k3)": "kl",
    "completion length (mean tokens)": "completion_length/mean",
    "clip ratio": "clip_ratio",
    "step time (s)": "step_time",
}
SFT_PANELS = {"SFT loss (per token)": "loss", "SFT tokens/s": "tokens_per_sec"}


def read_run(path: str) -> list[dict]:
    """The records of a run directory (or of a metrics.jsonl path)."""
    file = os.path.join(path, "metrics.jsonl") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{path}: no metrics.jsonl (expected a run's output_dir or a metrics.jsonl file)")
    with open(file) as f:
        return [json.loads(line) for line in f if line.strip()]


def reward_names(records: list[dict]) -> list[str]:
    """The reward functions of a GRPO run, in logged order (`rewards/<name>/mean`)."""
    names = {}
    for record in records:
        names.update((key.split("/")[1], None) for key in record if key.startswith("rewards/") and key.endswith("/mean"))
    return list(names)


def panels_of(records: list[dict]) -> dict[str, list[tuple[str, str]]]:
    """title -> [(metrics key, line label suffix)] for the panels this run has data for."""
    if not any("reward" in record for record in records):
        chosen = {title: [(key, "")] for title, key in SFT_PANELS.items()}
    else:
        names = reward_names(records)
        # The trainer logs the rollouts' accuracy as "accuracy" (its accuracy rule); older runs: by name.
        accuracy = next((name for name in names if "accuracy" in name), None)
        train = "accuracy" if any("accuracy" in record for record in records) else (
            f"rewards/{accuracy}/mean" if accuracy else None)
        chosen = {"reward (train rollouts)": [("reward", "")]}
        chosen.update({f"reward: {name}": [(f"rewards/{name}/mean", "")] for name in names})
        chosen["accuracy"] = ([(train, " train")] if train else []) + [("eval/accuracy", " eval")]
        chosen.update({title: [(key, "")] for title, key in GRPO_PANELS.items() if title not in chosen})
    return {title: lines for title, lines in chosen.items() if any(_series(records, key)[0] for key, _ in lines)}


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def plot_runs(runs: list[str], output: str, names: list[str] | None = None):
    """Draw the runs' curves into `output` (a PNG); returns the matplotlib figure.

    `names`: one label per run (default: each directory's name)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("grpo.plot needs matplotlib: pip install 'pathgrpo[demo]' (or pip install matplotlib)") from error
    names = names or [os.path.basename(os.path.normpath(run)) for run in runs]
    if len(set(names)) < len(names):  # runs/a/grpo and runs/b/grpo: their paths tell them apart
        names = list(runs)
    data = [(name, read_run(run)) for name, run in zip(names, runs)]
    layout: dict[str, list] = {}  # title -> [(run name, records, key, suffix)], in first-seen order
    for name, records in data:
        for title, lines in panels_of(records).items():
            layout.setdefault(title, []).extend((name, records, key, suffix) for key, suffix in lines)
    if not layout:
        raise ValueError(f"no metrics to plot in {', '.join(runs)}")
    rows = math.ceil(len(layout) / COLUMNS)
    fig, axes = plt.subplots(rows, COLUMNS, figsize=(PANEL_SIZE[0] * COLUMNS, PANEL_SIZE[1] * rows), squeeze=False)
    colours = {name: f"C{k}" for k, (name, _) in enumerate(data)}
    for ax, (title, lines) in zip(axes.flat, layout.items()):
        for name, records, key, suffix in lines:
            steps, values = _series(records, key)
            if steps:
                sparse = key.startswith("eval/")  # evaluated every eval_steps: markers show the points
                ax.plot(steps, values, color=colours[name], label=name + suffix, marker="o" if sparse or len(steps) == 1 else None,
                        linestyle="--" if sparse else "-", markersize=3)
        ax.set_title(title)
        ax.set_xlabel("step")
        if len(data) > 1 or any(suffix for *_, suffix in lines):
            ax.legend(fontsize="small")
    for ax in list(axes.flat)[len(layout):]:
        ax.set_visible(False)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    fig.savefig(output, dpi=DPI)
    plt.close(fig)
    return fig


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(prog="python -m grpo.plot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="a run's output_dir (or NAME=DIR to name it)")
    parser.add_argument("-o", "--output", default="curves.png", help="the PNG to write (default: curves.png)")
    args = parser.parse_args(argv)
    names = [run.partition("=")[0] if "=" in run else os.path.basename(os.path.normpath(run)) for run in args.runs]
    runs = [run.partition("=")[2] if "=" in run else run for run in args.runs]
    plot_runs(runs, args.output, names)
    print(f"curves: {args.output}")
    return args.output


if __name__ == "__main__":
    main()
