"""Bank samples, epoch plans, rank slices and aligned reads of the training data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import zarr

from qtlib.data.store import StoreWriter, commit_path
from qtlib.train.samples import (
    BankReader,
    PairedReader,
    add_input_labels,
    best_pl_level,
    build_samples,
    draw_epoch_plan,
    input_label_kept,
    rank_slots,
    select_bank_rows,
    steps_per_epoch,
)


def _bank() -> pd.DataFrame:
    """Two images: a has three PLs (S 7.5, 5, 3), b has two (S 6, 4)."""
    rows = [
        ("a", 0, 0, 1, 0, 7.5), ("a", 0, 1, 1, 2, 5.0), ("a", 0, 2, 0, 1, 3.0),
        ("b", 1, 0, 0, 0, 6.0), ("b", 1, 1, 1, 1, 4.0),
    ]
    frame = pd.DataFrame(rows, columns=["image_id", "source_index", "rank", "shard", "aug_index", "S"])
    frame["store"] = [f"round_0/labels/shard_{k}.zarr" for k in frame["shard"]]
    frame["index"] = frame["source_index"]
    frame["blocks_S"] = [np.array([s, s, 1.0, 1.0], dtype=np.float32) for s in frame["S"]]
    return frame.sample(frac=1.0, random_state=3)  # order must not matter


def test_samples_top_level_targets_best_pl() -> None:
    s = build_samples(_bank(), "qualiteacher", top_score=7.0, score_condition=True)
    assert list(s.image_id) == ["a", "a", "a", "b", "b"]
    assert list(s.cond) == [7.0, 5.0, 3.0, 6.0, 4.0]  # clamped to the top level
    assert list(s.aug_index) == [0, 2, 1, 0, 1]  # a's top sample targets its best PL (aug 0)
    assert list(s.s_poor) == [3.0, 3.0, 3.0, 4.0, 4.0]
    assert s.blocks[1].tolist() == [5.0, 5.0, 1.0, 1.0]
    s6 = build_samples(_bank(), "qualiteacher", top_score=5.0, score_condition=True)
    assert list(s6.aug_index) == [0, 0, 1, 0, 1] and list(s6.store)[3] == "round_0/labels/shard_0.zarr"


def test_samples_unconditioned_and_filter_mt() -> None:
    s = build_samples(_bank(), "plain_mt", top_score=7.0, score_condition=False)
    assert list(s.cond) == [7.0] * 5 and list(s.aug_index) == [0, 2, 1, 0, 1]  # each PL is its own target
    f = build_samples(_bank(), "filter_mt", top_score=7.0, score_condition=False)
    assert list(f.image_id) == ["a", "b"] and list(f.aug_index) == [0, 0]
    assert len(select_bank_rows(_bank(), "filter_mt")) == 2
    with pytest.raises(ValueError, match="missing columns"):
        select_bank_rows(_bank().drop(columns="blocks_S"), "qualiteacher")


def test_input_labels_below_the_poorest_pl() -> None:
    pls = build_samples(_bank(), "qualiteacher", top_score=7.0, score_condition=True)
    s = add_input_labels(pls, {"b": 4.0, "a": 2.5}, top_score=7.0)  # b's input ties its poorest PL (4.0)
    assert len(s) == 6 and list(s.is_input) == [False] * 5 + [True]
    for f in ("image_id", "cond", "store", "index", "aug_index", "s_poor", "s_best"):
        assert list(getattr(s, f)[:5]) == list(getattr(pls, f)), f  # the PL samples unchanged, first
    assert (s.image_id[5], s.source_index[5], s.cond[5]) == ("a", 0, 2.5)  # condition = the input's own S
    assert (s.store[5], s.index[5], s.aug_index[5]) == ("", -1, -1)  # no PL pointer
    assert s.blocks[5].tolist() == [1.0] * 4 and (s.s_poor[5], s.s_best[5]) == (3.0, 7.5)
    assert not pls.is_input.any()  # the default
    kept = input_label_kept(pls, {"a": 3.0, "b": float("nan")}, top_score=7.0)
    assert not kept.any()  # at the poorest PL, or unscorable: no lower anchor
    assert input_label_kept(pls, {"a": 2.5, "b": 3.9}, top_score=7.0).all()
    assert not input_label_kept(pls, {"a": 2.5}, top_score=2.0).any()  # never at or above the top level
    assert len(add_input_labels(pls, {"a": 9.0, "b": 5.0}, 7.0)) == 5
    with pytest.raises(ValueError, match="images c have no PL sample"):
        add_input_labels(pls, {"a": 1.0, "c": 1.0}, 7.0)
    with pytest.raises(ValueError, match="added already"):
        add_input_labels(s, {"b": 1.0}, 7.0)


def test_relative_condition_is_the_gap_below_the_images_best_pl() -> None:
    """train.condition: relative -- level = top - (S_best - S): each image's best PL at the top."""
    s = build_samples(_bank(), "qualiteacher", top_score=7.0, score_condition=True, condition="relative")
    assert list(s.cond) == [7.0, 4.5, 2.5, 7.0, 5.0]  # a: best 7.5; b: best 6 -> at the top too
    assert list(s.aug_index) == [0, 2, 1, 0, 1]  # every PL is its own target
    low = build_samples(_bank(), "qualiteacher", top_score=4.0, score_condition=True, condition="relative")
    assert list(low.cond) == [4.0, 1.5, 0.0, 4.0, 2.0]  # clipped at 0
    off = build_samples(_bank(), "qualiteacher", 7.0, score_condition=False, condition="relative")
    assert list(off.cond) == [7.0] * 5
    # the input of a (S 2.5, below a's poorest PL) sits 5 below a's best PL; at the top level 2 it is still
    # kept, as every relative level below the poorest PL is below the top
    with_in = add_input_labels(s, {"a": 2.5, "b": 5.0}, 7.0, condition="relative")
    assert with_in.cond[5] == pytest.approx(2.0) and len(with_in) == 6
    assert input_label_kept(s, {"a": 2.5}, top_score=2.0, condition="relative").all()


def test_relative_margin_puts_the_best_pls_below_the_top() -> None:
    """train.relative_margin: the best PL of each image one level below the top (kept for ground truth)."""
    top = best_pl_level(7.0, 1.0)
    assert top == 6.0 and best_pl_level(7.0, 0.0) == 7.0
    s = build_samples(_bank(), "qualiteacher", top_score=top, score_condition=True, condition="relative")
    assert list(s.cond) == [6.0, 3.5, 1.5, 6.0, 4.0] and max(s.cond) < 7.0
    assert list(s.aug_index) == [0, 2, 1, 0, 1]  # every PL is still its own target
    with_in = add_input_labels(s, {"a": 2.5}, top, condition="relative")
    assert with_in.cond[-1] == pytest.approx(1.0)  # 5 below a's best PL
    for bad in (7.0, 8.0, -0.5):
        with pytest.raises(ValueError, match=f"train.relative_margin {bad}: must be >= 0 and below"):
            best_pl_level(7.0, bad)


def test_with_input_labels_marks_kept_rows_and_checks_ids() -> None:
    from qtlib.train.inputs import input_labels_schema, with_input_labels

    pls = build_samples(_bank(), "qualiteacher", top_score=7.0, score_condition=True)
    scores = pd.DataFrame({"image_id": ["a", "b"], "source_index": [0, 1], "S": [2.0, 5.0], "norm_brisque": [.2, .5]})
    labels = with_input_labels(pls, scores, 7.0, "images.zarr")
    assert list(labels.scores["kept"]) == [True, False] and list(labels.kept["image_id"]) == ["a"]
    assert list(labels.scores.columns) == input_labels_schema(["brisque"]).names
    assert len(labels.samples) == 6 and labels.samples.image_id[5] == "a"
    with pytest.raises(ValueError, match="images.zarr: row 1 is image 'c', the bank says 'b'"):
        with_input_labels(pls, scores.assign(image_id=["a", "c"]), 7.0, "images.zarr")


def test_plan_is_deterministic_and_ranks_do_not_overlap() -> None:
    args = {"n_samples": 5, "global_batch": 4, "image_size": (64, 64), "patch": 32, "crop": 16,
            "low_levels": (4.0, 5.0, 6.0), "seed": 0, "round_": 1, "epoch": 0}
    a, b = draw_epoch_plan(**args), draw_epoch_plan(**args)
    assert a.steps == 2 == steps_per_epoch(5, 4)
    for f in ("sample", "patch_yx", "low_level", "crop_yx"):
        assert np.array_equal(getattr(a, f), getattr(b, f))
    assert set(a.sample[:5]) == set(range(5))  # every sample once, then wrap-round fill
    assert set(a.low_level) <= {4.0, 5.0, 6.0}
    assert (a.patch_yx <= 32).all() and (a.crop_yx <= 16).all()
    r0, r1 = rank_slots(1, 0, 2, 2), rank_slots(1, 1, 2, 2)
    assert list(r0) == [4, 5] and list(r1) == [6, 7]
    assert list(rank_slots(1, 0, 1, 4)) == [4, 5, 6, 7]  # one process with the same global batch
    with pytest.raises(ValueError, match="does not fit"):
        draw_epoch_plan(**{**args, "patch": 65})


def _coded_images(n: int, size: int) -> np.ndarray:
    """uint8 images whose pixels encode (row, column) so crops can be located."""
    yy, xx = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    img = np.stack([yy, xx, np.zeros_like(yy)]).astype(np.uint8)
    return np.stack([img] * n)


def _write_stores(root, size: int) -> None:
    """images.zarr of two coded images, and label stores of both shards with PL = image + 1 + aug."""
    images = _coded_images(2, size)
    writer = StoreWriter(root / "images.zarr", 2, size)
    for i, img in enumerate(images):
        writer.append(f"img{i}", img.transpose(1, 2, 0))
    writer.close({})
    commit_path(writer.tmp, root / "images.zarr")
    for shard in (0, 1):
        g = zarr.open_group(str(root / f"round_0/labels/shard_{shard}.zarr"), mode="w")
        labels = np.stack([np.stack([images[i] + 1 + k for k in range(3)]) for i in range(2)])
        g.create_array("labels", data=labels.astype(np.uint8), chunks=(1, 3, 3, size, size))
        g.create_array("blocks_S", data=np.ones((2, 3, 2, 2), dtype=np.float32))


def test_bank_reader_reads_aligned_windows(tmp_path) -> None:
    size, patch = 64, 24
    _write_stores(tmp_path, size)
    samples = build_samples(_bank(), "qualiteacher", 7.0, True)
    reader = BankReader(samples, tmp_path / "images.zarr", tmp_path, patch)
    plan = draw_epoch_plan(len(samples), 5, (size, size), patch, 12, (4.0,), 0, 0, 0)
    batch = reader.read(plan, np.arange(5))
    for j in range(5):
        i = plan.sample[j]
        top, left = plan.patch_yx[j]
        x = (batch.x[j] * 255).round().to(torch.uint8)
        assert x[0, 0, 0].item() == top and x[1, 0, 0].item() == left  # the window the plan chose
        diff = (batch.target[j] * 255).round() - (batch.x[j] * 255).round()
        assert torch.all(diff == 1 + samples.aug_index[i])  # the PL of the same window
        assert batch.cond[j].item() == samples.cond[i]
        # block weights of the same window: blocks [S, S, 1, 1] / mean -> top half vs bottom half
        s = samples.blocks[i][0]
        rows = torch.arange(top, top + patch)[:, None].expand(patch, patch)
        expected = torch.where(rows < size // 2, s, 1.0) / ((s + 1) / 2)
        assert torch.allclose(batch.weight[j, 0], expected)


def test_bank_reader_geometric_turns_patch_target_weights_and_windows_alike(tmp_path) -> None:
    """train.geometric: the same slots as without, each slot's input patch, PL, block weights and reward
    windows turned by the plan's element of the dihedral group; the other draws of the plan unchanged."""
    from qtlib.augment import dihedral

    size, patch = 64, 24
    _write_stores(tmp_path, size)
    samples = build_samples(_bank(), "qualiteacher", 7.0, True)
    plain = BankReader(samples, tmp_path / "images.zarr", tmp_path, patch, window=32, ref=True)
    turned = BankReader(samples, tmp_path / "images.zarr", tmp_path, patch, window=32, ref=True, geometric=True)
    plan = draw_epoch_plan(len(samples), 8, (size, size), patch, 12, (4.0,), 0, 0, 0, window=32)
    slots = np.arange(8)
    a, b = plain.read(plan, slots), turned.read(plan, slots)
    assert set(plan.turn) - {0} and set(plan.turn) <= set(range(8))
    for j, k in enumerate(plan.turn):
        for name in ("x", "target", "weight", "window", "ref"):
            assert torch.equal(dihedral(getattr(a, name)[j], int(k)), getattr(b, name)[j]), name
    assert torch.equal(a.cond, b.cond) and torch.equal(a.crop_yx, b.crop_yx)
    rotated = [j for j, k in enumerate(plan.turn) if k % 2]  # an odd element: a quarter turn
    assert rotated and not torch.equal(a.x[rotated[0]], b.x[rotated[0]])


def test_bank_reader_input_sample_targets_its_input(tmp_path) -> None:
    size, patch = 64, 24
    _write_stores(tmp_path, size)
    samples = add_input_labels(build_samples(_bank(), "qualiteacher", 7.0, True), {"a": 2.0, "b": 1.0}, 7.0)
    reader = BankReader(samples, tmp_path / "images.zarr", tmp_path, patch)  # no label store for "" targets
    plan = draw_epoch_plan(len(samples), 7, (size, size), patch, 12, (4.0,), 0, 0, 0)
    batch = reader.read(plan, np.arange(7))
    inputs = [j for j in range(7) if samples.is_input[plan.sample[j]]]
    assert len(inputs) == 2
    for j in range(7):
        i = plan.sample[j]
        x = (batch.x[j] * 255).round().to(torch.uint8)
        assert x[0, 0, 0].item() == plan.patch_yx[j][0] and x[1, 0, 0].item() == plan.patch_yx[j][1]
        diff = (batch.target[j] * 255).round() - (batch.x[j] * 255).round()
        if j in inputs:
            assert torch.equal(batch.target[j], batch.x[j])  # the input patch itself
            assert torch.equal(batch.weight[j], torch.ones(1, patch, patch))
            assert batch.cond[j].item() == {"a": 2.0, "b": 1.0}[samples.image_id[i]]
        else:
            assert torch.all(diff == 1 + samples.aug_index[i])  # PL samples read as before


def test_paired_reader_deterministic_per_step(tmp_path) -> None:
    size = 48
    for name, add in (("degraded", 0), ("clean", 5)):
        writer = StoreWriter(tmp_path / f"{name}.zarr", 3, size)
        for i, img in enumerate(_coded_images(3, size)):
            writer.append(f"p{i}", (img + add).transpose(1, 2, 0))
        writer.close({})
        commit_path(writer.tmp, tmp_path / f"{name}.zarr")
    reader = PairedReader(tmp_path, 16)
    x, y = reader.read(seed=0, step=3, batch=2)
    x2, _ = reader.read(seed=0, step=3, batch=2)
    assert torch.equal(x, x2) and x.shape == (2, 3, 16, 16)
    assert torch.allclose((y - x) * 255, torch.full_like(x, 5.0), atol=1e-3)  # aligned crops
    with pytest.raises(ValueError, match="does not fit"):
        PairedReader(tmp_path, 49)


def test_paired_reader_geometric_turns_both_images_alike(tmp_path) -> None:
    """pretrain.geometric / train.losses.sup.geometric: the same crops as without, each pair turned by one
    element of the dihedral group, the same on both images; every element occurs."""
    from qtlib.augment import dihedral

    size = 48
    rng = np.random.default_rng(0)
    clean = rng.integers(0, 200, (3, size, size, 3), dtype=np.uint8)
    for name, add in (("degraded", 0), ("clean", 5)):
        writer = StoreWriter(tmp_path / f"{name}.zarr", 3, size)
        for i, img in enumerate(clean):
            writer.append(f"p{i}", img + add)
        writer.close({})
        commit_path(writer.tmp, tmp_path / f"{name}.zarr")
    plain, turned = PairedReader(tmp_path, 16), PairedReader(tmp_path, 16, geometric=True)
    seen = set()
    for step in range(12):
        x0, y0 = plain.read(seed=0, step=step, batch=3)
        x1, y1 = turned.read(seed=0, step=step, batch=3)
        assert torch.allclose((y1 - x1) * 255, torch.full_like(x1, 5.0), atol=1e-3)  # still aligned pairs
        for a, b in zip(x0, x1, strict=True):
            ks = [k for k in range(8) if torch.equal(dihedral(a, k), b)]
            assert len(ks) == 1  # the upright crop, turned by exactly one element
            seen.add(ks[0])
    assert seen == set(range(8))
