"""The training stages end to end on the digits demo, kept to a few steps each."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

import kernels
from engine import checkpoint as ckpt
from engine.config import load_plan
from engine.errors import Interrupted, UserError
from engine.runtime import Runtime
from engine.session import run_plan
from engine.stages import loop as loop_mod
from engine.stages.common import EmaTeacher
from engine.stages.runner import build_student, stage_data, wrap_for_training
from engine.stages.semi import SemiStage
from engine.stages.specs import STAGE_SPECS
from engine.train import main
from kernels import soft_target_cross_entropy_reference

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "configs" / "digits.toml"
FAST = [("logging.progress", "false"), ("logging.tensorboard", "true"), ("run.threads", "1")]


pytestmark = pytest.mark.usefixtures("one_thread")


def plan_with(*overrides, stages="finetune,semi"):
    return load_plan(DEMO, [("run.stages", stages), *FAST, *overrides])


def test_short_demo_writes_the_whole_run_folder(tmp_path):
    out = tmp_path / "run"
    code = main(["--out", str(out), "--schedule.max_steps", "4", "--logging.every_steps", "2",
                 "--logging.progress", "false", "--run.threads", "1"])
    assert code == 0
    for name in ("config.toml", "metrics.jsonl", "report.md", "results.json", "model.safetensors",
                 "accuracy.png", "loss.png", "mask_rate.png", "reconstruction.png"):
        assert (out / name).is_file(), name
    assert any((out / "tensorboard").iterdir())
    results = json.loads((out / "results.json").read_text())
    stages = results["stages"]
    assert set(stages) == {"baseline", "pretrain", "finetune", "semi"}
    for name in ("finetune", "semi"):
        assert 0.0 <= stages[name]["top1"] <= 100.0 and 0.0 <= stages[name]["teacher_top1"] <= 100.0
    assert stages["pretrain"]["recon_loss"] > 0
    assert results["wall_seconds"] > 0
    for stage in ("baseline", "pretrain", "finetune", "semi"):
        assert (out / "checkpoints" / f"{stage}-final.pt").is_file()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    semi_train = [r for r in rows if r["stage"] == "semi" and r["kind"] == "train"]
    assert semi_train and {"loss_x", "loss_u", "mask_rate", "lr", "img_per_s", "pl_precision", "pl_recall"} \
        <= set(semi_train[-1])
    report = (out / "report.md").read_text()
    assert "Semi-ViT" in report and "accuracy.png" in report and "reconstruction.png" in report
    # the written config reproduces the plan
    assert load_plan(out / "config.toml").stages == load_plan(DEMO, [("schedule.max_steps", "4"),
                                                                   ("logging.every_steps", "2"),
                                                                   ("logging.progress", "false"),
                                                                   ("run.threads", "1")]).stages


def test_ema_teacher_moves_by_exactly_one_minus_decay():
    student = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.LayerNorm(4)).double()
    ema = EmaTeacher(student, decay=0.9)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    ema.update()
    for (k, t), s in zip(ema.module.state_dict().items(), student.state_dict().values()):
        torch.testing.assert_close(t - before[k], 0.1 * (s - before[k]), rtol=0, atol=1e-12)
    assert not any(p.requires_grad for p in ema.module.parameters())


def _semi_stage(plan_overrides=(), teacher_from=None):
    plan = plan_with(*plan_overrides, stages="semi")
    cfg = plan.stages["semi"]
    rt = Runtime(device=torch.device("cpu"), dtype=None)
    data = stage_data(cfg, rt, STAGE_SPECS["semi"])
    student, _ = build_student(STAGE_SPECS["semi"], cfg, rt, None)
    return SemiStage(cfg, data, student, wrap_for_training(student, cfg, rt), teacher_state=teacher_from), cfg


def test_semi_teacher_starts_from_the_finetune_ema():
    plan = plan_with(stages="semi")
    cfg = plan.stages["semi"]
    rt = Runtime(device=torch.device("cpu"), dtype=None)
    ema_source, _ = build_student(STAGE_SPECS["semi"], cfg, rt, None)
    with torch.no_grad():
        for p in ema_source.parameters():
            p.mul_(0.5)
    stage, _ = _semi_stage(teacher_from=ema_source.state_dict())
    for t, e in zip(stage.teacher.state_dict().values(), ema_source.state_dict().values()):
        assert torch.equal(t, e)
    key = "blocks.0.attn.qkv.weight"  # the student is the fresh init, the teacher half of it
    torch.testing.assert_close(stage.teacher.state_dict()[key], 0.5 * stage.student.state_dict()[key])


def test_semi_teacher_starts_from_an_original_checkpoints_model_ema(tmp_path):
    """The original Semi-ViT fine-tune saves {'model', 'model_ema', 'optimizer', 'epoch', 'args'}."""
    import argparse

    plan = plan_with(stages="semi")
    cfg = plan.stages["semi"]
    rt = Runtime(device=torch.device("cpu"), dtype=None)
    model, _ = build_student(STAGE_SPECS["semi"], cfg, rt, None)
    ema = {k: v * 0.5 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    path = tmp_path / "checkpoint-99.pth"
    torch.save({"model": model.state_dict(), "model_ema": ema, "optimizer": {}, "epoch": 99,
                "args": argparse.Namespace(model="vit_base_patch16")}, path)
    cfg = load_plan(DEMO, [("run.stages", "semi"), *FAST, ("model.init", str(path))]).stages["semi"]
    student, teacher_state = build_student(STAGE_SPECS["semi"], cfg, rt, None)
    assert teacher_state is not None
    for k, v in ema.items():
        assert torch.equal(teacher_state[k], v), k
    assert torch.equal(student.state_dict()["blocks.0.attn.qkv.weight"], model.state_dict()["blocks.0.attn.qkv.weight"])


def test_semi_loss_is_loss_x_plus_lambda_u_times_masked_loss_u():
    torch.manual_seed(0)
    stage, cfg = _semi_stage([("semi.pseudo_mixup", "false"), ("semi.threshold", "0.15"),
                              ("semi.lambda_u", "3.0")])
    stage.student.eval()  # no drop-path noise so the check can recompute the forward
    batch = next(stage.batches(0, 0))
    (x, y), (u_weak, u_strong, u_true) = batch
    loss, metrics, n = stage.loss(stage.prepare(batch))
    with torch.no_grad():
        probs = stage.teacher(u_weak).softmax(-1)
        p, y_hat = probs.max(-1)
        mask = (p >= 0.15).float()
        logits = stage.student(torch.cat([x, u_strong]))
        ones_x = torch.ones(x.shape[0])
        loss_x = soft_target_cross_entropy_reference(logits[: x.shape[0]], y, y, ones_x, smoothing=0.1)
        # hard pseudo labels: plain cross-entropy (no smoothing), masked, averaged over the whole batch
        loss_u = (torch.nn.functional.cross_entropy(logits[x.shape[0]:], y_hat, reduction="none") * mask).mean()
    torch.testing.assert_close(loss.detach(), loss_x + 3.0 * loss_u, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(metrics["raw_mask_rate"], mask.mean())
    assert n == x.shape[0] + u_strong.shape[0]


def _final_weights(out: Path, stage: str) -> dict:
    return ckpt.safe_load(out / "checkpoints" / f"{stage}-final.pt")["model"]


def test_resume_reproduces_an_uninterrupted_run_bit_for_bit(tmp_path):
    common = [("schedule.max_steps", "7"), ("stages.finetune.checkpoint.every_epochs", "1"),
              ("logging.every_steps", "1")]
    straight = tmp_path / "straight"
    run_plan(plan_with(*common, stages="finetune"), straight)
    # The same run cut at step 4 (mid-epoch: 3 steps per epoch), then resumed from its checkpoint.
    cut = tmp_path / "cut"
    run_plan(plan_with(("schedule.max_steps", "4"), *common[1:], stages="finetune"), cut)
    (cut / "checkpoints" / "finetune-final.pt").unlink()
    assert ckpt.list_checkpoints(cut / "checkpoints", "finetune")[-1].name.endswith("s000004.pt")
    run_plan(plan_with(*common, ("checkpoint.resume", "auto"), stages="finetune"), cut)
    a, b = _final_weights(straight, "finetune"), _final_weights(cut, "finetune")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_rolling_checkpoints_keep_the_newest_and_ignore_partial_files(tmp_path):
    out = tmp_path / "r"
    run_plan(plan_with(("schedule.max_steps", "9"), ("stages.finetune.checkpoint.every_epochs", "1"),
                       ("checkpoint.keep", "2"), stages="finetune"), out)
    names = [p.name for p in ckpt.list_checkpoints(out / "checkpoints", "finetune")]
    assert names == ["finetune-e0002-s000006.pt", "finetune-e0003-s000009.pt"]
    # a save that died midway leaves only a temporary file, which is never picked up
    (out / "checkpoints" / ".finetune-e0004-s000012.pt.tmp").write_bytes(b"partial")
    (out / "checkpoints" / "finetune-e0005-s000015.pt").write_bytes(b"truncated")  # damaged newest
    path, state = ckpt.newest_valid(out / "checkpoints", "finetune")
    assert path.name == "finetune-e0003-s000009.pt" and state["step"] == 9


def test_nonfinite_loss_skips_the_step_then_stops(tmp_path, monkeypatch):
    real_step = loop_mod.optimizer_step
    calls = {"n": 0}

    def poisoned(stage, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # make this step's loss NaN
            original = stage.loss
            stage.loss = lambda batch: (lambda out: (out[0] * float("nan"), out[1], out[2]))(original(batch))
            try:
                return real_step(stage, *args, **kwargs)
            finally:
                stage.loss = original
        return real_step(stage, *args, **kwargs)

    monkeypatch.setattr(loop_mod, "optimizer_step", poisoned)
    out = tmp_path / "nan"
    run_plan(plan_with(("schedule.max_steps", "4"), ("logging.every_steps", "1"), stages="finetune"), out)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert [r["skipped"] for r in train] == [0.0, 1.0, 1.0, 1.0]
    calls["n"] = 0
    with pytest.raises(UserError, match="non-finite"):
        run_plan(plan_with(("schedule.max_steps", "4"), ("logging.every_steps", "1"),
                           ("logging.nonfinite", "stop"), stages="finetune"), tmp_path / "stop")
    assert ckpt.list_checkpoints(tmp_path / "stop" / "checkpoints", "finetune")  # last good state saved


def test_sigterm_finishes_the_step_saves_and_exits(tmp_path, monkeypatch):
    real_step = loop_mod.optimizer_step
    calls = {"n": 0}

    def signalling(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(loop_mod, "optimizer_step", signalling)
    out = tmp_path / "sig"
    with pytest.raises(Interrupted):
        run_plan(plan_with(("schedule.max_steps", "6"), stages="finetune"), out)
    saved = ckpt.list_checkpoints(out / "checkpoints", "finetune")
    assert saved and ckpt.safe_load(saved[-1])["step"] == 2


def test_no_host_sync_inside_the_training_step(monkeypatch):
    """.item(), .tolist(), bool() and float() on tensors are forbidden inside optimizer_step."""
    stage, cfg = _semi_stage()
    forbidden = {"on": False}

    def guard(name):
        original = getattr(torch.Tensor, name)

        def wrapped(self, *a, **k):
            if forbidden["on"]:
                raise AssertionError(f"host sync: Tensor.{name} inside the training step")
            return original(self, *a, **k)
        return wrapped

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, guard(name))
    from engine.metrics import MetricLogger
    from engine.stages.standalone import StageSteps

    logger = MetricLogger.__new__(MetricLogger)  # the real accumulation, nothing written
    logger.sums, logger.steps, logger.images, logger.data_wait = {}, 0, 0, 0.0
    step = StageSteps.of(stage, cfg, Runtime(device=torch.device("cpu"), dtype=None), logger=logger)
    for _ in range(2):
        forbidden["on"] = True
        try:
            finite = step()  # the optimizer step and the EMA after it
        finally:
            forbidden["on"] = False
        assert bool(finite)


def test_torchrun_two_processes_on_cpu(tmp_path):
    """DDP over gloo: two ranks shard the data, agree on the result and write one run folder."""
    import subprocess
    import sys

    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "engine.train", "--out", str(out), "--run.stages", "finetune,semi", "--schedule.max_steps", "2",
           "--logging.progress", "false", "--run.threads", "1", "--data.batch_size", "8"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["stages"]["semi"]["global_batch"] == 16  # 8 per rank x 2 ranks
    assert (out / "checkpoints" / "semi-final.pt").is_file()


def test_eval_stage_scores_a_checkpoint_like_training_did(tmp_path, capsys):
    out = tmp_path / "train"
    run_plan(plan_with(("schedule.max_steps", "3"), stages="finetune"), out)
    trained = json.loads((out / "results.json").read_text())["stages"]["finetune"]
    final = out / "checkpoints" / "finetune-final.pt"
    code = main(["--out", str(tmp_path / "eval"), "--run.stages", "eval", "--eval.checkpoint", str(final),
                 "--logging.progress", "false"])
    assert code == 0
    scored = json.loads((tmp_path / "eval" / "results.json").read_text())["stages"]["eval"]
    assert scored["top1"] == pytest.approx(trained["top1"])
    assert scored["teacher_top1"] == pytest.approx(trained["teacher_top1"])
    assert main(["--run.stages", "eval", "--eval.checkpoint", str(tmp_path / "missing.pt")]) == 2
    assert "not found" in capsys.readouterr().err


def test_imagefolder_finetune_and_semi_end_to_end(tmp_path):
    """The ImageNet path (folders of JPEGs, DataLoader workers, torchvision transforms) through the trainer."""
    from PIL import Image

    rng = torch.Generator().manual_seed(0)
    for split, count in (("train", 12), ("val", 3)):
        for c in range(3):
            folder = tmp_path / "data" / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = (torch.rand(24, 24, 3, generator=rng) * 80 + 60 * c).clamp(0, 255).byte().numpy()
                Image.fromarray(pixels).save(folder / f"img{i:02d}.jpg")
    out = tmp_path / "run"
    code = main(["--cfg", str(ROOT / "configs" / "b16_10pct.toml"), "--out", str(out),
                 "--run.stages", "finetune,semi", "--model.init", "", "--model.arch", "vit_tiny_patch16",
                 "--model.img_size", "32", "--model.num_classes", "3", "--data.root", str(tmp_path / "data"),
                 "--data.labelled_index", "", "--data.unlabelled_index", "", "--data.labels_per_class", "4",
                 "--data.batch_size", "2", "--data.num_workers", "1", "--data.eval_batch_size", "4",
                 "--schedule.max_steps", "2", "--logging.progress", "false", "--run.threads", "1"])
    assert code == 0
    stages = json.loads((out / "results.json").read_text())["stages"]
    assert stages["semi"]["global_batch"] == 2 and "teacher_top1" in stages["semi"]


def test_compile_switch_wraps_the_forward_but_not_the_weights():
    cfg = plan_with(("run.compile", "true"), stages="finetune").stages["finetune"]
    rt = Runtime(device=torch.device("cpu"), dtype=None)
    student, _ = build_student(STAGE_SPECS["finetune"], cfg, rt, None)
    forward = wrap_for_training(student, cfg, rt)
    assert forward is not student and getattr(forward, "_orig_mod", None) is student
    assert not any(k.startswith("_orig_mod") for k in student.state_dict())  # checkpoints stay loadable


def test_run_header_names_device_precision_backends_loader_and_world(capsys, tmp_path):
    from engine.header import run_header

    plan = plan_with(("schedule.max_steps", "1"), stages="finetune")
    line = run_header(plan.base, Runtime(device=torch.device("cpu"), dtype=None))
    expected_kernels = "kernels auto -> native" if kernels.native.load() else "kernels auto -> torch"
    for part in ("device cpu", "precision fp32", "attention math", expected_kernels, "compile off", "data digits",
                 "world size 1"):
        assert part in line, part
    run_plan(plan, tmp_path)
    assert capsys.readouterr().out.count("run: device") == 1


def test_baseline_differs_from_the_pretrained_path_only_in_pretraining():
    """Same architecture, same recipe, MAE's encoder init (sin-cos table, still learnable) — no pre-training."""
    from engine.models.pos_embed import get_2d_sincos_pos_embed

    plan = load_plan(DEMO, [])
    assert plan.stages["baseline"] == plan.stages["finetune"]  # the demo's recipe is the same for both
    rt = Runtime(device=torch.device("cpu"), dtype=None)
    model, teacher = build_student(STAGE_SPECS["baseline"], plan.stages["baseline"], rt, None)
    assert teacher is None and model.pos_embed.requires_grad
    torch.testing.assert_close(model.pos_embed[0].detach(), get_2d_sincos_pos_embed(64, 4, cls_token=True))
    fresh, _ = build_student(STAGE_SPECS["finetune"], plan.stages["finetune"], rt, None)
    assert not torch.equal(fresh.pos_embed, model.pos_embed)  # a plain fresh ViT keeps its learned-table init


def test_user_errors_name_the_key_and_the_fix(tmp_path, capsys):
    missing = str(tmp_path / "no.pt")
    assert main(["--out", str(tmp_path / "a"), "--run.stages", "finetune", "--model.init", missing]) == 2
    err = capsys.readouterr().err
    assert "model.init" in err and "no.pt" in err and '--model.init ""' in err
    assert main(["--out", str(tmp_path / "b"), "--run.stages", "pseudo_label", "--run.threads", "1"]) == 2
    err = capsys.readouterr().err
    assert "pseudo_label" in err and "--eval.checkpoint" in err
    assert main(["--out", str(tmp_path / "c"), "--run.stages", "finetune", "--model.in_chans", "3"]) == 2
    assert "--model.in_chans 1" in capsys.readouterr().err


def test_a_stage_stepped_outside_a_run_reads_past_its_first_epoch_and_counts_its_images():
    """engine.stages.standalone, what the benchmarks time: the loop's step, endless batches, the EMA after it."""
    from engine.stages.standalone import stage_steps

    cfg = plan_with(stages="finetune").stages["finetune"]
    step = stage_steps(cfg, "finetune")
    teacher = {k: v.clone() for k, v in step.stage.teacher.state_dict().items()}
    for _ in range(step.stage.micro_batches_per_epoch() + 1):
        assert bool(step())
    assert step.images == cfg.data.batch_size * cfg.optim.accum_steps
    assert any(not torch.equal(v, teacher[k]) for k, v in step.stage.teacher.state_dict().items())
    semi = plan_with(stages="semi").stages["semi"]
    assert stage_steps(semi, "semi").images == semi.data.batch_size * (1 + semi.semi.mu)
