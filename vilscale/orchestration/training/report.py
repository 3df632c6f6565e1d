"""PNG plots of a run's metrics.jsonl (loss, learning rate, throughput, data wait, the evaluations: top-1, or box
and mask AP)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

PLOTS = (
    ("loss", "training loss", "loss.png"),
    ("lr", "learning rate", "learning_rate.png"),
    ("images_per_second", "images/s (all ranks)", "throughput.png"),
    ("data_wait_s", "data wait per step (s)", "data_wait.png"),
    ("val_top1", "val top-1", "eval_accuracy.png"),
    ("box_AP", "val box AP", "eval_box_ap.png"),
    ("mask_AP", "val mask AP", "eval_mask_ap.png"),
)


def read_records(path: Path) -> list[dict]:
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            print(f"vilscale report: skipping unreadable line {number} of {path}", file=sys.stderr)
    return records


def write_report(run_dir: Path, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_records(run_dir / "metrics.jsonl")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for key, label, filename in PLOTS:
        points = [(r["step"], r[key]) for r in records if key in r and r[key] is not None and r[key] == r[key]]
        if not points:
            continue
        figure, axes = plt.subplots(figsize=(6, 3.5), dpi=100)
        steps, values = zip(*points, strict=True)
        axes.plot(steps, values, marker="o" if len(points) < 30 else None)
        axes.set_xlabel("step")
        axes.set_ylabel(label)
        axes.set_title(f"{run_dir.name}: {label}")
        axes.grid(alpha=0.3)
        figure.tight_layout()
        figure.savefig(out / filename)
        plt.close(figure)
        written.append(out / filename)
    return written
