"""MAE pre-training: masking, patch order, loss, decoder unshuffle, MAE checkpoint layout, the stage, a short run."""

from __future__ import annotations

import argparse

import pytest
import torch

from engine.config import MaeConfig, ModelConfig
from engine.errors import UserError
from engine.models.build import build_model, init_from_checkpoint, load_weights
from engine.models.mae import MaskedAutoencoder, build_mae, encoder_state_dict

TINY_MAE = MaeConfig(decoder_dim=64, decoder_depth=2, decoder_heads=4)
DIGITS_MODEL = ModelConfig(arch="vit_digits_tiny", img_size=16, in_chans=1, num_classes=10)


def tiny(**kw) -> MaskedAutoencoder:
    base = dict(img_size=(8, 12), patch_size=4, in_chans=3, embed_dim=32, depth=2, num_heads=4,
                decoder_dim=16, decoder_depth=1, decoder_heads=2)
    return MaskedAutoencoder(**{**base, **kw})


# --- masking ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n, ratio", [(20, 0.75), (196, 0.75), (17, 0.5), (10, 0.33)])
def test_random_masking_keeps_exact_count_and_restores_order(n, ratio):
    B, D = 6, 5
    x = torch.randn(B, n, D)
    keep = int(n * (1 - ratio))
    vis, mask, ids_restore = MaskedAutoencoder.random_masking(x, ratio, torch.Generator().manual_seed(0))
    assert vis.shape == (B, keep, D) and mask.shape == (B, n) and ids_restore.shape == (B, n)
    assert torch.equal(mask.sum(1), torch.full((B,), float(n - keep)))
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(mask, (ids_restore >= keep).float())  # removed = shuffled past the first `keep`
    ids_shuffle = torch.argsort(ids_restore, dim=1)
    shuffled = torch.gather(x, 1, ids_shuffle[..., None].expand(-1, -1, D))
    assert torch.equal(shuffled[:, :keep], vis)  # the visible tokens are the kept ones, in shuffled order
    for b in range(B):  # ... and exactly the patches the mask leaves visible
        assert torch.equal(torch.sort(ids_shuffle[b, :keep]).values, torch.nonzero(mask[b] == 0).flatten())
    # un-masking: [visible, removed] gathered with ids_restore is the original order
    rest = torch.gather(x, 1, ids_shuffle[:, keep:, None].expand(-1, -1, D))
    torch.testing.assert_close(torch.gather(torch.cat([vis, rest], 1), 1, ids_restore[..., None].expand(-1, -1, D)),
                               x, rtol=0, atol=0)
    assert len({tuple(m.tolist()) for m in mask}) > 1  # per-sample masks, not one mask for the batch
    again = MaskedAutoencoder.random_masking(x, ratio, torch.Generator().manual_seed(0))
    assert torch.equal(again[1], mask) and torch.equal(again[2], ids_restore)  # a seeded generator repeats


# --- pixels <-> patches and the loss ------------------------------------------------------------------------
def reference_patches(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """MAE's patch order by hand: patches row by row, each flattened as (row p, column q, channel c)."""
    B, C, H, W = imgs.shape
    out = []
    for i in range(H // p):
        for j in range(W // p):
            out.append(imgs[:, :, i * p:(i + 1) * p, j * p:(j + 1) * p].permute(0, 2, 3, 1).reshape(B, -1))
    return torch.stack(out, 1)


def reference_loss(imgs, pred, mask, p, norm_pix):
    target = reference_patches(imgs, p)
    total, count = 0.0, 0
    for b in range(imgs.shape[0]):
        for i in range(target.shape[1]):
            if mask[b, i] == 1:
                t = target[b, i]
                if norm_pix:
                    t = (t - t.mean()) / torch.sqrt(t.var(unbiased=True) + 1e-6)
                total += ((pred[b, i] - t) ** 2).mean()
                count += 1
    return total / count


def test_patchify_order_and_inverse():
    m = tiny()
    imgs = torch.randn(2, 3, 8, 12)
    patches = m.patchify(imgs)
    assert patches.shape == (2, 6, 4 * 4 * 3)
    torch.testing.assert_close(patches, reference_patches(imgs, 4), rtol=0, atol=0)
    torch.testing.assert_close(m.unpatchify(patches), imgs, rtol=0, atol=0)


@pytest.mark.parametrize("norm_pix", [False, True])
def test_loss_counts_masked_patches_only(norm_pix):
    torch.manual_seed(0)
    m = tiny(norm_pix_loss=norm_pix)
    imgs = torch.randn(3, 3, 8, 12)
    pred = torch.randn(3, 6, 48)
    _, mask, _ = m.random_masking(torch.zeros(3, 6, 1), 0.5)
    loss = m.forward_loss(imgs, pred, mask)
    torch.testing.assert_close(loss, reference_loss(imgs, pred, mask, 4, norm_pix))
    b, visible = 1, int(torch.nonzero(mask[1] == 0)[0])
    masked = int(torch.nonzero(mask[1] == 1)[0])
    changed = pred.clone()
    changed[b, visible] += 10.0
    assert m.forward_loss(imgs, changed, mask) == loss  # bit-for-bit: visible patches have weight 0
    changed = pred.clone()
    changed[b, masked] += 0.1
    assert abs(float(m.forward_loss(imgs, changed, mask) - loss)) > 1e-4
    # the full forward returns the loss of its own prediction and mask
    full, pred2, mask2 = m(imgs, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(full, reference_loss(imgs, pred2.detach(), mask2, 4, norm_pix))
    assert torch.equal(mask2.sum(1), torch.full((3,), 6.0 - int(6 * 0.25)))  # default ratio 0.75


def test_decoder_places_tokens_where_they_came_from():
    torch.manual_seed(0)
    m = tiny(img_size=16, in_chans=1).eval()
    imgs = torch.randn(4, 1, 16, 16)
    seen = {}
    m.decoder_blocks[0].register_forward_pre_hook(lambda mod, args: seen.update(x=args[0]))
    with torch.no_grad():
        latent, mask, ids_restore = m.forward_encoder(imgs, 0.75, torch.Generator().manual_seed(1))
        pred = m.forward_decoder(latent, ids_restore)
        assert pred.shape == (4, 16, 16) and latent.shape == (4, 1 + 4, 32)
        tokens = seen["x"] - m.decoder_pos_embed  # (B, 1+N, Dd) before the blocks
        emb = m.decoder_embed(latent)  # (B, 1+keep, Dd)
        torch.testing.assert_close(tokens[:, 0], emb[:, 0])  # class token first
        for b in range(4):
            for i in range(16):
                want = m.mask_token[0, 0] if mask[b, i] == 1 else emb[b, 1 + ids_restore[b, i]]
                torch.testing.assert_close(tokens[b, 1 + i], want)
        # with nothing masked the shuffle must cancel out: any two shuffles give the same prediction
        a = m.forward_decoder(*m.forward_encoder(imgs, 0.0, torch.Generator().manual_seed(2))[::2])
        b = m.forward_decoder(*m.forward_encoder(imgs, 0.0, torch.Generator().manual_seed(3))[::2])
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_init_and_training_helpers():
    m = build_mae(DIGITS_MODEL, TINY_MAE)
    assert m.no_weight_decay() == {"pos_embed", "decoder_pos_embed"}  # both frozen
    assert m.num_layers == 0  # no layer-wise lr decay while pre-training
    assert not m.pos_embed.requires_grad and not m.decoder_pos_embed.requires_grad
    from engine.models.pos_embed import get_2d_sincos_pos_embed

    torch.testing.assert_close(m.decoder_pos_embed[0], get_2d_sincos_pos_embed(64, 4, cls_token=True))
    torch.testing.assert_close(m.pos_embed[0], get_2d_sincos_pos_embed(64, 4, cls_token=True))
    assert 0.01 < float(m.mask_token.detach().std()) < 0.03 and 0.01 < float(m.cls_token.detach().std()) < 0.03
    bound = (6 / (64 + 16)) ** 0.5  # xavier-uniform decoder_pred (16 outputs = 4*4*1 pixels)
    with torch.no_grad():
        assert float(m.decoder_pred.weight.abs().max()) <= bound and float(m.decoder_pred.bias.abs().max()) == 0
    assert m(torch.randn(2, 1, 16, 16))[1].shape == (2, 16, 16)


def test_pretraining_decays_cls_and_mask_tokens_as_mae_does():
    """MAE's rule (timm add_weight_decay): no decay for 1-D parameters and biases only."""
    from engine.optim import param_groups

    m = build_mae(DIGITS_MODEL, TINY_MAE)
    names = {id(p): n for n, p in m.named_parameters()}
    groups = param_groups(m, weight_decay=0.05, layer_decay=1.0)
    decayed = {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    plain = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert {"cls_token", "mask_token", "patch_embed.proj.weight", "decoder_pred.weight"} <= decayed
    assert all(m.get_parameter(n).ndim == 1 for n in plain)  # biases and norms only
    assert "pos_embed" not in decayed | plain and "decoder_pos_embed" not in decayed | plain  # frozen


# --- checkpoints: MAE's exact layout -------------------------------------------------------------------------
def test_wrong_shape_names_the_key_and_both_shapes(tmp_path):
    sd = build_mae(DIGITS_MODEL, TINY_MAE).state_dict()
    sd["blocks.1.attn.qkv.weight"] = torch.zeros(96, 64)
    path = tmp_path / "bad.pth"
    torch.save({"model": sd, "args": argparse.Namespace(model="mae_vit_digits")}, path)
    model = build_model(DIGITS_MODEL)
    with pytest.raises(UserError) as err:
        init_from_checkpoint(model, str(path))
    msg = str(err.value)
    assert "blocks.1.attn.qkv.weight" in msg and "(96, 64)" in msg and "(192, 64)" in msg


def test_our_encoder_state_dict_loads_into_finetune_model():
    torch.manual_seed(0)
    mae = build_mae(DIGITS_MODEL, TINY_MAE)
    enc = encoder_state_dict(mae)
    assert not any(k.startswith("decoder_") or k == "mask_token" for k in enc)
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.3.mlp.fc2.bias", "norm.weight"} <= set(enc)
    model = build_model(DIGITS_MODEL)
    report = load_weights(model, enc, "pretrain", verbose=False)
    assert set(report["ignored"]) == {"norm.weight", "norm.bias"}
    assert set(report["new"]) == {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}
    assert set(report["loaded"]) == set(enc) - {"norm.weight", "norm.bias"}
    torch.testing.assert_close(model.blocks[2].attn.qkv.weight, mae.blocks[2].attn.qkv.weight, rtol=0, atol=0)
    torch.testing.assert_close(model.pos_embed, mae.pos_embed, rtol=0, atol=0)


# --- the stage -----------------------------------------------------------------------------------------------


# --- a short run: the reconstruction loss falls ---------------------------------------------------------------
