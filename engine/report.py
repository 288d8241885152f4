"""report.md with PNG plots (accuracy, loss, mask rate over steps) and the final comparison table."""

from __future__ import annotations

import json
from pathlib import Path

from engine.profiling import format_table
from engine.stages.specs import STAGE_SPECS

PLOTS = {
    "accuracy": ("eval", ("top1", "teacher_top1"), "top-1 (%)"),
    "loss": ("train", ("loss", "loss_x", "loss_u"), "loss"),
    "mask_rate": ("train", ("mask_rate", "pl_precision", "pl_recall"), "fraction"),
}


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot(rows: list[dict], kind: str, keys: tuple[str, ...], ylabel: str, path: Path) -> bool:
    """One line per (stage, key), steps continued across stages so the run reads left to right."""
    import matplotlib  # here, not at the top: a run's start-up (and --help, --dry-run) skips its ~1 s import

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    offset, drawn = 0, False
    stages = list(dict.fromkeys(r["stage"] for r in rows))
    for stage in stages:
        stage_rows = [r for r in rows if r["stage"] == stage]
        for key in keys:
            pts = [(offset + r["step"], r[key]) for r in stage_rows if r["kind"] == kind and key in r]
            if pts:
                ax.plot(*zip(*pts), marker="." if len(pts) < 30 else None, label=f"{stage} {key}")
                drawn = True
        offset += max((r["step"] for r in stage_rows), default=0)
        ax.axvline(offset, color="grey", lw=0.5, ls=":")
    if drawn:
        ax.set_xlabel("optimizer step (stages back to back)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    plt.close(fig)
    return drawn


def comparison_table(results: dict) -> str:
    stages = results["stages"]
    rows = [("run", "student top-1", "teacher top-1")]

    def fmt(v):
        return f"{v:.2f}%" if isinstance(v, (int, float)) else "-"

    for name, s in stages.items():
        if "recon_loss" in s:
            rows.append(("MAE pre-training: masked recon. loss", f"{s['recon_loss']:.4f}", ""))
        if "top1" in s:
            rows.append((stage_label(name, stages), fmt(s.get("top1")), fmt(s.get("teacher_top1"))))
    teacher = lambda s: s.get("teacher_top1", s["top1"])  # noqa: E731 - what the run deploys
    for spec in STAGE_SPECS.values():  # in the table's order: pre-training's gain before the semi step's
        gain = spec.report.gain if spec.report is not None else None
        if gain and spec.name in stages and gain.over in stages and all(n in stages for n in gain.needs):
            rows.append((gain.title, "", f"{teacher(stages[spec.name]) - teacher(stages[gain.over]):+.2f} points"))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def stage_label(name: str, stages: dict) -> str:
    """The stage's line in the comparison table (some read differently beside another stage)."""
    spec = STAGE_SPECS.get(name)
    if spec is None or spec.report is None:
        return name
    beside = [label for other, label in spec.report.label_beside.items() if other in stages]
    return beside[0] if beside else spec.report.label


def write_report(run_dir: Path, results: dict) -> None:
    rows = read_metrics(run_dir)
    parts = [f"# Run report: {run_dir.name}", "", comparison_table(results), "",
             f"Wall time: {results.get('wall_seconds', 0):.1f} s.", ""]
    for name, (kind, keys, ylabel) in PLOTS.items():
        if plot(rows, kind, keys, ylabel, run_dir / f"{name}.png"):
            parts += [f"## {name.replace('_', ' ')}", "", f"![{name}]({name}.png)", ""]
    for name, stage in results.get("stages", {}).items():
        if "profile" in stage:
            prof = stage["profile"]
            parts += [f"## Profile: {name}", "", f"torch.profiler over {prof['steps']} steps ({prof['device']}); "
                      f"Chrome trace `{prof['trace']}` (open in chrome://tracing or ui.perfetto.dev).", "",
                      format_table(prof), ""]
    if (run_dir / "reconstruction.png").is_file():  # written by the MAE stage's last evaluation
        parts += ["## MAE reconstruction", "", "Rows: masked input, reconstruction (visible patches pasted back), "
                  "original.", "", "![reconstruction](reconstruction.png)", ""]
    (run_dir / "report.md").write_text("\n".join(parts))
