"""A stage's evaluations: every eval.every_epochs and at the end, each logged; the best one (by `score`, else
the teacher's top-1, else the student's: the teacher is what Semi-ViT deploys) keeps its weights in
checkpoints/<stage>-best.pt."""

from __future__ import annotations

from pathlib import Path

from engine import checkpoint as ckpt
from engine.config import Config
from engine.metrics import MetricLogger
from engine.profiling import phase
from engine.runtime import Runtime
from engine.sharding import full_state_dict, is_sharded


class Evaluator:
    def __init__(self, stage, state, steps, cfg: Config, rt: Runtime, run_dir: Path, logger: MetricLogger):
        self.stage, self.state, self.steps, self.cfg, self.rt, self.logger = stage, state, steps, cfg, rt, logger
        self.path = run_dir / "checkpoints" / f"{stage.name}-best.pt"
        self.last: dict = {}

    def after_step(self) -> None:
        if self.steps.due(self.state.step, self.cfg.eval.every_epochs):
            self.evaluate()
            self.stage.forward_model.train()

    def final(self) -> dict:
        """The last evaluation, or one now when this run trained no step (resumed at its end)."""
        return self.last or self.evaluate()

    def evaluate(self) -> dict:
        step, best = self.state.step, self.state.best
        with phase("eval"):
            metrics = self.stage.evaluate(self.rt)
        self.logger.write(step, step / self.steps.per_epoch, metrics, prefix="eval")
        score = metrics.get("score", metrics.get("teacher_top1", metrics.get("top1")))
        if score > best["score"]:
            best.update({**metrics, "score": score, "step": step})
            kept = {"stage_name": self.stage.name, **self.weights(), "metrics": metrics}
            self.rt.main_only(lambda: ckpt.atomic_save(kept, self.path))
        self.last = metrics
        return metrics

    def weights(self) -> dict:
        """The weights a best checkpoint keeps, unsharded (a collective under FSDP2)."""
        stage = self.stage
        if not is_sharded(stage.student):
            return {"model": stage.student.state_dict(), "stage": stage.state_dict()}
        teacher = {"ema": full_state_dict(stage.teacher)} if stage.teacher is not None else {}
        return {"model": full_state_dict(stage.student), "stage": teacher}
