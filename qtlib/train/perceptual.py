"""L_per: a perceptual distance between the student's output and its target.

The paper uses VGG features. Offline there may be no VGG weights, so ``auto``
picks VGG16 when torchvision's ImageNet weights are already in the torch hub
cache and otherwise a weight-free full-reference distance from pyiqa. Which
one ran is returned by :func:`resolve_perceptual` and logged by the loops.

The pyiqa distances are called through ``pyiqa.create_metric`` directly: they
are full-reference, weight-free losses, not members of the IQA catalog of
``qtlib.iqa`` (which lists the no-reference metrics the ensemble may use).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from qtlib.config.types import Perceptual

_log = logging.getLogger(__name__)

#: The torchvision VGG16 ImageNet weight file (``VGG16_Weights.IMAGENET1K_V1``).
VGG16_FILE = "vgg16-397923af.pth"


@dataclass(frozen=True)
class PyiqaDistance:
    """A weight-free pyiqa full-reference metric used as a loss."""

    pyiqa_name: str
    min_size: int
    """Smallest input side the metric accepts (measured with pyiqa 0.1.16)."""


#: Facts about the weight-free distances, as data. NLPD works at any patch
#: size; pyiqa's MS-SSIM (5 scales, 11 px window) needs at least 176 px.
DISTANCES: dict[str, PyiqaDistance] = {
    "nlpd": PyiqaDistance("nlpd", min_size=16),
    "ms_ssim": PyiqaDistance("ms_ssim", min_size=176),
}


def vgg16_weights_path() -> Path:
    """Where torchvision keeps the VGG16 weights: ``torch.hub.get_dir()/checkpoints``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE


def resolve_perceptual(kind: Perceptual, patch_size: int) -> str:
    """The perceptual loss that will run: ``auto`` -> ``vgg`` if its weights are cached, else ``nlpd``.

    Raises:
        ValueError: ``vgg`` without cached weights, or a distance that cannot take ``patch_size``.
    """
    if kind == "auto":
        kind = "vgg" if vgg16_weights_path().is_file() else "nlpd"
    if kind == "vgg" and not vgg16_weights_path().is_file():
        raise ValueError(
            f"perceptual 'vgg': torchvision's VGG16 weights are not at {vgg16_weights_path()}; place "
            f"{VGG16_FILE} there (from a connected machine), or use 'auto', 'nlpd' or 'none'"
        )
    if kind in DISTANCES and patch_size < DISTANCES[kind].min_size:
        raise ValueError(
            f"perceptual {kind!r} needs patches of at least {DISTANCES[kind].min_size} px, the patch size "
            f"is {patch_size}; use 'nlpd' or a larger patch_size"
        )
    if kind not in ("vgg", "none", *DISTANCES):
        raise ValueError(f"perceptual: got {kind!r}, expected auto, vgg, none or one of {', '.join(DISTANCES)}")
    return kind


class VGGPerceptual(nn.Module):
    """Mean L1 distance of VGG16 features (relu1_2, relu2_2, relu3_3), ImageNet-normalized inputs.

    Shape:
        - pred, target: (B, 3, H, W) in [0, 1].
        - Output: (B,).
    """

    layers = (3, 8, 15)  # indices of relu1_2, relu2_2, relu3_3 in vgg16().features

    def __init__(self, weights: str | Path | None = None) -> None:
        super().__init__()
        from torchvision.models import vgg16

        net = vgg16(weights=None).features[: self.layers[-1] + 1]
        state = torch.load(weights or vgg16_weights_path(), map_location="cpu", weights_only=True)
        net.load_state_dict({k.removeprefix("features."): v for k, v in state.items()
                             if k.startswith("features.") and int(k.split(".")[1]) <= self.layers[-1]})
        self.net = net.eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        x = torch.cat([pred, target]).sub(self.mean).div(self.std)
        total = torch.zeros(pred.shape[0], device=pred.device)
        for i, layer in enumerate(self.net):
            x = layer(x)
            if i in self.layers:
                a, b = x.chunk(2)
                total = total + F.l1_loss(a, b, reduction="none").mean(dim=(1, 2, 3))
        return total / len(self.layers)


class PyiqaPerceptual(nn.Module):
    """A pyiqa full-reference metric as a per-sample loss: the metric if lower is better, else 1 - metric."""

    def __init__(self, distance: PyiqaDistance, device: torch.device | str = "cpu") -> None:
        super().__init__()
        import pyiqa

        self.metric = pyiqa.create_metric(distance.pyiqa_name, as_loss=True, loss_reduction="none",
                                          device=torch.device(device)).eval()
        self.metric.requires_grad_(False)
        self.lower_better = bool(self.metric.lower_better)

    def train(self, mode: bool = True) -> PyiqaPerceptual:
        return super().train(False)  # a frozen metric stays in eval mode under a parent's .train()

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        score = self.metric(pred.float(), target.float()).reshape(pred.shape[0])
        return score if self.lower_better else 1.0 - score


def build_perceptual(kind: str, device: torch.device | str = "cpu") -> nn.Module | None:
    """The per-sample perceptual loss module for a resolved ``kind`` (None for ``none``)."""
    if kind == "none":
        return None
    module = VGGPerceptual() if kind == "vgg" else PyiqaPerceptual(DISTANCES[kind], device)
    _log.info("perceptual loss: %s", kind)
    return module.to(device)
