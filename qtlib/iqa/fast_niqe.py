"""NIQE with float32 features: pyiqa's computation, only the final Gaussian fit in float64.

pyiqa computes NIQE entirely in float64 ("critical to be consistent with
MATLAB"); on a GPU float64 runs at a fraction of float32's rate and the feature
extraction (Gaussian normalization, per-block GGD/AGGD fits on two scales) is
almost all the time. Here the image and the features stay in float32; the
multivariate Gaussian fit (mean, covariance, pseudo-inverse and the distance,
eq. 10) is done in float64 on the few features, where precision matters. Scores
agree with pyiqa's float64 NIQE on pyiqa's ``ResultsCalibra`` images within
:data:`TOLERANCE` (``tests/test_iqa_fast.py`` measures the largest difference:
0.031 on dist I19, 9.07 -> 9.10; the other nine images within 0.011).

Where the difference comes from (measured): NIQE fits asymmetric Gaussians to
the normalized image and counts the pixels below and above zero; in flat or
saturated regions the normalized values are rounding noise whose signs differ
between float32 and float64, so those counts (and the fit) move. That is how
well NIQE itself is conditioned there, not a defect of either precision;
centering the image before filtering (less cancellation in E[x^2] - E[x]^2) made
I19 worse (0.36), not better, and float64 lookups of the AGGD shape changed nothing.
"""

from __future__ import annotations


import torch
from pyiqa.archs.func_util import diff_round, normalize_img_with_gauss
from pyiqa.archs.niqe_arch import compute_feature
from pyiqa.matlab_utils import blockproc, imresize, nancov, nanmean
from pyiqa.utils.color_util import to_y_channel
from torch import Tensor, nn

TOLERANCE = 0.05
"""Largest accepted |float32 path - pyiqa float64| in NIQE units (scores 2.8..15.7 there); measured 0.031."""


def niqe_features(y: Tensor, block: int = 96) -> Tensor:
    """pyiqa's NIQE patch features (both scales) of a Y image on 0..255, in its dtype.

    Args:
        y: (N, 1, H, W), H and W at least ``block``.

    Returns:
        (N, n_blocks, 36) features.
    """
    h, w = y.shape[-2:]
    img = y[..., : (h // block) * block, : (w // block) * block]
    feats = []
    for scale in (1, 2):
        norm = normalize_img_with_gauss(img, padding="replicate")
        feats.append(blockproc(norm, [block // scale, block // scale], fun=compute_feature))
        if scale == 1:
            img = imresize(img / 255.0, scale=0.5, antialiasing=True) * 255.0
    return torch.cat(feats, -1)


def niqe_distance(feats: Tensor, mu_pris: Tensor, cov_pris: Tensor) -> Tensor:
    """Eq. 10 of NIQE in float64: distance of the features' Gaussian fit from the pristine model. Returns (N,)."""
    f = feats.double()
    n = f.shape[0]
    mu = mu_pris.to(f).repeat(n, 1)
    cov = cov_pris.to(f).repeat(n, 1, 1)
    invcov = torch.linalg.pinv((cov + nancov(f)) / 2)
    diff = (mu - nanmean(f, dim=1)).unsqueeze(1)
    return torch.bmm(torch.bmm(diff, invcov), diff.transpose(1, 2)).reshape(n).sqrt()


class Float32NIQE(nn.Module):
    """Drop-in for pyiqa's ``NIQE`` arch (no crop border, Y of YIQ), float32 features.

    Args:
        arch: the built ``pyiqa.archs.niqe_arch.NIQE``.

    Raises:
        ValueError: an arch configuration this path does not cover.
    """

    def __init__(self, arch: nn.Module) -> None:
        super().__init__()
        if arch.crop_border != 0 or not arch.test_y_channel:
            raise ValueError("arch: Float32NIQE covers pyiqa's NIQE with crop_border=0 and test_y_channel")
        self.color_space = arch.color_space
        self.mu_pris_param, self.cov_pris_param = arch.mu_pris_param, arch.cov_pris_param

    def forward(self, x: Tensor) -> Tensor:
        y = to_y_channel(x, 255, self.color_space) if x.shape[1] == 3 else x * 255
        y = diff_round(y).float()
        return niqe_distance(niqe_features(y), self.mu_pris_param, self.cov_pris_param)
