"""A whole run: every stage of the plan in order, then results.json, the report and the exported teacher."""

from __future__ import annotations

import json
import time
from pathlib import Path

from engine import checkpoint as ckpt
from engine import run_folder
from engine.config import RunPlan
from engine.header import run_header
from engine.preflight import preflight
from engine.report import comparison_table, write_report
from engine.runtime import setup_runtime
from engine.stages.compiled import check_cuda_graphs
from engine.stages.runner import finished_stage
from engine.stages.specs import STAGE_SPECS


def run_plan(plan: RunPlan, run_dir: Path) -> dict:
    t0 = time.perf_counter()
    # Every rank decides on the folder as it is now: nothing in it changes before they have all joined below.
    arrival = run_folder.arrive(plan, run_dir)
    plan = arrival.plan
    preflight(plan, run_dir)
    ckpt.check_writable(run_dir)  # every rank, before the process group: an unusable --out costs nothing
    rt = setup_runtime(plan.base.run, plan.base.dist)
    try:
        for cfg in plan.stages.values():  # needs the device: after the runtime, before the folder changes
            check_cuda_graphs(cfg, rt)
        if rt.is_main:
            if arrival.replace:
                run_folder.remove_run(run_dir)
            (run_dir / "config.toml").write_text(plan.to_toml())
            print(run_header(plan.base, rt))
            print(f"run folder: {run_dir}")
            if arrival.note:
                print(arrival.note)
        rt.barrier()
        results: dict = {"stages": {}}
        carry = None
        for name, cfg in plan.stages.items():
            spec = STAGE_SPECS[name]
            summary, carry = (finished_stage(spec, cfg, rt, run_dir, carry)
                              or spec.run(spec, cfg, rt, run_dir, carry))
            results["stages"][name] = summary
            if rt.is_main:
                scores = [f"{k} {summary[k]:.4g}" for k in ("top1", "teacher_top1", "recon_loss") if k in summary]
                if scores:  # pseudo_label printed its own line
                    print(f"[{name}] " + ", ".join(scores))
        results["wall_seconds"] = round(time.perf_counter() - t0, 2)
        if rt.is_main:
            export(plan, carry, run_dir)
            (run_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
            write_report(run_dir, results)
            print(comparison_table(results))
            print(f"wall time {results['wall_seconds']:.1f} s; results in {run_dir}/results.json, "
                  f"report in {run_dir}/report.md")
        rt.barrier()  # the other ranks wait for the main rank's files, then all leave the process group together
        return results
    finally:
        rt.shutdown()


def export(plan: RunPlan, carry: dict | None, run_dir: Path) -> None:
    """The deployable weights: the final teacher (EMA) when there is one, else the model."""
    if not carry or not plan.base.checkpoint.export_safetensors:
        return
    weights = carry.get("ema") or carry.get("model")
    if weights:
        ckpt.export_safetensors(weights, run_dir / "model.safetensors")
