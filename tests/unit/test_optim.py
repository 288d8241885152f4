"""Layer-wise lr decay groups and the per-iteration cosine schedule."""

from __future__ import annotations

import math

import pytest
import torch

from engine.config import OptimConfig, ScheduleConfig
from engine.models import build_vit
from engine.optim import CosineSchedule, absolute_lr, build_optimizer, param_groups


def test_linear_scaling_rule():
    assert absolute_lr(OptimConfig(blr=1e-3), 128) == pytest.approx(5e-4)
    assert absolute_lr(OptimConfig(blr=1e-3, lr=0.1), 128) == 0.1


def test_layer_decay_scales_and_no_decay_sets():
    model = build_vit("vit_digits_tiny", img_size=16, in_chans=1, num_classes=10)  # depth 4 -> 6 layer ids
    groups = param_groups(model, weight_decay=0.05, layer_decay=0.5)
    by_param = {id(p): g for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    n = model.num_layers  # depth + 1 = 5
    assert n == 5
    assert by_param[id(named["head.weight"])]["lr_scale"] == 1.0
    assert by_param[id(named["patch_embed.proj.weight"])]["lr_scale"] == pytest.approx(0.5 ** 5)
    assert by_param[id(named["blocks.0.attn.qkv.weight"])]["lr_scale"] == pytest.approx(0.5 ** 4)
    assert by_param[id(named["blocks.3.mlp.fc2.weight"])]["lr_scale"] == pytest.approx(0.5 ** 1)
    # no weight decay on biases, norms, the class token and the position embedding
    for name in ("blocks.0.attn.qkv.bias", "blocks.1.norm1.weight", "cls_token", "pos_embed", "fc_norm.weight"):
        assert by_param[id(named[name])]["weight_decay"] == 0.0, name
    assert by_param[id(named["blocks.2.mlp.fc1.weight"])]["weight_decay"] == 0.05
    # every trainable parameter is in exactly one group
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in model.parameters() if p.requires_grad)


def test_optimizer_applies_group_scales():
    model = build_vit("vit_digits_tiny", img_size=16, in_chans=1, num_classes=10)
    opt = build_optimizer(model, OptimConfig(layer_decay=0.5), lr=1e-3)
    CosineSchedule(1e-3, ScheduleConfig(epochs=10, warmup_epochs=0)).apply(opt, 0.0)
    scales = sorted({g["lr"] / 1e-3 for g in opt.param_groups})
    assert scales[-1] == pytest.approx(1.0) and scales[0] == pytest.approx(0.5 ** 5)


def test_schedule_warmup_end_and_min_lr():
    s = CosineSchedule(1.0, ScheduleConfig(epochs=10, warmup_epochs=2, min_lr=0.01))
    assert s(0.0) == 0.0
    assert s(1.0) == pytest.approx(0.5)  # linear warm-up
    assert s(2.0) == pytest.approx(1.0)  # warm-up ends at the peak
    assert s(6.0) == pytest.approx(0.01 + 0.99 * 0.5)  # half-way down the cosine
    assert s(10.0) == pytest.approx(0.01)  # min lr at the end
    assert s(12.0) == pytest.approx(0.01)
    # per-iteration: fractional epochs give distinct, decreasing values after warm-up
    vals = [s(2 + i / 7) for i in range(8)]
    assert all(a > b for a, b in zip(vals, vals[1:]))
    assert s(2 + 8 * 0.25) == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 0.25)))


def test_fused_adamw_skips_a_step_on_found_inf():
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=0.1, fused=True)
    p.grad = torch.ones(3)
    opt.found_inf = torch.tensor(1.0)
    opt.step()
    assert torch.equal(p.detach(), torch.ones(3))
    opt.found_inf = torch.tensor(0.0)
    opt.step()
    assert not torch.equal(p.detach(), torch.ones(3))
