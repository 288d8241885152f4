"""What `run.compile` compiles, and the micro-step the loop calls (docs/performance.md, "Compilation").

- `off`: eager.
- `model`: `torch.compile` of the student's forward only (`compile_model`); the rest of the step stays eager.
- `step`: the whole micro-step as one graph (`MicroStep`): the stage's no-grad part (semi: teacher forward,
  pseudo labels, pseudo mixup) and its loss (student forward, both losses), traced with `fullgraph=True` so a
  graph break is an error rather than a silent slowdown; AOTAutograd compiles the backward of that graph as
  well. The optimizer step and the EMA stay outside: each is already one fused pass over all parameters
  (fused AdamW, the flat-buffer EMA kernel), so a graph would save no launches.
- `run.cuda_graphs`: the compiled step replayed as a CUDA graph (inductor's "reduce-overhead" mode): one
  launch for the thousands of small kernels of ViT-H at 2 + 10 images per GPU. Shapes are static (train
  streams drop their last partial batch, so every step has the same shapes; any other shape would get its
  own graph, compiled and recorded once).

Random draws (mixup, pseudo mixup, drop-path, MAE masks) use torch's eager random ops in every mode
(`fallback_random`), so a compiled run draws the same numbers as an eager one and checkpoints are
interchangeable between modes.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.config import Config
from engine.errors import UserError
from engine.runtime import Runtime

# eager's random ops inside compiled graphs (see the module docstring)
SAME_RANDOM = {"fallback_random": True}


def compile_model(module: nn.Module, cfg: Config) -> nn.Module:
    """The forward the loss calls under `run.compile = model`; the module itself otherwise."""
    return torch.compile(module, options=SAME_RANDOM) if cfg.run.compile == "model" else module


def check_cuda_graphs(cfg: Config, rt: Runtime) -> None:
    """`run.cuda_graphs` needs a CUDA device and one micro-batch per optimizer step."""
    if not cfg.run.cuda_graphs:
        return
    if rt.device.type != "cuda":
        raise UserError(f"run.cuda_graphs = true needs a CUDA device, but this run is on {rt.device.type}: "
                        f"set --run.cuda_graphs false (or run on a GPU)")
    if cfg.optim.accum_steps > 1:
        raise UserError(f"run.cuda_graphs = true with optim.accum_steps = {cfg.optim.accum_steps}: a replay "
                        f"overwrites the gradients the previous micro-batch left in the graph's memory; set "
                        f"--optim.accum_steps 1 (or --run.cuda_graphs false)")


class MicroStep:
    """One micro-batch: `prepare` (no grad) then `loss`, each under autocast. Eager, the two are separate
    named phases; compiled (`run.compile = step`), `prepare` passes the batch through and `loss` runs both
    as one graph."""

    def __init__(self, stage, cfg: Config, rt: Runtime, compiler: str = "inductor"):
        self.stage, self.rt = stage, rt
        self.compiled = cfg.run.compile == "step"
        self.cuda_graphs = cfg.run.cuda_graphs
        self.phase = "compiled_step" if self.compiled else "student_forward_backward"
        if self.compiled:
            # "triton.cudagraphs" is what mode="reduce-overhead" sets (a mode and options do not combine)
            options = {**SAME_RANDOM, "triton.cudagraphs": self.cuda_graphs}
            self._step = torch.compile(self._whole, fullgraph=True, dynamic=False, backend=compiler,
                                       options=options if compiler == "inductor" else None)

    def _whole(self, batch):
        with self.rt.autocast():
            return self.stage.loss(self.stage.prepare(batch))

    def prepare(self, batch):
        if self.compiled:
            return batch
        with self.rt.autocast():
            return self.stage.prepare(batch)

    def loss(self, prepared):
        """(loss, device metrics, images) of the micro-batch; its backward is the caller's."""
        if not self.compiled:
            with self.rt.autocast():
                return self.stage.loss(prepared)
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # the previous replay's outputs are consumed
        return self._step(prepared)
