"""The verdict of a GPU check: each target met / missed / not measured, and every error of every part.

    python -m bench.gpu_summary OUT_DIR     # what bench/gpu_check.sh prints last; exit 1 on any error

Reads what bench/gpu_check.sh left in OUT_DIR: gpu-suite.json (the suite's report, nested sections
included), the exit codes in exit-codes.txt, and the logs of `python -m kernels` and of the CUDA Triton
tests. An error anywhere -- a failed section, a failed kernel part, a compile check that did not compile, a
test failure, a part killed by its time cap -- is listed; nothing is left for the reader to dig out of the
JSON. ``targets`` and ``errors`` are also what the suite's smoke test checks.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

# The GPU targets: name -> (what, threshold text)
TARGETS = {
    "h14_mfu_ge_45pct": "ViT-H/14 semi step MFU >= 45 %",
    "speedup_ge_1_5x": "ViT-H/14 semi step >= 1.5x the original-style step",
    "ema_ge_85pct_copy": "EMA update (Triton) >= 85 % of copy bandwidth",
    "pseudo_mixup_ge_80pct_copy": "pseudo mixup (Triton) >= 80 % of copy bandwidth",
    "memory_estimate_within_15pct": "dry-run memory estimate within 15 % of the measured peak",
}
ERROR_KEYS = ("error", "errors", "graph_error")
EXIT_MEANING = {124: "killed by its time cap", 137: "killed (time cap or memory)"}


def steps(report: dict, name: str) -> list[dict]:
    """The step results of a section, [] when it failed or did not run."""
    value = report.get(name)
    return [] if value is None else value if isinstance(value, list) else [value]


def _kernel_rows(report: dict, op: str) -> list[dict]:
    kernels = report.get("kernels") or {}
    return [r for r in kernels.get("rows", []) if r["op"] == op and r.get("target") is not None]


def targets(report: dict) -> dict:
    """Each target's value and verdict (True met, False missed, None not measured), from what was measured:
    ViT-H/14 at its largest batch without checkpointing when the search found one, else at the recipe batch."""
    huge = report.get("huge_arch", "vit_huge_patch14")
    fitted = [r["step"] for r in steps(report, "largest_batch") if r.get("step") and not r["checkpointing"]]
    h = (fitted or [s for s in steps(report, "semi_step") if s["arch"] == huge] or [None])[0]
    speedup = (report.get("speedup_over_original") or {}).get(huge)
    searched = [r["step"] for r in steps(report, "largest_batch") if r.get("step")]
    measured = [s for s in [*steps(report, "semi_step"), *steps(report, "compile"), *searched]
                if s.get("estimate_over_peak")]
    out = {"h14_mfu": h["mfu"] if h else None, "h14_mfu_ge_45pct": h["mfu"] >= 0.45 if h else None,
           "h14_speedup_over_original": speedup, "speedup_ge_1_5x": speedup >= 1.5 if speedup else None,
           "memory_estimate_within_15pct": all(abs(s["estimate_over_peak"] - 1) <= 0.15 for s in measured)
           if measured else None}
    for name, op, target in (("ema", "ema_update_", "ema_ge_85pct_copy"),
                             ("pseudo_mixup", "pseudo_mixup", "pseudo_mixup_ge_80pct_copy")):
        rows = [] if report.get("smoke") else _kernel_rows(report, op)  # a CPU's copy rate is no GPU's
        out[target] = all(r["meets_target"] for r in rows) if rows else None
        out[f"{name}_copy_ratio_min"] = min(r["copy_ratio"] for r in rows) if rows else None
    return out


def errors(value, path: str = "") -> list[str]:
    """Every error recorded anywhere in a report, with where: 'kernels.compile.soft_target_ce: ...'."""
    found: list[str] = []
    if isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            if key in ERROR_KEYS and item:
                if isinstance(item, dict):
                    found += [f"{where}.{k}: {_first_lines(v)}" for k, v in item.items()]
                elif isinstance(item, list):
                    found += [f"{where}: {_first_lines(v)}" for v in item]
                else:
                    found.append(f"{where}: {_first_lines(item)}")
            else:
                found += errors(item, where)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found += errors(item, f"{path}[{i}]")
    return found


def _first_lines(text, limit: int = 600) -> str:
    """A traceback's last line is what went wrong; keep it and the line that raised it."""
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    shown = " | ".join(lines[-3:]) if len(lines) > 3 else " | ".join(lines)
    return shown[:limit]


def _pytest_verdict(log: Path) -> tuple[str, list[str]]:
    if not log.is_file():
        return "not run", []
    text = log.read_text(errors="replace")
    counts = [line for line in text.splitlines() if re.search(r"\d+ (passed|failed|error)", line)]
    failures = [line for line in text.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    return (counts[-1].strip("= ") if counts else "no result line (cut short?)"), failures


def summary(out_dir: Path) -> tuple[list[str], bool]:
    """The printed verdict and whether everything ran without an error."""
    codes = _exit_codes(out_dir / "exit-codes.txt")
    lines, problems = ["== GPU check summary =="], []
    for part, code in codes.items():
        if code != 0:
            problems.append(f"{part}: exit {code} ({EXIT_MEANING.get(code, 'failed')}; see its log)")
    tests, failures = _pytest_verdict(out_dir / "pytest-cuda.log")
    lines.append(f"CUDA Triton tests: {tests}")
    problems += [f"tests: {f}" for f in failures]
    suite_file = out_dir / "gpu-suite.json"
    if not suite_file.is_file():
        problems.append("gpu suite: wrote no JSON (see gpu-suite.log)")
        report = {}
    else:
        report = json.loads(suite_file.read_text())
        lines.append(f"device: {report.get('device')}; torch {report.get('torch')}; "
                     f"suite wall {report.get('wall_seconds')} s")
        if report.get("running"):
            problems.append(f"gpu suite: cut short during section '{report['running']}'")
        for name in report.get("not_run", []):
            problems.append(f"gpu suite: section '{name}' not run (time budget spent)")
        problems += [f"gpu suite: {e}" for e in errors(report)]
    if report.get("smoke"):
        lines.append("targets: not applicable to a smoke run (CPU, tiny models: it checks the script, measures "
                     "nothing)")
    else:
        lines += target_lines(report.get("targets") or targets(report) if report else {})
    lines.append(f"errors ({len(problems)}):" if problems else "errors: none")
    lines += [f"  - {p}" for p in problems]
    return lines, not problems


def target_lines(t: dict) -> list[str]:
    verdict = {True: "met", False: "MISSED", None: "not measured"}
    value = {"h14_mfu_ge_45pct": _pct(t.get("h14_mfu")),
             "speedup_ge_1_5x": _num(t.get("h14_speedup_over_original"), "x"),
             "ema_ge_85pct_copy": _pct(t.get("ema_copy_ratio_min")),
             "pseudo_mixup_ge_80pct_copy": _pct(t.get("pseudo_mixup_copy_ratio_min")),
             "memory_estimate_within_15pct": ""}
    return [f"target: {what}: {verdict[t.get(key)]}{value[key]}" for key, what in TARGETS.items()]


def _pct(v) -> str:
    return "" if v is None else f" ({100 * v:.1f} %)"


def _num(v, unit: str) -> str:
    return "" if v is None else f" ({v:.2f}{unit})"


def _exit_codes(path: Path) -> dict[str, int]:
    if not path.is_file():
        return {}
    pairs = (line.rsplit(" ", 1) for line in path.read_text().splitlines() if line.strip())
    return {part: int(code) for part, code in pairs}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not Path(args[0]).is_dir():
        print("usage: python -m bench.gpu_summary OUT_DIR  (the folder bench/gpu_check.sh wrote)", file=sys.stderr)
        return 2
    lines, ok = summary(Path(args[0]))
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
