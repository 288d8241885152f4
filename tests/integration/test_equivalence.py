"""2 ranks (DDP or FSDP2 over gloo, 2 CPU processes) == 1 rank: the same global batch of the same samples, k steps,
the same student and teacher; distributed evaluation == single-process evaluation.

The batches are fixed tensors, sharded like the sampler shards a stream (rank r takes rows r, r + W, ...),
and every per-rank random draw is switched off (labelled mixup, drop-path, pseudo mixup: its partners are
drawn within each rank's batch, so 2 ranks cannot pair like 1), so the only difference left is the
strategy: gradients averaged across ranks (DDP all-reduce, FSDP2 reduce-scatter onto shards, the EMA
updated shard by shard) instead of one larger batch. That changes the order of float additions,
hence the tolerance below, not a bit-for-bit match.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "configs" / "digits.toml"
STEPS = 3
# float32, 3 AdamW steps, sums in another order: measured differences up to 3.4e-6, while the steps move
# weights by up to 3e-3
TOL = {"rtol": 0.0, "atol": 1e-5}

WORKER = """
import os, sys, torch
sys.path.insert(0, {tests!r})
import torch.distributed as dist
from test_equivalence import run_all
dist.init_process_group("gloo")
torch.save(run_all(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])), {out!r} + os.environ["RANK"] + ".pt")
dist.destroy_process_group()
"""


def plan(stage: str, *extra: tuple[str, str]):
    from engine.config import load_plan

    overrides = [("run.stages", stage), ("run.threads", "1"), ("augment.mixup", "0"), ("augment.cutmix", "0"),
                 ("model.drop_path", "0"), ("semi.pseudo_mixup", "false"), ("semi.threshold", "0.6"),
                 ("data.batch_size", "8"), ("data.eval_batch_size", "64"), *extra]
    return load_plan(DEMO, overrides).stages[stage]


def global_batches(stage: str, micro: int, b: int, mu: int) -> list:
    """`micro` global micro-batches of `b` labelled (and `mu * b` unlabelled) digits, fixed by a seed."""
    from dataloading.digits import _load, preprocess

    raw, targets = _load()
    images = preprocess(torch.from_numpy(raw).unsqueeze(1), 16, [0.5], [0.5])
    labels = torch.from_numpy(targets)
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(micro):
        i = torch.randint(0, len(labels), (b,), generator=g)
        if stage == "finetune":
            out.append((images[i], labels[i]))
        else:
            j = torch.randint(0, len(labels), (mu * b,), generator=g)
            strong = images[j] + 0.1 * torch.randn(images[j].shape, generator=g)
            out.append(((images[i], labels[i]), (images[j], strong, labels[j])))
    return out


def shard(batch, rank: int, world: int):
    if isinstance(batch, torch.Tensor):
        return batch[rank::world].contiguous()  # as a stream delivers it
    return tuple(shard(part, rank, world) for part in batch)


def train_steps(stage_name: str, rank: int, world: int, strategy: str = "ddp") -> dict:
    from engine.metrics import MetricLogger
    from engine.runtime import Runtime
    from engine.sharding import full_state_dict
    from engine.stages.finetune import FinetuneStage
    from engine.stages.runner import build_student, shard_stage, stage_data, wrap_for_training
    from engine.stages.semi import SemiStage
    from engine.stages.specs import STAGE_SPECS
    from engine.stages.standalone import StageSteps

    accum = 2 if stage_name == "finetune" else 1  # accumulation: no gradient sync on the first micro-step
    cfg = plan(stage_name, ("optim.accum_steps", str(accum)), ("dist.strategy", strategy))
    fsdp = strategy == "fsdp" and world > 1
    rt = Runtime(device=torch.device("cpu"), dtype=None, rank=rank, world_size=world)
    data = stage_data(cfg, rt, STAGE_SPECS[stage_name])
    student, _ = build_student(STAGE_SPECS[stage_name], cfg, rt, None)
    init = {k: v.clone() for k, v in student.state_dict().items()}
    forward = student if fsdp else wrap_for_training(student, cfg, rt)
    if stage_name == "finetune":
        stage = FinetuneStage(cfg, data, student, forward)
    else:  # a teacher whose head gives confidences around tau, so that the mask keeps about half
        teacher = dict(init)
        noise = torch.randn(init["head.weight"].shape, generator=torch.Generator().manual_seed(11))
        teacher["head.weight"] = 0.2 * noise
        stage = SemiStage(cfg, data, student, forward, teacher_state=teacher)
    if fsdp:  # FSDP2: student and teacher sharded per block, the EMA on each rank's shards
        shard_stage(stage, cfg, rt)
    logger = MetricLogger.__new__(MetricLogger)  # the step only accumulates into it
    logger.sums, logger.steps, logger.images, logger.data_wait = {}, 0, 0, 0.0
    batches = iter([shard(x, rank, world) for x in global_batches(stage_name, STEPS * accum, 16, cfg.semi.mu)])
    step = StageSteps.of(stage, cfg, rt, batches, logger=logger)
    for _ in range(STEPS):
        step()
    return {"init": init, "student": {k: v.clone() for k, v in full_state_dict(student).items()},
            "teacher": {k: v.clone() for k, v in full_state_dict(stage.teacher).items()},
            "mask_rate": float(logger.sums.get("raw_mask_rate", torch.zeros(()))) / logger.steps}


def evaluation(rank: int, world: int, strategy: str = "ddp") -> dict:
    """The demo's 540 test images in batches of 64 per rank: uneven shards, a short last batch."""
    from engine.models.build import build_model
    from engine.runtime import Runtime, seed_everything
    from engine.stages.evaluate import evaluate
    from engine.stages.runner import stage_data
    from engine.stages.specs import STAGE_SPECS

    cfg = plan("eval")
    rt = Runtime(device=torch.device("cpu"), dtype=None, rank=rank, world_size=world)
    seed_everything(3)
    model = build_model(cfg.model)
    if strategy == "fsdp" and world > 1:
        from engine.sharding import shard_module

        shard_module(model, rt)
    return evaluate(model, stage_data(cfg, rt, STAGE_SPECS["eval"]).evaluation, rt)


class FixedStream:
    """Five fixed eval batches, rank r taking batches r, r + W, ...: with 2 ranks, 3 and 2 batches."""

    def __init__(self, rank: int, world: int):
        from dataloading.digits import _load, preprocess

        raw, targets = _load()
        images = preprocess(torch.from_numpy(raw[:90]).unsqueeze(1), 16, [0.5], [0.5])
        batches = [(images[i:i + 18], torch.from_numpy(targets[i:i + 18])) for i in range(0, 90, 18)]
        self.batches = batches[rank::world]

    def __len__(self) -> int:
        return len(self.batches)

    def epoch(self, epoch: int, start: int = 0):
        return iter(self.batches[start:])


def uneven_evaluation(rank: int, world: int) -> dict:
    """Under FSDP2 the rank with one batch fewer must still join every forward's all-gathers."""
    from engine.models.build import build_model
    from engine.runtime import Runtime, seed_everything
    from engine.sharding import shard_module
    from engine.stages.evaluate import evaluate

    cfg = plan("eval")
    rt = Runtime(device=torch.device("cpu"), dtype=None, rank=rank, world_size=world)
    seed_everything(3)
    model = build_model(cfg.model)
    with torch.no_grad():  # a head that separates the classes a little, so top-1 is not a constant
        model.head.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(5))
    if world > 1:
        shard_module(model, rt)
    return evaluate(model, FixedStream(rank, world), rt)


def run_all(rank: int, world: int) -> dict:
    torch.set_num_threads(1)
    out = {}
    for strategy in ("ddp", "fsdp"):
        out[strategy] = {"finetune": train_steps("finetune", rank, world, strategy),
                         "semi": train_steps("semi", rank, world, strategy), "eval": evaluation(rank, world, strategy)}
        if strategy == "fsdp":
            out[strategy]["uneven_eval"] = uneven_evaluation(rank, world)
        if world == 1:  # one rank is the reference of both
            out["fsdp"] = out["ddp"]
            out["ddp"]["uneven_eval"] = uneven_evaluation(rank, world)
            break
    return out


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_match_one_rank_and_evaluation_is_exact(tmp_path):
    out = str(tmp_path / "rank")
    code = WORKER.format(tests=str(Path(__file__).parent), out=out)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "WORLD_SIZE": "2"}
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for r in range(2)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(e[-2000:] for e in errors)
    ranks = [torch.load(out + f"{r}.pt", weights_only=True) for r in range(2)]
    reference = run_all(0, 1)["ddp"]
    for strategy in ("ddp", "fsdp"):
        check(ranks[0][strategy], ranks[1][strategy], reference)
    uneven = ranks[0]["fsdp"]["uneven_eval"]  # 3 batches on rank 0, 2 on rank 1, sharded model
    assert uneven["top1"] == reference["uneven_eval"]["top1"] and uneven["top5"] == reference["uneven_eval"]["top5"]
    assert 0 < uneven["top1"] < 100 and abs(uneven["loss"] - reference["uneven_eval"]["loss"]) < 1e-6


def check(two: dict, other: dict, one: dict) -> None:
    for stage in ("finetune", "semi"):
        for role in ("student", "teacher"):
            for key, value in one[stage][role].items():
                assert torch.equal(two[stage][role][key], other[stage][role][key]), f"ranks differ: {stage} {key}"
                torch.testing.assert_close(two[stage][role][key], value, **TOL, msg=f"{stage} {role} {key}")
        if stage == "semi":
            assert 0.2 < one[stage]["mask_rate"] < 0.8  # both the kept and the masked pseudo labels count
        moved = [k for k, v in one[stage]["student"].items() if not torch.equal(v, one[stage]["init"][k])]
        assert len(moved) > len(one[stage]["init"]) // 2  # trained weights are compared, not the init
    # evaluation: the same correct counts (every test image once across ranks, none padded)
    assert two["eval"] == other["eval"]
    assert two["eval"]["top1"] == one["eval"]["top1"] and two["eval"]["top5"] == one["eval"]["top5"]
    assert abs(two["eval"]["loss"] - one["eval"]["loss"]) < 1e-6
