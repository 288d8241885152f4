"""run.compile: every training step traces as one graph, a compiled step trains like an eager one, and
checkpoints move between modes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine import checkpoint as ckpt
from engine.config import load_plan
from engine.stages.standalone import StageSteps, stage_steps
from engine.train import main
from kernels import dispatch
from tests.conftest import require_backend

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "configs" / "digits.toml"
MIXUP = [("augment.mixup", "0.8"), ("augment.cutmix", "1.0")]

pytestmark = pytest.mark.usefixtures("one_thread")


def demo_training(name: str, overrides=(), compile_mode: str = "off", compiler: str = "inductor") -> StageSteps:
    """The demo's `name` stage: call it for one optimizer step + EMA (its stage holds the student)."""
    cfg = load_plan(DEMO, [("run.stages", name), ("run.compile", compile_mode), *overrides]).stages[name]
    return stage_steps(cfg, name, seed=5, compiler=compiler)


CASES = {
    "pretrain": ("pretrain", []),
    "finetune": ("finetune", []),
    "finetune with mixup and cutmix": ("finetune", MIXUP),
    "semi": ("semi", []),
    "semi with hard pseudo labels": ("semi", [("semi.pseudo_mixup", "false")]),
    "semi with mixup, cutmix and pseudo cutmix": ("semi", [*MIXUP, ("semi.cutmix_prob", "0.5")]),
}


@pytest.mark.parametrize("backend", ["torch", "native"])
@pytest.mark.parametrize("case", list(CASES))
def test_every_training_step_traces_as_one_graph_with_its_backward(case, backend):
    require_backend(backend)
    name, overrides = CASES[case]
    dispatch.set_default(backend)
    torch._dynamo.reset()
    try:
        step = demo_training(name, overrides, "step", compiler="aot_eager")
        for _ in range(2):  # fullgraph=True: a graph break raises instead of splitting the step
            step()
        assert step.micro_step.compiled
    finally:
        dispatch.set_default("auto")
        torch._dynamo.reset()


def test_a_compiled_step_trains_like_the_eager_step_over_20_demo_steps():
    torch._dynamo.reset()
    weights = {}
    for mode in ("off", "step"):
        step = demo_training("semi", (), mode)
        for _ in range(20):
            step()
        weights[mode] = {k: v.detach().clone() for k, v in step.stage.student.state_dict().items()}
    torch._dynamo.reset()
    assert weights["off"].keys() == weights["step"].keys()
    for key, eager in weights["off"].items():
        # the same random draws (fallback_random); only the order of float operations differs
        torch.testing.assert_close(weights["step"][key], eager, rtol=1e-3, atol=5e-4, msg=key)
    assert max((weights["step"][k] - v).abs().max() for k, v in weights["off"].items()) > 0  # it did compile


def test_a_checkpoint_of_a_compiled_run_resumes_eagerly_and_the_other_way_round(tmp_path):
    common = ["--run.stages", "finetune", "--logging.progress", "false", "--run.threads", "1",
              "--checkpoint.every_epochs", "1", "--eval.every_epochs", "1000"]

    def train(out: str, mode: str, steps: int, resume: str = "") -> dict:
        assert main(["--out", str(tmp_path / out), "--run.compile", mode, "--schedule.max_steps", str(steps),
                     "--checkpoint.resume", resume, *common]) == 0
        return ckpt.safe_load(tmp_path / out / "checkpoints" / "finetune-final.pt")["model"]

    def rolling(out: str) -> str:
        return str(ckpt.newest_valid(tmp_path / out / "checkpoints", "finetune")[0])

    def assert_close(a: dict, b: dict) -> None:
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=5e-4, msg=key)

    assert_close(train("step", "step", 3), train("off", "off", 3))
    eager_from_compiled = train("off-from-step", "off", 6, resume=rolling("step"))
    assert_close(train("step-from-off", "step", 6, resume=rolling("off")), eager_from_compiled)
    assert_close(train("model-from-step", "model", 6, resume=rolling("step")), eager_from_compiled)
