"""The GPU suite's JSON as a markdown table, placed between markers in bench/RESULTS.md (rerunning the
suite replaces the table; the rest of the file is left alone)."""

from __future__ import annotations

from pathlib import Path

START, END = "<!-- gpu-suite:start -->", "<!-- gpu-suite:end -->"


def _f(v, fmt: str = ".1f", none: str = "–") -> str:
    return none if v is None else format(v, fmt)


def markdown(report: dict) -> str:
    smoke = " — SMOKE RUN on the CPU with tiny models: checks the script, measures no GPU" if report["smoke"] else ""
    spec = report.get("spec_peak_tflops_bf16")
    lines = [f"## GPU suite: {report['device']} ({report['date'][:10]}){smoke}", "",
             f"`python -m bench.gpu_suite` → `{report.get('json', '(not saved)')}`; torch {report['torch']}; "
             f"{report['wall_seconds']:.0f} s. Matmul peak measured here (bf16, large square matmul): "
             f"{report['matmul_peak_tflops_bf16']:.0f} TFLOP/s; data-sheet dense bf16 peak: "
             f"{_f(spec, '.0f', 'unknown for this device')} TFLOP/s. MFU is against the measured peak.", "",
             f"| step ({report['step_precision']}) | labelled + unlabelled | ms per step | img/s | MFU | peak GiB | "
             "dry-run estimate GiB | estimate / peak |", "|---|---|---|---|---|---|---|---|"]

    def row(label, s):
        lines.append(f"| {label} | {s['labelled']} + {s['unlabelled']} | {s['step_ms']:.1f} | {s['img_per_s']:.0f} | "
                     f"{100 * s['mfu']:.1f} % | {_f(s['peak_gib'], '.2f')} | {s['estimate_gib']:.2f} | "
                     f"{_f(s['estimate_over_peak'], '.2f')} |")

    for s in report["semi_step"] or []:
        row(f"{s['arch']}, engine step", s)
    if report["compile"]:
        row(f"{report['compile']['arch']}, engine step, torch.compile", report["compile"])
    for r in report["largest_batch"] or []:
        if r["step"]:
            what = "with" if r["checkpointing"] else "without"
            note = " (search cap)" if r["capped"] else " (time budget ran out)" if r["out_of_time"] else ""
            row(f"{r['step']['arch']}, largest batch {what} activation checkpointing{note}", r["step"])
    lines += ["", "| original-style step (bench/original_step.py) | labelled + unlabelled | ms per step | "
              "engine step speed-up |", "|---|---|---|---|"]
    for o in report["original_step"] or []:
        lines.append(f"| {o['arch']} | {o['labelled']} + {o['unlabelled']} | {o['step_ms']:.1f} | "
                     f"{_f(report['speedup_over_original'].get(o['arch']), '.2f')}× |")
    for name, error in report.get("errors", {}).items():
        lines += ["", f"`{name}` failed: {error}"]
    t = report["targets"]
    if report["smoke"]:
        return "\n".join(lines + ["", "Targets: not applicable to a smoke run."])
    met = {True: "met", False: "not met", None: "not measured"}
    lines += ["", f"Targets: ViT-H/14 MFU ≥ 45 %: {_f(t['h14_mfu'] and 100 * t['h14_mfu'])} % "
              f"({met[t['h14_mfu_ge_45pct']]}); ≥ 1.5× the original-style step: "
              f"{_f(t['h14_speedup_over_original'], '.2f')}× "
              f"({met[t['speedup_ge_1_5x']]}); dry-run memory within 15 % of the peak: "
              f"{met[t['memory_estimate_within_15pct']]}."]
    return "\n".join(lines)


def update_results_md(path: Path, report: dict) -> None:
    block = f"{START}\n{markdown(report)}\n{END}"
    text = path.read_text() if path.is_file() else ""
    if START in text and END in text:
        text = text[: text.index(START)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + block + "\n"
    path.write_text(text)
