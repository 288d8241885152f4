"""The GPU suite's JSON as a markdown table, placed between markers in bench/RESULTS.md (rerunning the
suite replaces the table; the rest of the file is left alone)."""

from __future__ import annotations

from pathlib import Path

from bench import gpu_summary

START, END = "<!-- gpu-suite:start -->", "<!-- gpu-suite:end -->"


def _f(v, fmt: str = ".1f", none: str = "–") -> str:
    return none if v is None else format(v, fmt)


def markdown(report: dict) -> str:
    smoke = " — SMOKE RUN on the CPU with tiny models: checks the script, measures no GPU" if report["smoke"] else ""
    spec = report.get("spec_peak_tflops_bf16")
    lines = [f"## GPU suite: {report['device']} ({report['date'][:10]}){smoke}", "",
             f"`python -m bench.gpu_suite` → `{report.get('json', '(not saved)')}`; torch {report['torch']}; "
             f"{report.get('wall_seconds', 0):.0f} s. Matmul peak measured here (bf16, large square matmul): "
             f"{report['matmul_peak_tflops_bf16']:.0f} TFLOP/s; data-sheet dense bf16 peak: "
             f"{_f(spec, '.0f', 'unknown for this device')} TFLOP/s. MFU is against the measured peak."]
    if report.get("running") or report.get("not_run"):
        lines += ["", f"Cut short: running `{report.get('running')}`; not run: {report.get('not_run', [])}."]
    lines += _kernel_table(report.get("kernels"))
    lines += _step_table(report)
    lines += ["", "| original-style step (bench/original_step.py) | labelled + unlabelled | ms per step | "
              "engine step speed-up |", "|---|---|---|---|"]
    for o in report.get("original_step") or []:
        lines.append(f"| {o['arch']} | {o['labelled']} + {o['unlabelled']} | {o['step_ms']:.1f} | "
                     f"{_f((report.get('speedup_over_original') or {}).get(o['arch']), '.2f')}× |")
    k = report.get("semi_step_kernels")
    if k:
        lines += ["", "| semi step, fused kernels vs torch versions | fused ms | torch ms | speed-up |",
                  "|---|---|---|---|",
                  f"| {k['arch']}, {k['fused_backend']} | {k['fused_step_ms']:.1f} | {k['torch_step_ms']:.1f} | "
                  f"{k['speedup']:.2f}× |"]
    found = gpu_summary.errors(report)
    lines += ["", f"Errors ({len(found)}):" if found else "Errors: none."] + [f"- `{e}`" for e in found]
    if report["smoke"]:
        return "\n".join(lines + ["", "Targets: not applicable to a smoke run."])
    t = report.get("targets") or gpu_summary.targets(report)
    return "\n".join(lines + ["", "Targets:"] + [f"- {line.removeprefix('target: ')}"
                                                 for line in gpu_summary.target_lines(t)])


def _kernel_table(kernels: dict | None) -> list[str]:
    if not kernels or not kernels.get("rows"):
        return []
    lines = ["", f"Fused kernels ({kernels.get('triton_status')}); device-to-device copy: "
             f"{_f(kernels.get('copy_gb_per_s'), '.0f')} GB/s.", "",
             "| op | implementation | shape | dtype | µs | GB/s | of copy | target | max abs diff |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in kernels["rows"]:
        verdict = "met" if r["meets_target"] else "MISSED"
        target = "–" if r["target"] is None else f"{100 * r['target']:.0f} % ({verdict})"
        diff = r.get("max_abs_diff", r.get("prob_max_abs_diff", r.get("grad_max_abs_diff")))
        lines.append(f"| {r['op']} | {r['impl']} | {r['shape']} | {r['dtype']} | {r['us']:.1f} | {r['gb_per_s']:.0f} | "
                     f"{100 * r['copy_ratio']:.0f} % | {target} | {_f(diff, '.2e')} |")
    return lines


def _step_table(report: dict) -> list[str]:
    lines = ["", f"| step ({report['step_precision']}) | labelled + unlabelled | ms per step | img/s | MFU | "
             "peak GiB | "
             "dry-run estimate GiB | estimate / peak |", "|---|---|---|---|---|---|---|---|"]

    def row(label, s):
        lines.append(f"| {label} | {s['labelled']} + {s['unlabelled']} | {s['step_ms']:.1f} | {s['img_per_s']:.0f} | "
                     f"{100 * s['mfu']:.1f} % | {_f(s['peak_gib'], '.2f')} | {s['estimate_gib']:.2f} | "
                     f"{_f(s['estimate_over_peak'], '.2f')} |")

    for s in report.get("semi_step") or []:
        row(f"{s['arch']}, engine step", s)
    for s in report.get("compile_step") or []:
        mode = "eager" if not s.get("compile_step") else "run.compile = step" + \
            (" + CUDA graphs" if s.get("cuda_graphs") else "")
        row(f"{s['arch']}, engine step, {mode} (first step {s['first_step_s']:.1f} s)", s)
    if report.get("compile"):
        row(f"{report['compile']['arch']}, engine step, torch.compile", report["compile"])
    for r in report.get("largest_batch") or []:
        if r["step"]:
            what = "with" if r["checkpointing"] else "without"
            note = " (search cap)" if r["capped"] else " (time budget ran out)" if r["out_of_time"] else ""
            row(f"{r['step']['arch']}, largest batch {what} activation checkpointing{note}", r["step"])
    return lines


def update_results_md(path: Path, report: dict) -> None:
    block = f"{START}\n{markdown(report)}\n{END}"
    text = path.read_text() if path.is_file() else ""
    if START in text and END in text:
        text = text[: text.index(START)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + block + "\n"
    path.write_text(text)
