"""The teacher's augmentations: exact inverses, one batched forward."""

from __future__ import annotations

import pytest
import torch

from qtlib.augment import AUGMENTATIONS, get_augmentations, restore_augmented


@pytest.mark.parametrize("name", sorted(AUGMENTATIONS))
def test_inverse_reproduces_identity_exactly(name: str) -> None:
    x = torch.rand(2, 3, 7, 7)
    aug = AUGMENTATIONS[name]
    assert torch.equal(aug.inverse(aug.forward(x)), x)
    if name != "identity":
        assert not torch.equal(aug.forward(x), x)


def test_the_eight_views_are_the_dihedral_group() -> None:
    """identity, the flips, the turns and the two transposes: eight different maps, each one element of
    :func:`qtlib.augment.dihedral` (the training turns), so a model trained with train.geometric has seen
    every view; rot90 and rot270 are each other's inverse."""
    from qtlib.augment import DIHEDRAL, dihedral

    x = torch.rand(1, 3, 6, 6)
    outs = {name: aug.forward(x) for name, aug in AUGMENTATIONS.items()}
    assert len(outs) == DIHEDRAL
    group = [dihedral(x, k) for k in range(DIHEDRAL)]
    matched = {name: [k for k, g in enumerate(group) if torch.equal(g, y)] for name, y in outs.items()}
    assert all(len(ks) == 1 for ks in matched.values()), matched
    assert sorted(ks[0] for ks in matched.values()) == list(range(DIHEDRAL))
    assert torch.equal(AUGMENTATIONS["rot270"].forward(x), AUGMENTATIONS["rot90"].inverse(x))


def test_rot90_inverse_on_non_square() -> None:
    x = torch.rand(1, 3, 5, 9)
    aug = AUGMENTATIONS["rot90"]
    assert aug.forward(x).shape[-2:] == (9, 5)
    assert torch.equal(aug.inverse(aug.forward(x)), x)


def test_restore_augmented_one_call_and_equivariant_model_gives_identical_labels() -> None:
    calls = []

    def pointwise(x: torch.Tensor) -> torch.Tensor:  # equivariant to any permutation of pixels
        calls.append(x.shape[0])
        return x * 0.5 + 0.1

    x = torch.rand(4, 3, 8, 8)
    augs = get_augmentations(["hflip", "vflip", "rot90"])
    pls = restore_augmented(pointwise, x, augs)
    assert calls == [12]  # all three views of the batch in one forward
    assert pls.shape == (4, 3, 3, 8, 8)
    for k in range(3):
        assert torch.equal(pls[:, k], x * 0.5 + 0.1)


def test_restore_augmented_maps_back_to_original_coordinates() -> None:
    # A position-dependent "model" (adds a ramp) shows each label is mapped back by its own inverse.
    ramp = torch.linspace(0, 1, 8).view(1, 1, 1, 8)
    x = torch.zeros(1, 3, 8, 8)
    pls = restore_augmented(lambda t: t + ramp, x, get_augmentations(["hflip", "vflip"]))
    assert torch.equal(pls[0, 0], torch.flip(ramp, dims=(-1,)).expand(1, 3, 8, 8)[0])
    assert torch.equal(pls[0, 1], ramp.expand(1, 3, 8, 8)[0])


def test_unknown_augmentation_is_named() -> None:
    with pytest.raises(ValueError, match="unknown \\['shear'\\]"):
        get_augmentations(["hflip", "shear"])
