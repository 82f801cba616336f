"""The CNN backbones features are extracted with: a registry of torchvision models.

Each :class:`BackboneSpec` names a torchvision model builder, the ImageNet weights
whose ``transforms()`` preprocess its input, and the graph nodes (as listed by
``torchvision.models.feature_extraction.get_graph_node_names``) whose outputs are
stored: a pooled vector per image and, optionally, a spatial map ``[C, H, W]``
stored as ``[H*W, C]`` (regions x channels) for ACF. Adding a backbone is one
entry in :data:`BACKBONES`, e.g.::

    BackboneSpec("vgg16", models.vgg16, models.VGG16_Weights.IMAGENET1K_V1, pooled_node="classifier.4"),
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torchvision import models
from torchvision.models import WeightsEnum
from torchvision.models.feature_extraction import create_feature_extractor

_NAME = re.compile(r"^[a-z0-9_]+$")


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    builder: Callable[..., nn.Module]
    weights: WeightsEnum
    pooled_node: str
    spatial_node: str | None = None
    # Bump after a fix that changes the features this backbone computes: rows stored at an older
    # revision are recomputed by the next extraction.
    revision: int = 0

    def __post_init__(self) -> None:
        # The name becomes an asset key and a folder name.
        if not _NAME.match(self.name):
            raise ValueError(f"backbone name {self.name!r} must match {_NAME.pattern}")

    def transforms(self) -> nn.Module:
        """The preprocessing the declared weights were trained with (resize, centre crop, normalise)."""
        return self.weights.transforms()

    @property
    def return_nodes(self) -> dict[str, str]:
        """graph node -> output key"""
        nodes = {self.pooled_node: "pooled"}
        if self.spatial_node:
            nodes[self.spatial_node] = "spatial"
        return nodes

    def hooked_extractor(self, model: nn.Module) -> nn.Module | None:
        """The same outputs as :meth:`feature_extractor`, read off ``model``'s own forward by hooks:
        nothing to trace or fold, so it is built in microseconds instead of ~0.25 s (ResNet-50) and
        suits a handful of images. None when a node is not a submodule (a function call in the graph)."""
        names = {name for name, _ in model.named_modules()}
        if not all(node in names for node in self.return_nodes):
            return None
        return HookedExtractor(model, self.return_nodes)

    def feature_extractor(self, model: nn.Module) -> nn.Module:
        """One forward pass giving ``{"pooled": ..., "spatial": ...}`` (inference only: batch norms are folded)."""
        return create_feature_extractor(fold_batchnorm(model.eval()), return_nodes=self.return_nodes).eval()


class HookedExtractor(nn.Module):
    """``{key: output of submodule}`` for the submodules named in ``nodes``, captured by forward hooks
    while the whole model runs (the layers after the last node cost little: ResNet's fc, AlexNet's fc8).
    The hooks exist only during a forward, so ``model`` stays as it was for anyone else using it."""

    def __init__(self, model: nn.Module, nodes: dict[str, str]):
        super().__init__()
        self.model = model
        self.nodes = dict(nodes)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        outputs: dict[str, torch.Tensor] = {}

        def keep(key: str, _module: nn.Module, _args, output: torch.Tensor) -> None:
            # a copy: a later in-place layer (ReLU(inplace=True)) must not change what was captured
            outputs[key] = output.clone()

        handles = [
            self.model.get_submodule(node).register_forward_hook(functools.partial(keep, key))
            for node, key in self.nodes.items()
        ]
        try:
            self.model(x)
        finally:
            for handle in handles:
                handle.remove()
        return outputs


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold each eval-mode BatchNorm2d that directly follows a Conv2d into that conv, in place.

    Module names stay as they are (the BatchNorm becomes an Identity), so graph node names such as
    ``layer4`` still address the same outputs. Saves one pass over every activation: about 10% of a
    ResNet-50 forward on CPU; results agree to float rounding.
    """
    if model.training:
        raise ValueError("batch norm folding is for inference: call model.eval() first")
    modules = dict(model.named_modules())
    graph = torch.fx.symbolic_trace(model).graph
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.BatchNorm2d):
            continue
        conv = node.args[0]
        if not (
            isinstance(conv, torch.fx.Node)
            and conv.op == "call_module"
            and isinstance(modules.get(conv.target), nn.Conv2d)
            and len(conv.users) == 1
            and calls[conv.target] == 1
            and calls[node.target] == 1
        ):
            continue
        model.set_submodule(conv.target, fuse_conv_bn_eval(modules[conv.target], modules[node.target]))
        model.set_submodule(node.target, nn.Identity())
    return model


BACKBONES: dict[str, BackboneSpec] = {
    s.name: s
    for s in (
        # pooled: the 2048-d global average pool; spatial: layer4, 7x7 regions x 2048 channels at 224x224.
        BackboneSpec(
            "resnet50", models.resnet50, models.ResNet50_Weights.IMAGENET1K_V2, pooled_node="avgpool", spatial_node="layer4"
        ),
        # pooled: fc7, the 4096-d ReLU output of the second fully connected layer (classifier.5), i.e. the last
        # layer before the 1000-way classifier, as the tutorial (model.classifier minus its last Linear) and
        # VBPR's 4096-d "deep CNN features" used; more compact and more semantic than the 9216-d conv pool.
        # revision 1: the bf16 copy of the extractor had come back in training mode, so Dropout ran
        # (bf16 features had a cosine of about 0.77 to fp32; now 0.99999).
        BackboneSpec(
            "alexnet", models.alexnet, models.AlexNet_Weights.IMAGENET1K_V1, pooled_node="classifier.5", revision=1
        ),
    )
}


def get_backbone(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        raise KeyError(f"unknown backbone {name!r}; registered: {sorted(BACKBONES)}") from None


@functools.lru_cache(maxsize=None)  # a meta-device model build per call is ~0.5 s of a small refresh
def output_shapes(spec: BackboneSpec) -> tuple[int, tuple[int, int] | None]:
    """(pooled dim, (regions, channels) or None) for the declared input size, computed on the meta device."""
    crop = int(spec.transforms().crop_size[0])
    with torch.device("meta"):
        extractor = spec.feature_extractor(spec.builder(weights=None))
    with torch.inference_mode():
        out = extractor(torch.empty(1, 3, crop, crop, device="meta"))
    pooled = int(out["pooled"].flatten(1).shape[1])
    spatial = None
    if "spatial" in out:
        _, c, h, w = out["spatial"].shape
        spatial = (int(h * w), int(c))
    return pooled, spatial
