"""kit.models: registry, 4-channel stem from RGB weights, head with embedding, pretrained errors."""
from __future__ import annotations

import pytest
import torch

from kit.errors import KitError
from kit.models import (
    adapt_input_conv,
    build_model,
    load_fold_models,
    preprocess,
    unwrap,
)



@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50"])
def test_registry_builds_4_channels_19_outputs(name):
    model = build_model(name).eval()
    stem = model.features[0]
    assert stem.in_channels == 4
    x = preprocess(torch.randint(0, 256, (2, 4, 32, 32), dtype=torch.uint8))
    with torch.no_grad():
        logits = model(x)
        logits2, emb = model(x, return_embedding=True)
    assert logits.shape == (2, 19)
    assert emb.shape == (2, model.embedding_dim)
    assert torch.allclose(logits, logits2)


def test_unknown_backbone_is_config_error():
    with pytest.raises(KitError, match="unknown backbone 'resnet9000'"):
        build_model("resnet9000")


def test_head_options_pool_neck_dropout():
    model = build_model("resnet18", pool="avgmax", embedding_dim=32, dropout=0.5).eval()
    with torch.no_grad():
        logits, emb = model(torch.zeros(3, 4, 32, 32), return_embedding=True)
    assert emb.shape == (3, 32) and logits.shape == (3, 19)
    assert model.fc.in_features == 32


def test_catavgmax_concatenates_and_the_old_name_still_works():
    from kit.config import load_config

    model = build_model("resnet18", pool="catavgmax")
    assert model.pool.kind == "catavgmax" and model.fc.in_features == 2 * 512
    with pytest.warns(DeprecationWarning, match="catavgmax"):
        old = build_model("resnet18", pool="avgmax")
    assert old.pool.kind == "catavgmax" and old.fc.in_features == 2 * 512
    with pytest.warns(DeprecationWarning, match="catavgmax"):
        cfg = load_config(None, ["model.pool=avgmax"])
    assert cfg.cell_model.pool == cfg.image_model.pool == "catavgmax"


def test_adapt_input_conv_matches_timm_rule():
    w = torch.randn(8, 3, 7, 7)
    w4 = adapt_input_conv(4, w)
    assert w4.shape == (8, 4, 7, 7)
    # RGB kernels repeated over the 4 channels (R G B R) and scaled by 3/4.
    assert torch.allclose(w4[:, :3], w * 0.75)
    assert torch.allclose(w4[:, 3], w[:, 0] * 0.75)
    assert torch.allclose(adapt_input_conv(1, w), w.sum(dim=1, keepdim=True))
    assert torch.equal(adapt_input_conv(3, w), w)


def test_pretrained_file_initialises_stem_from_rgb(tmp_path):
    import torchvision

    torch.manual_seed(0)
    ref = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18-f37072fd.pth"
    torch.save(ref.state_dict(), path)
    model = build_model("resnet18", pretrained=path)
    stem = model.features[0].weight
    assert torch.allclose(stem, adapt_input_conv(4, ref.conv1.weight.detach()))
    # the rest of the backbone is loaded as is, the new 19-way head is not
    assert torch.equal(model.features[7][1].conv2.weight, ref.layer4[1].conv2.weight)
    assert torch.equal(model.features[1].running_var, ref.bn1.running_var)


def test_pretrained_weights_of_another_backbone_are_refused(tmp_path):
    import torchvision

    path = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    with pytest.raises(KitError, match="do not fit backbone resnet50"):
        build_model("resnet50", pretrained=path)


def test_missing_pretrained_file_says_what_to_attach(tmp_path):
    missing = tmp_path / "weights" / "resnet50-0676ba61.pth"
    with pytest.raises(KitError) as info:
        build_model("resnet50", pretrained=missing)
    msg = str(info.value)
    assert str(missing) in msg
    assert "resnet50-0676ba61.pth" in msg and "attach" in msg


def test_preprocess_uint8_and_float_agree():
    x = torch.randint(0, 256, (2, 4, 8, 8), dtype=torch.uint8)
    a = preprocess(x)
    b = preprocess(x.float() / 255.0)
    assert a.dtype == torch.float32 and torch.allclose(a, b)
    assert x.dtype == torch.uint8  # input untouched


def test_load_fold_models_reads_checkpoints(tmp_path):
    from kit.config import Config, to_dict

    cfg = Config()
    cfg.cell_model.backbone = "resnet18"
    for fold in (1, 0):
        torch.manual_seed(fold)
        m = build_model("resnet18", dropout=cfg.cell_model.dropout)
        d = tmp_path / "cell" / f"fold{fold}"
        d.mkdir(parents=True)
        torch.save({"model": m.state_dict(), "config": to_dict(cfg), "epoch": 1}, d / "best.pt")
    models = load_fold_models(tmp_path, "cell", "cpu")
    assert len(models) == 2 and not models[0].training
    torch.manual_seed(0)
    ref = build_model("resnet18")
    assert torch.equal(unwrap(models[0]).fc.weight, ref.fc.weight)
    with pytest.raises(KitError, match="no best.pt"):
        load_fold_models(tmp_path, "image", "cpu")
