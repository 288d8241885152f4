"""A stage's resumable state: resume (a file, or a DCP folder from any number of ranks), rolling saves
every checkpoint.every_epochs, and the non-finite stop, which saves the last good state first."""

from __future__ import annotations

from pathlib import Path

from engine import checkpoint as ckpt
from engine.config import Config
from engine.errors import UserError
from engine.profiling import phase
from engine.runtime import Runtime, restore_rng
from engine.sharding import is_sharded


class Checkpointer:
    def __init__(self, stage, optimizer, state, steps, cfg: Config, rt: Runtime, run_dir: Path):
        self.stage, self.optimizer, self.state, self.steps, self.cfg, self.rt = stage, optimizer, state, steps, cfg, rt
        self.folder = run_dir / "checkpoints"

    def resume(self, saved: dict | None) -> None:
        """Weights, optimizer, skipped count, best evaluation, step and RNG states of a resumable checkpoint."""
        if saved is None:
            return
        stage = self.stage
        if "dcp" in saved:  # a folder of shards, from any number of ranks
            ckpt.load_sharded(saved["dcp"], stage.student, stage.teacher, self.optimizer)
        elif is_sharded(stage.student):
            raise UserError(f"checkpoint of step {saved['step']} was written by a dist.strategy = 'ddp' run: "
                            f"resume it with --dist.strategy ddp")
        else:
            stage.student.load_state_dict(saved["model"])
            stage.load_state_dict(saved["stage"])
            self.optimizer.load_state_dict(saved["optimizer"])
        self.state.skipped.fill_(saved["skipped"])
        self.state.best = saved["best"]
        self.state.step = step = saved["step"]
        exact = restore_rng(saved["rng"], self.rt.rank, self.rt.world_size, reseed=self.cfg.run.seed + step)
        if self.rt.is_main:
            note = "" if exact else " (saved by another number of processes: random draws start afresh)"
            print(f"[{stage.name}] resumed at step {step}/{self.steps.total}{note}")

    def after_step(self) -> None:
        if self.steps.due(self.state.step, self.cfg.checkpoint.every_epochs):
            self.save()

    def stop_if_nonfinite(self, record: dict | None) -> None:
        """On logging steps (`record`): skipped steps left the weights untouched, so saving keeps the last good
        state."""
        policy = self.cfg.logging
        skipped = record["skipped"] if record is not None else 0
        if skipped > 0 and (policy.nonfinite == "stop" or skipped > policy.max_skips):
            self.save()
            raise UserError(f"non-finite loss or gradients in {int(skipped)} step(s) (logging.nonfinite = "
                            f"'{policy.nonfinite}', max_skips = {policy.max_skips}); the last good state was saved "
                            f"in checkpoints/: lower optim.blr or enable optim.clip_grad, then resume")

    def save(self) -> None:
        """A rolling checkpoint of this step: a DCP folder under FSDP (resumable on any number of ranks, also
        one), else one file written by the main rank."""
        stage, state, cfg, rt = self.stage, self.state, self.cfg, self.rt
        with phase("checkpoint"):
            rngs = rt.all_rng_states()  # collective: every rank's draws, for an exact resume
            meta = {"stage_name": stage.name, "step": state.step, "skipped": float(state.skipped), "best": state.best,
                    "rng": rngs, "steps_per_epoch": self.steps.per_epoch, "world_size": rt.world_size}
            epoch = state.step // self.steps.per_epoch
            if cfg.dist.strategy == "fsdp":
                ckpt.save_sharded(meta, stage.student, stage.teacher, self.optimizer, self.folder, stage.name,
                                  epoch, state.step, cfg.checkpoint.keep, rt)
                return
            whole = {**meta, "model": stage.student.state_dict(), "stage": stage.state_dict(),
                     "optimizer": self.optimizer.state_dict()}
            rt.main_only(lambda: ckpt.save_rolling(whole, self.folder, stage.name, epoch, state.step,
                                                   cfg.checkpoint.keep))
