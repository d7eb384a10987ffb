"""BRISQUE as a loss with a fast gradient: pyiqa's computation, its Gaussian filter's backward replaced.

pyiqa's BRISQUE filters a one-channel image with a 7x7 Gaussian four times (mean
and second moment, two scales). On CPU, PyTorch's backward of such a
single-channel convolution takes a slow im2col path (about 10x the forward:
~20 ms against ~2 ms for 8 images of 96 px, one thread), and it was the largest
single cost of the training reward. The gradient of a valid correlation with
kernel k is a full correlation of the incoming gradient with the flipped k, which
is again a forward convolution (the fast path). :class:`_ValidCorrelation` does
exactly that; the forward is pyiqa's own ``F.conv2d`` call, so scores are
bit-identical and gradients agree to float32 rounding
(``tests/test_iqa_fast.py``).

Everything else (Y channel, MATLAB ``imresize``, GGD/AGGD fits, the SVR) is
pyiqa's own functions, called in pyiqa's order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pyiqa.archs.brisque_arch import rbf_kernel, scale_features
from pyiqa.archs.func_util import estimate_aggd_param, estimate_ggd_param, safe_sqrt
from pyiqa.matlab_utils import fspecial, imresize
from pyiqa.matlab_utils.padding import exact_padding_2d
from pyiqa.utils.color_util import to_y_channel
from torch import Tensor, nn


class _ValidCorrelation(torch.autograd.Function):
    """``F.conv2d(x, k)`` (no padding) whose input gradient is itself a forward convolution.

    The kernel is a constant (no gradient). Shapes: x (N, C, H, W), k (C', C, kh, kw).
    """

    @staticmethod
    def forward(ctx, x: Tensor, kernel: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(kernel)
        return F.conv2d(x, kernel)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (kernel,) = ctx.saved_tensors
        kh, kw = kernel.shape[-2:]
        # d/dx of sum_u k[u] x[i+u] is the full correlation of grad with k flipped (and in/out swapped)
        full = F.pad(grad, (kw - 1, kw - 1, kh - 1, kh - 1))
        return F.conv2d(full, kernel.flip(-1, -2).transpose(0, 1)), None


def imfilter_same(img: Tensor, kernel: Tensor) -> Tensor:
    """pyiqa's ``imfilter(img, kernel, padding='same')`` (zero padding), with the fast backward."""
    padded = exact_padding_2d(img, kernel.shape[-2:], 1, 1, "same")
    return _ValidCorrelation.apply(padded, kernel)


def normalize_img_with_gauss(img: Tensor, kernel_size: int = 7, sigma: float = 7.0 / 6, c: float = 1.0) -> Tensor:
    """pyiqa's ``func_util.normalize_img_with_gauss`` (padding 'same'), with the fast filter."""
    kernel = fspecial(kernel_size, sigma, 1).to(img)
    mu = imfilter_same(img, kernel)
    second = imfilter_same(img**2, kernel)
    return (img - mu) / (safe_sqrt((second - mu**2).abs()) + c)


def natural_scene_statistics(luma: Tensor, kernel_size: int = 7, sigma: float = 7.0 / 6) -> Tensor:
    """pyiqa's ``brisque_arch.natural_scene_statistics`` (18 features per image), with the fast filter."""
    norm = normalize_img_with_gauss(luma, kernel_size, sigma)
    alpha, sig = estimate_ggd_param(norm)
    features = [alpha, sig.pow(2)]
    for shift in ((0, 1), (1, 0), (1, 1), (-1, 1)):
        alpha, sigma_l, sigma_r = estimate_aggd_param(norm * torch.roll(norm, shifts=shift, dims=(-2, -1)),
                                                      return_sigma=True)
        eta = (sigma_r - sigma_l) * torch.exp(
            torch.lgamma(2.0 / alpha) - (torch.lgamma(1.0 / alpha) + torch.lgamma(3.0 / alpha)) / 2)
        features.extend((alpha, eta, sigma_l.pow(2), sigma_r.pow(2)))
    return torch.stack(features, dim=-1)


def brisque(x: Tensor, kernel_size: int, kernel_sigma: float, sv_coef: Tensor, sv: Tensor, gamma: float,
            rho: float) -> Tensor:
    """pyiqa's ``brisque(..., version='original')``.

    Args:
        x: (N, 3, H, W) in [0, 1].

    Returns:
        (N, 1) BRISQUE scores.
    """
    y = to_y_channel(x, 255.0)
    feats = []
    for _ in range(2):
        feats.append(natural_scene_statistics(y, kernel_size, kernel_sigma))
        y = imresize(y, scale=0.5, antialiasing=True)
    kernel = rbf_kernel(features=scale_features(torch.cat(feats, dim=-1)), sv=sv.to(x).t(), gamma=gamma)
    return kernel @ sv_coef.to(x) - rho


class FastBRISQUE(nn.Module):
    """Drop-in for pyiqa's ``BRISQUE`` arch (``version='original'``), same parameters, fast backward.

    Args:
        arch: the built ``pyiqa.archs.brisque_arch.BRISQUE``.

    Raises:
        ValueError: ``arch`` is not the 'original' version (the MATLAB variant is not covered).
    """

    def __init__(self, arch: nn.Module) -> None:
        super().__init__()
        if getattr(arch, "version", None) != "original" or not arch.test_y_channel:
            raise ValueError("arch: FastBRISQUE covers pyiqa's BRISQUE version='original' with test_y_channel")
        self.kernel_size, self.kernel_sigma = arch.kernel_size, arch.kernel_sigma
        self.sv_coef, self.sv = arch.sv_coef, arch.sv  # sv already divided by arch.scale (1 for 'original')
        self.gamma, self.rho = arch.gamma, arch.rho

    def forward(self, x: Tensor) -> Tensor:
        return brisque(x, self.kernel_size, self.kernel_sigma, self.sv_coef, self.sv, self.gamma, self.rho)
