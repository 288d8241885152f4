"""ViT family: parity with timm, position embeddings, checkpoint loading, FLOPs, training helpers."""

import math

import numpy as np
import pytest
import torch

from engine.models import (
    ARCHS,
    VisionTransformer,
    build_vit,
    forward_gflops,
    get_2d_sincos_pos_embed,
    load_vit_state_dict,
    param_count,
    resample_pos_embed,
)

timm = pytest.importorskip("timm")
from timm.models.vision_transformer import VisionTransformer as TimmViT  # noqa: E402

SMALL = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=10)


def small(**kw):
    return VisionTransformer(**{**SMALL, **kw})


# --- 1. parity with timm --------------------------------------------------------------------------------
@pytest.mark.parametrize("global_pool", ["avg", "token"])
def test_timm_parity(global_pool):
    torch.manual_seed(0)
    ref = TimmViT(**SMALL, global_pool=global_pool, class_token=True).eval()
    # the defaults we rely on: qkv bias, LayerNorm eps 1e-6, exact GELU, fc_norm only for avg pooling
    assert ref.blocks[0].attn.qkv.bias is not None
    assert ref.blocks[0].norm1.eps == 1e-6
    assert ref.blocks[0].mlp.act.approximate == "none"
    assert isinstance(ref.fc_norm, torch.nn.LayerNorm) == (global_pool == "avg")
    # random (not init) values everywhere so every weight matters
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.2)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        want = ref(x)
        want_feats = ref.forward_features(x)
    for backend in ("sdpa", "math"):
        ours = small(global_pool=global_pool, attn_backend=backend).eval()
        # eps 1e-5 vs 1e-6 hides below atol on these activations: check it directly
        assert {m.eps for m in ours.modules() if isinstance(m, torch.nn.LayerNorm)} == {1e-6}
        assert list(ours.state_dict()) == list(ref.state_dict())  # same keys, same order
        ours.load_state_dict(ref.state_dict(), strict=True)
        with torch.no_grad():
            feats = ours.forward_features(x)
            torch.testing.assert_close(feats, want_feats, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(ours.forward_head(feats), want, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(ours(x), want, atol=1e-5, rtol=1e-5)


def test_backends_agree_with_gradients():
    torch.manual_seed(0)
    m = small()
    x = torch.randn(2, 3, 32, 32)
    outs, grads = [], []
    for backend in ("sdpa", "math"):
        m.set_attn_backend(backend)
        m.zero_grad()
        y = m(x)
        y.square().sum().backward()
        outs.append(y.detach())
        grads.append(m.blocks[0].attn.qkv.weight.grad.clone())
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)


# --- 2. position-embedding resampling ---------------------------------------------------------------------
def test_resample_matches_timm():
    from timm.layers import resample_abs_pos_embed

    torch.manual_seed(0)
    pe = torch.randn(1, 1 + 14 * 14, 32)
    ours = resample_pos_embed(pe, (16, 16), num_prefix_tokens=1)
    ref = resample_abs_pos_embed(pe, [16, 16], num_prefix_tokens=1, antialias=False)
    assert ours.shape == (1, 1 + 16 * 16, 32)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ours[:, :1], pe[:, :1], atol=0, rtol=0)  # prefix token kept as is
    # non-square old grid given explicitly; downsampling too
    pe2 = torch.randn(1, 1 + 6 * 10, 8)
    ref2 = resample_abs_pos_embed(pe2, [4, 5], old_size=[6, 10], num_prefix_tokens=1, antialias=False)
    torch.testing.assert_close(resample_pos_embed(pe2, (4, 5), 1, old_grid=(6, 10)), ref2, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="old_grid"):
        resample_pos_embed(pe2, (4, 5), 1)  # 60 positions: not square, must be told


def test_load_224_into_256_resamples():
    torch.manual_seed(0)
    kw = dict(patch_size=16, embed_dim=32, depth=1, num_heads=2, num_classes=5)
    src = VisionTransformer(img_size=224, **kw)
    dst = VisionTransformer(img_size=256, **kw)
    report = load_vit_state_dict(dst, src.state_dict())
    assert report["resampled"] == ["pos_embed"]
    assert report["ignored"] == [] and report["new"] == []
    assert dst.pos_embed.shape == (1, 1 + 16 * 16, 32)
    want = resample_pos_embed(src.pos_embed.detach(), (16, 16))
    torch.testing.assert_close(dst.pos_embed.detach(), want)
    torch.testing.assert_close(dst.blocks[0].mlp.fc1.weight, src.blocks[0].mlp.fc1.weight)
    assert dst(torch.randn(1, 3, 256, 256)).shape == (1, 5)


def test_sincos_resampled_to_same_grid_is_unchanged():
    pe = get_2d_sincos_pos_embed(64, 4, cls_token=True)[None]  # (1, 17, 64)
    torch.testing.assert_close(resample_pos_embed(pe, (4, 4)), pe, atol=0, rtol=0)


# --- 3. sin-cos table ------------------------------------------------------------------------------------
def _mae_sincos_reference(embed_dim, grid_size, cls_token):
    # MAE's numpy formula, written out independently
    def one_d(dim, pos):
        omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
        omega = 1.0 / 10000**omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape(2, 1, grid_size, grid_size)
    emb = np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)
    return emb


@pytest.mark.parametrize("cls_token", [True, False])
def test_sincos_matches_mae(cls_token):
    ref = torch.from_numpy(_mae_sincos_reference(16, 5, cls_token)).float()
    ours = get_2d_sincos_pos_embed(16, 5, cls_token=cls_token)
    assert ours.dtype == torch.float32 and ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)


def test_sincos_model_pos_embed_is_frozen_parameter():
    m = small(pos_embed="sincos")
    assert isinstance(m.pos_embed, torch.nn.Parameter) and not m.pos_embed.requires_grad
    assert "pos_embed" in m.state_dict()
    torch.testing.assert_close(m.pos_embed.detach()[0], get_2d_sincos_pos_embed(64, 4, cls_token=True))
    assert m.pos_embed[0, 0].abs().sum() == 0  # zero row for the class token
    with pytest.raises(ValueError, match="divisible by 4"):
        get_2d_sincos_pos_embed(66, 4)


# --- 4. FLOPs and parameter counts -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "arch,want", [("vit_base_patch16", 35.2), ("vit_large_patch16", 123.2), ("vit_huge_patch14", 334.8)]
)
def test_gflops_published(arch, want):
    with torch.device("meta"):
        m = build_vit(arch, img_size=224)
    assert m.pos_embed.is_meta
    got = forward_gflops(m, 224)
    assert abs(got - want) / want < 0.02, (arch, got)


def _analytic_flops(img, patch, dim, depth, classes, in_chans=3, mlp_ratio=4):
    n = (img // patch) ** 2
    t = n + 1
    macs = n * dim * in_chans * patch * patch  # patch embedding
    macs += depth * (t * dim * 3 * dim + t * dim * dim + 2 * t * dim * mlp_ratio * dim)  # qkv, proj, mlp
    macs += depth * 2 * t * t * dim  # q k^T and attn v
    macs += dim * classes
    return 2 * macs / 1e9


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_gflops_count_attention_for_every_backend(backend):
    # exact for a small model: the attention matmuls must be in the count, whatever the backend
    want = _analytic_flops(32, 8, 64, 2, 10)
    m = small(attn_backend=backend)  # a real (CPU) model: counted through meta stand-ins
    assert forward_gflops(m, 32) == pytest.approx(want, rel=1e-9)
    assert m.attn_backend == backend and m.training  # restored
    with torch.device("meta"):
        mm = small(attn_backend=backend)
    assert forward_gflops(mm, 32) == pytest.approx(want, rel=1e-9)
    # 4.3% of ViT-B's FLOPs are attention matmuls: without them the published figure would be missed
    assert forward_gflops("vit_base_patch16", 224) == pytest.approx(_analytic_flops(224, 16, 768, 12, 1000))


def test_param_counts():
    with torch.device("meta"):
        b16 = build_vit("vit_base_patch16")
        h14 = build_vit("vit_huge_patch14", global_pool="token")
    assert abs(param_count(b16) - 86.6e6) / 86.6e6 < 0.005
    assert abs(param_count(h14) - 632e6) / 632e6 < 0.005
    m = small(pos_embed="sincos")
    assert param_count(m) - param_count(m, trainable_only=True) == m.pos_embed.numel()


def test_archs_table():
    for size, (d, n, h) in {"tiny": (192, 12, 3), "base": (768, 12, 12), "huge": (1280, 32, 16)}.items():
        for p in (14, 16):
            assert ARCHS[f"vit_{size}_patch{p}"] == dict(patch_size=p, embed_dim=d, depth=n, num_heads=h, mlp_ratio=4.0)
    assert ARCHS["vit_digits_small"]["embed_dim"] == 96
    m = build_vit("vit_digits_tiny", img_size=16, in_chans=1, num_classes=10, drop_path=0.1)
    assert m(torch.randn(2, 1, 16, 16)).shape == (2, 10)
    with pytest.raises(ValueError, match="vit_base_patch16"):
        build_vit("vit_bsae_patch16")


# --- 5. checkpoint loading ----------------------------------------------------------------------------------
def _mae_pretrain_state_dict():
    sd = small(global_pool="token").state_dict()
    sd = {k: v for k, v in sd.items() if not k.startswith("head.")}  # MAE encoder: no head, has norm.*
    sd["mask_token"] = torch.zeros(1, 1, 32)
    sd["decoder_embed.weight"] = torch.zeros(32, 64)
    sd["decoder_pos_embed"] = torch.zeros(1, 17, 32)
    return sd


def test_load_mae_layout_into_avg_pool():
    sd = _mae_pretrain_state_dict()
    m = small(global_pool="avg")
    fresh_fc_norm = m.fc_norm.weight.detach().clone()
    with torch.no_grad():
        sd["norm.weight"].fill_(3.0)
    report = load_vit_state_dict(m, {"model": sd})
    assert set(report["ignored"]) == {"mask_token", "decoder_embed.weight", "decoder_pos_embed", "norm.weight",
                                      "norm.bias"}
    assert set(report["new"]) == {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}
    assert report["resampled"] == []
    assert "blocks.1.mlp.fc2.weight" in report["loaded"] and "pos_embed" in report["loaded"]
    torch.testing.assert_close(m.fc_norm.weight.detach(), fresh_fc_norm)  # norm NOT copied into fc_norm
    torch.testing.assert_close(m.blocks[1].attn.qkv.weight, sd["blocks.1.attn.qkv.weight"])


def test_load_head_of_other_class_count():
    src = small(num_classes=7).state_dict()
    m = small(num_classes=10)
    head = m.head.weight.detach().clone()
    report = load_vit_state_dict(m, src)
    assert {"head.weight", "head.bias"} <= set(report["new"])
    assert "head.weight" not in report["loaded"]
    torch.testing.assert_close(m.head.weight.detach(), head)
    with pytest.raises(ValueError, match=r"head\.weight.*\(7, 64\).*\(10, 64\)"):
        load_vit_state_dict(m, src, strict_head=True)


def test_load_mismatch_names_every_key():
    src = small().state_dict()
    src["blocks.0.attn.qkv.weight"] = torch.zeros(96, 64)
    src["blocks.1.mlp.fc1.bias"] = torch.zeros(7)
    m = small()
    before = m.blocks[0].mlp.fc1.weight.detach().clone()
    with pytest.raises(ValueError) as e:
        load_vit_state_dict(m, src)
    msg = str(e.value)
    assert "blocks.0.attn.qkv.weight" in msg and "(96, 64)" in msg and "(192, 64)" in msg
    assert "blocks.1.mlp.fc1.bias" in msg and "(7,)" in msg and "(256,)" in msg
    torch.testing.assert_close(m.blocks[0].mlp.fc1.weight.detach(), before)  # nothing half-loaded


# --- 6. training helpers -----------------------------------------------------------------------------------
def test_layer_id_and_no_weight_decay():
    m = small()
    assert m.num_layers == 3
    assert m.no_weight_decay() == {"pos_embed", "cls_token"}
    want = {"cls_token": 0, "pos_embed": 0, "patch_embed.proj.weight": 0, "blocks.0.attn.qkv.weight": 1,
            "blocks.1.mlp.fc2.bias": 2, "fc_norm.weight": 3, "head.weight": 3, "module.blocks.1.norm1.bias": 2}
    assert {k: m.layer_id(k) for k in want} == want
    for name, _ in m.named_parameters():
        assert 0 <= m.layer_id(name) <= m.num_layers


def test_drop_path_only_in_training():
    torch.manual_seed(0)
    m = small(drop_path=0.5)
    assert [b.drop_path_rate for b in m.blocks] == [0.0, 0.5]  # linear ramp
    x = torch.randn(8, 3, 32, 32)
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(m(x), m(x), atol=0, rtol=0)
    m.train()
    with torch.no_grad():
        assert not torch.allclose(m(x), m(x))


def test_grad_checkpointing_same_gradients(monkeypatch):
    import engine.models.vit as vit_module

    calls = []
    real_checkpoint = vit_module.checkpoint

    def counting_checkpoint(*args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return real_checkpoint(*args, **kwargs)

    monkeypatch.setattr(vit_module, "checkpoint", counting_checkpoint)
    torch.manual_seed(0)
    m = small(drop_path=0.5)
    x = torch.randn(4, 3, 32, 32)
    grads = []
    for ckpt in (False, True):
        m.set_grad_checkpointing(ckpt)
        m.zero_grad()
        torch.manual_seed(1)  # same drop-path draws; checkpoint replays the RNG on recompute
        m(x).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    assert calls == [False, False]  # one non-reentrant checkpoint per block, only in the checkpointed run
    m.eval()
    m(x)
    assert len(calls) == 2  # never in eval mode
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-6, rtol=1e-5)


def test_meta_build_then_materialise():
    with torch.device("meta"):
        m = small(pos_embed="sincos")
    assert all(p.is_meta for p in m.parameters())
    m.to_empty(device="cpu")
    m.init_weights()
    torch.testing.assert_close(m.pos_embed.detach()[0], get_2d_sincos_pos_embed(64, 4, cls_token=True))
    assert torch.isfinite(m(torch.randn(1, 3, 32, 32))).all()


def test_init_statistics():
    torch.manual_seed(0)
    m = build_vit("vit_small_patch16", num_classes=100)
    assert m.head.weight.std().item() == pytest.approx(2e-5, rel=0.1)
    assert m.head.bias.abs().sum() == 0 and m.blocks[3].mlp.fc1.bias.abs().sum() == 0
    assert m.cls_token.std().item() == pytest.approx(0.02, rel=0.2)
    assert m.pos_embed.std().item() == pytest.approx(0.02, rel=0.1)
    bound = math.sqrt(6 / (384 + 3 * 16 * 16))  # xavier on the flattened patch projection
    assert m.patch_embed.proj.weight.abs().max().item() <= bound
    assert m.patch_embed.proj.weight.abs().max().item() > 0.9 * bound


def test_bad_arguments():
    with pytest.raises(ValueError, match="'sdpa', 'math', 'xformers'"):
        small(attn_backend="flash")
    with pytest.raises(ValueError, match="'sdpa', 'math', 'xformers'"):
        small().set_attn_backend("flash")
    with pytest.raises(ValueError, match="built for"):
        small()(torch.randn(1, 3, 48, 48))


def _xformers_on_cuda():
    try:
        import xformers.ops  # noqa: F401
    except Exception:  # noqa: BLE001 (a broken install counts as missing)
        return False
    return torch.cuda.is_available()


@pytest.mark.skipif(_xformers_on_cuda(), reason="xformers and CUDA are available here")
def test_xformers_clear_error():
    try:
        import xformers.ops  # noqa: F401

        have_xformers = True
    except Exception:  # noqa: BLE001 (a broken install counts as missing)
        have_xformers = False
    if not have_xformers:
        with pytest.raises(RuntimeError, match="pip install xformers, or use attn_backend = 'sdpa'"):
            small(attn_backend="xformers")
        with pytest.raises(RuntimeError, match="needs the xformers package"):
            small().set_attn_backend("xformers")
    else:  # importable but no CUDA: construction works, the forward refuses CPU tensors clearly
        m = small(attn_backend="xformers")
        with pytest.raises(RuntimeError, match="CUDA tensors only"):
            m(torch.randn(1, 3, 32, 32))
