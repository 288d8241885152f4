"""What a stage reports about its steps, on its own cadence: the metrics log (one host sync every
logging.every_steps), the progress bar, NVTX ranges and the step profiler (--profile.steps)."""

from __future__ import annotations

import contextlib
from pathlib import Path

from tqdm import tqdm

from engine.config import Config
from engine.metrics import MetricLogger, input_hint
from engine.profiling import SWITCHES, StepProfiler
from engine.runtime import Runtime


class Progress:
    def __init__(self, stage, state, steps, cfg: Config, rt: Runtime, run_dir: Path):
        self.stage, self.state, self.steps, self.cfg, self.rt, self.run_dir = stage, state, steps, cfg, rt, run_dir
        self.logger = MetricLogger(run_dir, rt, cfg.logging, stage.name, input_hint(cfg.data))
        self.profiler: StepProfiler | None = None
        self.bar = None

    @contextlib.contextmanager
    def running(self):
        """From the first step to be trained (after a resume) to the last: profiler, NVTX and the bar."""
        cfg, rt, name = self.cfg, self.rt, self.stage.name
        if cfg.profile.steps and rt.is_main:
            self.profiler = StepProfiler(cfg.profile.steps, cfg.profile.wait, cfg.profile.warmup, self.run_dir, name,
                                         rt.device)
        SWITCHES.nvtx = cfg.profile.nvtx
        self.logger.start(self.state.step)
        try:
            self.stage.forward_model.train()
            self.bar = tqdm(total=self.steps.total, initial=self.state.step, desc=name,
                            disable=not (rt.is_main and cfg.logging.progress), dynamic_ncols=True, leave=False)
            yield self
            self.bar.close()
        finally:
            SWITCHES.nvtx = False
            if self.profiler is not None:
                self.profiler.close()

    def after_step(self, lr: float) -> dict | None:
        """The logged record on logging steps (the only host sync of the loop), else None."""
        if self.profiler is not None:
            self.profiler.step()
        self.bar.update(1)
        step = self.state.step
        if not (step % self.cfg.logging.every_steps == 0 or step == self.steps.total):
            return None
        record = self.logger.flush(step, step / self.steps.per_epoch, {"lr": lr, "skipped": float(self.state.skipped)},
                                   derive=self.stage.derive)
        self.bar.set_postfix(loss=f"{record.get('loss', float('nan')):.3f}", img_s=f"{record['img_per_s']:.0f}",
                             data_wait=f"{record['data_wait_ms']:.1f}ms")
        return record

    def profile(self) -> dict:
        """{"profile": the per-phase table} once the profiler's window closed, else nothing."""
        if self.profiler is not None and self.profiler.table is not None:
            return {"profile": self.profiler.table}
        return {}

    def close(self) -> None:
        self.logger.close()
