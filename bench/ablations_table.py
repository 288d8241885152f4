"""What the ablation sweep reports: one record per finished run (read from its run folder), the table of
teacher top-1 mean ± std over seeds with the collapse count, the scaling table, the plot and the section
of bench/RESULTS.md it replaces."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

COLLAPSE_POINTS = 5.0  # a teacher that ends this far below its own peak has collapsed
BEGIN, END = "<!-- ablations:begin -->", "<!-- ablations:end -->"


def teacher_history(run_dir: Path, stage: str) -> list[tuple[int, float]]:
    """(step, teacher top-1) of every evaluation of `stage` in metrics.jsonl, by step; a step evaluated twice
    (a resumed run repeats the evaluations after its last checkpoint) keeps its last value."""
    by_step: dict[int, float] = {}
    path = run_dir / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.is_file() else []:
        row = json.loads(line)
        if row.get("kind") == "eval" and row.get("stage") == stage:
            value = row.get("teacher_top1", row.get("top1"))
            if value is not None:
                by_step[int(row["step"])] = float(value)
    return sorted(by_step.items())


def run_record(run_dir: Path, about: dict, stage: str) -> dict:
    """A finished run's raw numbers: `about` (variant, budget, seed, ...) plus its scored stage's final and
    peak teacher top-1 (the student's where no teacher was kept), the history, collapse and wall time."""
    results = json.loads((run_dir / "results.json").read_text())
    final = results["stages"][stage]
    teacher = final.get("teacher_top1", final.get("top1"))
    history = teacher_history(run_dir, stage)
    peak = max([teacher, *(v for _, v in history)])
    return {**about, "scored_stage": stage, "teacher_top1": teacher, "student_top1": final.get("top1"),
            "peak_teacher_top1": peak, "collapsed": peak - teacher > COLLAPSE_POINTS,
            "wall_seconds": results.get("wall_seconds"), "teacher_history": [[s, v] for s, v in history],
            "stage_results": results["stages"]}


def mean_std(values: list[float]) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def cell(records: list[dict]) -> str:
    text = mean_std([r["teacher_top1"] for r in records])
    collapsed = sum(r["collapsed"] for r in records)
    return f"{text} ({collapsed} collapsed)" if collapsed else text


def grid_table(records: list[dict], rows: list[str], columns: list, column_key: str, heading: str) -> str:
    """Variants down, `columns` (values of record[column_key]) across; the last column counts collapses."""
    head = f"| variant | {' | '.join(f'{heading} {c}'.strip() for c in columns)} | collapsed |"
    lines = [head, "|---" * (len(columns) + 2) + "|"]
    for variant in rows:
        mine = [r for r in records if r["variant"] == variant]
        cells = [cell([r for r in mine if r[column_key] == c]) for c in columns]
        lines.append(f"| {variant} | {' | '.join(cells)} | {sum(r['collapsed'] for r in mine)} of {len(mine)} |")
    return "\n".join(lines)


def budget_table(records: list[dict], variants: list[str], budgets: list[int]) -> str:
    return grid_table(records, variants, budgets, "budget", "labels/class")


def scaling_table(records: list[dict], variants: list[str], models: list[str]) -> str:
    return grid_table(records, variants, models, "arch", "")


def plot(records: list[dict], variants: list[str], budgets: list[int], path: Path) -> Path:
    """Teacher top-1 against labels per class, a line per variant, error bars = std over seeds: a PNG with
    matplotlib, else a hand-written SVG (`path`'s suffix is replaced)."""
    lines = {}
    for variant in variants:
        points = []
        for b in budgets:
            values = [r["teacher_top1"] for r in records if r["variant"] == variant and r["budget"] == b]
            if values:
                std = statistics.stdev(values) if len(values) > 1 else 0.0
                points.append((b, statistics.mean(values), std))
        lines[variant] = points
    try:
        import matplotlib  # lazy: optional, and only the plot needs it
    except ImportError:
        return write_svg(lines, budgets, path.with_suffix(".svg"))
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: after choosing the Agg backend

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for i, (variant, points) in enumerate(lines.items()):
        shift = 1 + 0.015 * (i - (len(lines) - 1) / 2)  # side by side on the log axis, so the bars do not hide
        ax.errorbar([b * shift for b, _, _ in points], [m for _, m, _ in points], yerr=[s for _, _, s in points],
                    marker="o", capsize=3, label=variant)
    ax.set_xscale("log")
    ax.set_xticks(budgets, [str(b) for b in budgets])
    ax.minorticks_off()
    ax.set_xlabel("labels per class")
    ax.set_ylabel("teacher top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def write_svg(lines: dict, budgets: list[int], path: Path) -> Path:
    """The same plot without matplotlib: linear axes, one polyline with error bars per variant."""
    width, height, pad = 640, 420, 60
    values = [m + s for pts in lines.values() for _, m, s in pts] + [m - s for pts in lines.values() for _, m, s in pts]
    lo, hi = (min(values), max(values)) if values else (0.0, 100.0)
    lo, hi = lo - 1, hi + 1
    bmin, bmax = min(budgets), max(budgets)

    def x(b):
        return pad + (width - 2 * pad) * ((b - bmin) / (bmax - bmin) if bmax > bmin else 0.5)

    def y(v):
        return height - pad - (height - 2 * pad) * (v - lo) / (hi - lo)

    colours = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-size="12">',
             f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="black"/>',
             f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="black"/>',
             f'<text x="{width / 2}" y="{height - 15}" text-anchor="middle">labels per class</text>',
             f'<text x="15" y="{height / 2}" transform="rotate(-90 15 {height / 2})" text-anchor="middle">'
             f'teacher top-1 (%)</text>',
             f'<text x="{pad - 5}" y="{y(lo) + 4:.1f}" text-anchor="end">{lo:.0f}</text>',
             f'<text x="{pad - 5}" y="{y(hi) + 4:.1f}" text-anchor="end">{hi:.0f}</text>']
    parts += [f'<text x="{x(b):.1f}" y="{height - pad + 16}" text-anchor="middle">{b}</text>' for b in budgets]
    for i, (variant, points) in enumerate(lines.items()):
        colour = colours[i % len(colours)]
        path_points = " ".join(f"{x(b):.1f},{y(m):.1f}" for b, m, _ in points)
        parts.append(f'<polyline points="{path_points}" fill="none" stroke="{colour}"/>')
        for b, m, s in points:
            parts.append(f'<line x1="{x(b):.1f}" y1="{y(m - s):.1f}" x2="{x(b):.1f}" y2="{y(m + s):.1f}" '
                         f'stroke="{colour}"/>')
            parts.append(f'<circle cx="{x(b):.1f}" cy="{y(m):.1f}" r="3" fill="{colour}"/>')
        parts.append(f'<text x="{width - pad + 4}" y="{pad + 14 * i}" fill="{colour}">{variant}</text>')
    parts.append("</svg>")
    path.write_text("\n".join(parts) + "\n")
    return path


def replace_section(md_path: Path, body: str) -> None:
    """Put `body` between the ablation markers of `md_path`, replacing what a previous sweep wrote there, or
    append it (with the markers) when the file has none."""
    text = md_path.read_text() if md_path.is_file() else ""
    section = f"{BEGIN}\n{body.strip()}\n{END}"
    if BEGIN in text and END in text.split(BEGIN, 1)[1]:
        before, rest = text.split(BEGIN, 1)
        after = rest.split(END, 1)[1]
        text = before + section + after
    else:
        text = (text.rstrip() + "\n\n" if text.strip() else "") + section + "\n"
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(text)
