"""The teacher's geometric augmentations and their exact inverses (paper eq. 1).

A table as data: each augmentation is a forward op and its inverse, both exact
tensor permutations (``torch.flip`` / ``torch.rot90``), so
``inverse(forward(x)) == x`` bit for bit on any ``(..., H, W)`` tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from qtlib.config.types import MEAN_LABEL
from qtlib.util.checks import check_shape

Op = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class GeometricAug:
    """One augmentation A_k with its inverse A_k^-1."""

    name: str
    forward: Op
    inverse: Op


AUGMENTATIONS: dict[str, GeometricAug] = {
    "identity": GeometricAug("identity", lambda x: x, lambda x: x),
    "hflip": GeometricAug("hflip", lambda x: torch.flip(x, dims=(-1,)), lambda x: torch.flip(x, dims=(-1,))),
    "vflip": GeometricAug("vflip", lambda x: torch.flip(x, dims=(-2,)), lambda x: torch.flip(x, dims=(-2,))),
    "rot90": GeometricAug("rot90", lambda x: torch.rot90(x, 1, dims=(-2, -1)),
                          lambda x: torch.rot90(x, -1, dims=(-2, -1))),
    # the rest of the dihedral group, for a larger self-ensemble (``label.mean_label``); not in the paper
    "rot180": GeometricAug("rot180", lambda x: torch.rot90(x, 2, dims=(-2, -1)),
                           lambda x: torch.rot90(x, -2, dims=(-2, -1))),
    "rot270": GeometricAug("rot270", lambda x: torch.rot90(x, -1, dims=(-2, -1)),
                           lambda x: torch.rot90(x, 1, dims=(-2, -1))),
    "transpose": GeometricAug("transpose", lambda x: x.transpose(-2, -1), lambda x: x.transpose(-2, -1)),
    "transverse": GeometricAug("transverse", lambda x: torch.rot90(x, 2, dims=(-2, -1)).transpose(-2, -1),
                               lambda x: torch.rot90(x.transpose(-2, -1), 2, dims=(-2, -1))),
}


def get_augmentations(names: Sequence[str]) -> list[GeometricAug]:
    """Look up augmentations by name; unknown names are an error listing the valid ones."""
    unknown = [n for n in names if n not in AUGMENTATIONS]
    if unknown:
        raise ValueError(f"augmentations: unknown {unknown}; valid: {sorted(AUGMENTATIONS)}")
    return [AUGMENTATIONS[n] for n in names]


def restore_augmented(
    restore: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, augs: Sequence[GeometricAug]
) -> torch.Tensor:
    """Eq. (1) for a batch: ``I_k = A_k^-1(f(A_k(x)))`` for every k, in ONE call of ``restore``.

    Args:
        restore: the teacher, ``(N, C, H, W) -> (N, C, H, W)``.
        images: ``(B, C, H, W)``, square (rot90 must keep the shape so the views stack).
        augs: the K augmentations.

    Returns:
        ``(B, K, C, H, W)`` pseudo-labels in the original coordinates.
    """
    check_shape(images, ["B", "C", "H", "W"], "images")
    if images.shape[-1] != images.shape[-2] and any(a.name == "rot90" for a in augs):
        raise ValueError(f"images: rot90 needs square images to batch the views, got {tuple(images.shape[-2:])}")
    b = images.shape[0]
    stacked = torch.cat([a.forward(images) for a in augs], dim=0)
    out = restore(stacked)
    views = [a.inverse(v) for a, v in zip(augs, out.split(b, dim=0), strict=True)]
    return torch.stack(views, dim=1)


def restore_views(
    restore: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    augs: Sequence[GeometricAug],
    tile: int = 0,
    restore_tiled: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Eq. (1) for a batch of one size, any shape: every augmentation's view in input coordinates.

    Square images: all views in one call (:func:`restore_augmented`). Otherwise the views
    are grouped by their shape (hflip/vflip keep it, rot90 swaps it), one call per group.
    Above ``tile`` px (longer side) each view of each image is restored alone by ``restore_tiled``.

    Args:
        restore: the teacher, ``(N, C, H, W) -> (N, C, H, W)``.
        images: ``(B, C, H, W)``, one size.
        augs: the K augmentations.
        tile: longer side above which ``restore_tiled`` is used (0 = never).
        restore_tiled: the teacher on one ``(C, H, W)`` image, tile by tile (needed when ``tile`` > 0).

    Returns:
        ``(B, K, C, H, W)`` views in the original coordinates.
    """
    check_shape(images, ["B", "C", "H", "W"], "images")
    h, w = images.shape[-2:]
    if tile and max(h, w) > tile:
        if restore_tiled is None:
            raise ValueError(f"restore_tiled: needed for images above tile={tile} px, got None")
        return torch.stack([torch.stack([a.inverse(restore_tiled(a.forward(img))) for a in augs])
                            for img in images])
    if h == w:
        return restore_augmented(restore, images, augs)
    views: list[torch.Tensor | None] = [None] * len(augs)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, a in enumerate(augs):
        by_shape.setdefault(tuple(a.forward(images[:1, :1]).shape[-2:]), []).append(i)
    b = images.shape[0]
    for members in by_shape.values():  # the views of one group share a shape: one call
        out = restore(torch.cat([augs[i].forward(images) for i in members])).split(b)
        for i, y in zip(members, out, strict=True):
            views[i] = augs[i].inverse(y)
    return torch.stack(views, dim=1)  # type: ignore[arg-type]


def pick_labels(views: torch.Tensor, view_names: Sequence[str], label_names: Sequence[str]) -> torch.Tensor:
    """The pseudo-labels of a batch, in ``label_names`` order: each one a view, or ``mean``, their pixel mean.

    Label ensembling (``label.mean_label``): the mean of the inverse-mapped views is the
    teacher's self-ensemble, a label better than any single view when the views err
    independently; with ``label.view_labels: false`` it is the image's only label.

    Args:
        views: ``(B, K, C, H, W)`` the views of ``view_names``, in input coordinates (:func:`restore_views`).
        view_names: the K view names; label_names: the labels (``LabelConfig.label_names``).

    Returns:
        ``(B, len(label_names), C, H, W)``.
    """
    check_shape(views, ["B", len(view_names), "C", "H", "W"], "views")
    out = []
    for name in label_names:
        if name == MEAN_LABEL:
            out.append(views.mean(dim=1))
        elif name in view_names:
            out.append(views[:, list(view_names).index(name)])
        else:
            raise ValueError(f"label_names: {name!r} is neither a view ({', '.join(view_names)}) nor {MEAN_LABEL!r}")
    return torch.stack(out, dim=1)


#: The size of the dihedral group of the square: 4 rotations, each with or without a flip.
DIHEDRAL = 8


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """Element ``k`` (0..7) of the dihedral group on the last two dims: ``k % 4`` quarter turns, then a
    horizontal flip when ``k >= 4``. Contains every view of :data:`AUGMENTATIONS` (hflip = 4, rot90 = 1,
    vflip = 6), so a model trained on it has seen every view the teacher labels with.

    Args:
        x: ``(..., H, W)``; k: 0..7 (0 = identity).
    """
    if not 0 <= k < DIHEDRAL:
        raise ValueError(f"k: expected 0 <= k < {DIHEDRAL}, got {k}")
    y = torch.rot90(x, k % 4, dims=(-2, -1)) if k % 4 else x
    return torch.flip(y, dims=(-1,)) if k >= 4 else y
