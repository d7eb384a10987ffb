"""Restore stage: tiling with blended seams, folders with nested names, the `qt restore` CLI."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from qtlib.cli import main
from qtlib.config import ConditioningConfig, ModelConfig, NAFNetConfig, UNetConfig
from qtlib.imageio import read_image, to_uint8, write_image
from qtlib.models import EMA, Checkpoint, build_model, save_checkpoint, size_multiple
from qtlib.restore import blend_window, load_restorer, restore_path, restore_tensor, tile_spans

CFGS = {
    "unet": ModelConfig(unet=UNetConfig(width=4, depth=2)),
    "nafnet": ModelConfig(backbone="nafnet", nafnet=NAFNetConfig(width=4, enc_blocks=(1, 1), middle_blocks=1,
                                                                 dec_blocks=(1, 1))),
}


def trained_like(cfg: ModelConfig, seed: int = 0) -> nn.Module:
    """A model whose zero-initialized parts (NAFNet scales, score embedding) are non-zero, in eval mode."""
    torch.manual_seed(seed)
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def seam_distance(h: int, w: int, tile: int, overlap: int, multiple: int) -> torch.Tensor:
    """Per pixel, the distance to the nearest tile edge inside the image (inf without seams)."""

    def along(size: int) -> torch.Tensor:
        edges = [e for s, n in tile_spans(size, tile, overlap, multiple) for e in (s, s + n) if 0 < e < size]
        i = torch.arange(size) + 0.5
        return torch.stack([(i - e).abs() for e in edges]).amin(0) if edges else torch.full((size,), float("inf"))

    return torch.minimum(along(h)[:, None], along(w)[None, :])


@pytest.mark.parametrize("size", [50, 64, 100, 157, 203])
@pytest.mark.parametrize(("tile", "overlap", "multiple"), [(64, 16, 4), (48, 24, 8), (64, 0, 1), (32, 31, 16)])
def test_tile_spans_cover_aligned_overlapping(size: int, tile: int, overlap: int, multiple: int) -> None:
    spans = tile_spans(size, tile, overlap, multiple)
    assert spans[0][0] == 0 and spans[-1][0] + spans[-1][1] == size
    for (s0, n0), (s1, _) in itertools.pairwise(spans):
        assert s1 % multiple == 0 and s1 > s0
        assert s0 + n0 - s1 >= min(overlap, tile - multiple)  # `overlap`, capped so the stride is >= multiple
    assert all(tile <= n < tile + multiple for _, n in spans) or spans == [(0, size)]


def test_blend_window() -> None:
    w = blend_window(10, 4, single=False)
    assert w.min() > 0 and w.max() == 1 and torch.equal(w, w.flip(0))
    assert torch.equal(blend_window(10, 4, single=True), torch.ones(10))


def test_tiled_matches_whole_unet() -> None:
    """U-Net (translation-equivariant on its pooling grid): equal up to float rounding >= 16 px from a seam.

    Tolerances: 1e-5 away from seams; within 16 px the blend of two tiles differs from the whole-image
    output by < 1e-2 (the tiles' own borders see zero padding instead of neighbours), mean < 1e-3.
    """
    model = trained_like(CFGS["unet"])
    x = torch.rand(1, 3, 203, 157)
    with torch.no_grad():
        whole = restore_tensor(model, x, score=7.0)
        tiled = restore_tensor(model, x, score=7.0, tile=64, overlap=16, batch_size=4)
    diff = (tiled - whole).abs().amax(1)[0]
    far = seam_distance(203, 157, 64, 16, size_multiple(model)) >= 16
    assert far.float().mean() > 0.1
    assert diff[far].max() < 1e-5
    assert diff.max() < 1e-2 and diff.mean() < 1e-3


def test_tiled_matches_whole_nafnet() -> None:
    """NAFNet's channel attention pools over the whole input, so tiles see tile statistics:
    tolerance 1e-3 away from seams (measured ~6e-5), 5e-2 at the seams (measured ~3e-2)."""
    model = trained_like(CFGS["nafnet"])
    x = torch.rand(1, 3, 157, 203)
    with torch.no_grad():
        whole = restore_tensor(model, x)
        tiled = restore_tensor(model, x, tile=64, overlap=32, batch_size=3)
    diff = (tiled - whole).abs().amax(1)[0]
    far = seam_distance(157, 203, 64, 32, size_multiple(model)) >= 16
    assert diff[far].max() < 1e-3
    assert diff.max() < 5e-2 and diff.mean() < 5e-3


def test_tiling_batch_size_and_per_sample_scores() -> None:
    model = trained_like(CFGS["unet"])
    x = torch.rand(2, 3, 70, 90)
    scores = torch.tensor([2.0, 7.0])
    with torch.no_grad():
        a = restore_tensor(model, x, scores, tile=40, overlap=8, batch_size=1)
        b = restore_tensor(model, x, scores, tile=40, overlap=8, batch_size=5)
        c = restore_tensor(model, x[1:], 7.0, tile=40, overlap=8)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(a[1:], c, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(a[0], a[1])


def make_tree(root: Path) -> dict[str, tuple[int, int]]:
    """Images of several sizes in nested folders, PNG and JPEG; returns expected outputs -> (H, W)."""
    rng = np.random.default_rng(0)
    sizes = {"a.png": (37, 53), "sub/b.jpg": (48, 64), "sub/deeper/c d.png": (90, 70), "sub/deeper/e.PNG": (48, 64)}
    for name, (h, w) in sizes.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / name)
    (root / "notes.txt").write_text("not an image")
    return {str(Path(n).with_suffix(".png")): hw for n, hw in sizes.items()}


def test_restore_path_folder(tmp_path: Path) -> None:
    model = trained_like(CFGS["unet"])
    expected = make_tree(tmp_path / "in")
    result = restore_path(model, tmp_path / "in", tmp_path / "out", score=5.0, tile=64, overlap=16, batch_size=2,
                          progress=False)
    got = {p.relative_to(tmp_path / "out").as_posix(): p for p in (tmp_path / "out").rglob("*") if p.is_file()}
    assert set(got) == set(expected) and len(result.outputs) == 4
    for name, (h, w) in expected.items():
        assert read_image(got[name]).shape == (3, h, w)
    # the written pixels are the model's output at that score
    src = read_image(tmp_path / "in" / "sub/deeper/c d.png")[None]
    with torch.no_grad():
        ref = restore_tensor(model, src, 5.0, tile=64, overlap=16)[0]
    diff = np.abs(to_uint8(ref).astype(int) - np.asarray(Image.open(got["sub/deeper/c d.png"])).astype(int))
    assert diff.max() <= 1


def test_restore_path_single_file(tmp_path: Path) -> None:
    model = trained_like(CFGS["unet"])
    write_image(tmp_path / "x.png", torch.rand(3, 20, 30))
    out = restore_path(model, tmp_path / "x.png", tmp_path / "y.png", progress=False).outputs
    assert out == [tmp_path / "y.png"] and read_image(out[0]).shape == (3, 20, 30)
    out = restore_path(model, tmp_path / "x.png", tmp_path / "folder", progress=False).outputs
    assert out == [tmp_path / "folder" / "x.png"]


def test_exception_restore_path(tmp_path: Path) -> None:
    model = trained_like(CFGS["unet"])
    write_image(tmp_path / "in" / "x.png", torch.rand(3, 8, 8))
    Image.new("RGB", (8, 8)).save(tmp_path / "in" / "x.jpg")
    with pytest.raises(ValueError, match="would both be written to"):
        restore_path(model, tmp_path / "in", tmp_path / "out", progress=False)
    (tmp_path / "in" / "x.jpg").unlink()
    with pytest.raises(ValueError, match="output would overwrite an input"):
        restore_path(model, tmp_path / "in", tmp_path / "in", progress=False)
    with pytest.raises(FileNotFoundError):
        restore_path(model, tmp_path / "nope", tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match="overlap: expected 0 <= overlap < tile"):
        restore_path(model, tmp_path / "in", tmp_path / "out", tile=16, overlap=16, progress=False)
    with pytest.raises(ValueError, match="outputs are PNG files"):
        restore_path(model, tmp_path / "in" / "x.png", tmp_path / "y.jpg", progress=False)
    with pytest.raises(ValueError, match=r"score: expected a number or shape \(1,\)"):
        restore_tensor(model, torch.rand(1, 3, 8, 8), torch.tensor([1.0, 2.0]))


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    cfg = ModelConfig(unet=UNetConfig(width=4, depth=2), conditioning=ConditioningConfig(embedding="discrete"))
    model = trained_like(cfg)
    return save_checkpoint(tmp_path / "teacher.pt", Checkpoint("teacher", cfg, model.state_dict()))


def test_cli_restore_folder_nested(tmp_path: Path, checkpoint: Path, capsys: pytest.CaptureFixture) -> None:
    expected = make_tree(tmp_path / "in")
    rc = main(["restore", "--checkpoint", str(checkpoint), "--score", "3", "--device", "cpu", "--tile", "48",
               "--overlap", "8", "--quiet", str(tmp_path / "in"), str(tmp_path / "out")])
    assert rc == 0
    assert "restored 4 image(s)" in capsys.readouterr().out
    for name, (h, w) in expected.items():
        assert read_image(tmp_path / "out" / name).shape == (3, h, w)
    rc = main(["restore", "--checkpoint", str(checkpoint), "--score", "7", "--quiet", str(tmp_path / "in" / "a.png"),
               str(tmp_path / "top.png")])
    assert rc == 0
    assert not torch.equal(read_image(tmp_path / "top.png"), read_image(tmp_path / "out" / "a.png"))


@pytest.fixture
def student_checkpoint(tmp_path: Path) -> tuple[Path, nn.Module, nn.Module]:
    """A student checkpoint whose score embedding is trained (non-zero) while its EMA's is still at zero,
    the situation after a short round; returns (path, student, EMA teacher)."""
    cfg = ModelConfig(unet=UNetConfig(width=4, depth=2), conditioning=ConditioningConfig(embedding="discrete"))
    student = trained_like(cfg)
    ema = EMA(student, decay=0.998)
    with torch.no_grad():
        for p, q in zip(student.injection_parameters(), ema.module.injection_parameters(), strict=True):
            p.normal_(std=10.0)  # a trained embedding, large enough to move 8-bit outputs
            q.zero_()
    path = save_checkpoint(tmp_path / "student.pt", Checkpoint("student", cfg, student.state_dict(), ema.state_dict()))
    return path, student, ema.module.eval()


def test_cli_restore_student_weights_by_default(tmp_path: Path, student_checkpoint: tuple[Path, nn.Module, nn.Module],
                                                capsys: pytest.CaptureFixture) -> None:
    """--score matters by default (student weights); --ema gives the EMA teacher's output, inert here."""
    path, student, teacher = student_checkpoint
    x = torch.rand(3, 24, 32)
    write_image(tmp_path / "x.png", x)

    def restored(score: str, *flags: str) -> np.ndarray:
        out = tmp_path / f"s{score}{''.join(flags)}.png"
        rc = main(["restore", "--checkpoint", str(path), "--score", score, "--device", "cpu", "--quiet", *flags,
                   str(tmp_path / "x.png"), str(out)])
        assert rc == 0
        return np.asarray(Image.open(out)).astype(int)

    def expected(model: nn.Module, score: float) -> np.ndarray:
        with torch.no_grad():
            return to_uint8(restore_tensor(model, read_image(tmp_path / "x.png")[None], score)[0]).astype(int)

    s0, s7 = restored("0"), restored("7")
    assert "(student weights, score 7)" in capsys.readouterr().out
    assert np.abs(s0 - s7).max() > 5
    assert np.abs(s0 - expected(student, 0.0)).max() <= 1 and np.abs(s7 - expected(student, 7.0)).max() <= 1
    assert np.array_equal(restored("7", "--no-ema"), s7)  # the old flag is the default now
    e0, e7 = restored("0", "--ema"), restored("7", "--ema")
    assert "(EMA weights, score 7)" in capsys.readouterr().out
    assert np.array_equal(e0, e7)
    assert np.abs(e7 - expected(teacher, 7.0)).max() <= 1
    assert np.abs(e7 - s7).max() > 5


def test_load_restorer_weights_by_kind(tmp_path: Path, student_checkpoint: tuple[Path, nn.Module, nn.Module],
                                       checkpoint: Path) -> None:
    path, student, teacher = student_checkpoint
    x, score = torch.rand(1, 3, 16, 16), torch.tensor([3.0])
    default, ema = load_restorer(path), load_restorer(path, ema=True)
    assert (default.weights, ema.weights, default.kind) == ("student", "EMA", "student")
    assert default.conditioned and default.top_score == 7.0
    with torch.no_grad():
        assert torch.equal(default.model(x, score), student(x, score))
        assert torch.equal(ema.model(x, score), teacher(x, score))
    assert load_restorer(checkpoint).weights == load_restorer(checkpoint, ema=True).weights == "EMA"  # teacher.pt


@pytest.mark.parametrize("case", ["missing", "corrupt", "foreign", "overlap", "ema_of_pretrain", "ema_and_no_ema"])
def test_cli_restore_errors(tmp_path: Path, checkpoint: Path, case: str, capsys: pytest.CaptureFixture) -> None:
    write_image(tmp_path / "in" / "x.png", torch.rand(3, 8, 8))
    ckpt, extra = checkpoint, []
    if case == "missing":
        ckpt = tmp_path / "none.pt"
    elif case == "corrupt":
        ckpt = tmp_path / "corrupt.pt"
        ckpt.write_bytes(checkpoint.read_bytes()[:500])
    elif case == "foreign":
        ckpt = tmp_path / "foreign.pt"
        torch.save({"weights": torch.ones(2)}, ckpt)
    elif case == "ema_of_pretrain":
        cfg = ModelConfig(unet=UNetConfig(width=4, depth=2))
        ckpt = save_checkpoint(tmp_path / "model.pt", Checkpoint("pretrain", cfg, build_model(cfg).state_dict()))
        extra = ["--ema"]
    elif case == "ema_and_no_ema":
        extra = ["--ema", "--no-ema"]
    else:
        extra = ["--tile", "16", "--overlap", "16"]
    if case == "ema_and_no_ema":  # an argparse usage error: exit status 2
        with pytest.raises(SystemExit) as exc:
            main(["restore", "--checkpoint", str(ckpt), *extra, str(tmp_path / "in"), str(tmp_path / "out")])
        assert exc.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
        return
    rc = main(["restore", "--checkpoint", str(ckpt), *extra, str(tmp_path / "in"), str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("qt restore: error: ") and err.count("\n") == 1
    message = {"missing": "checkpoint not found", "corrupt": "corrupt checkpoint", "foreign": "not a qtlib checkpoint",
               "overlap": "must be smaller than --tile", "ema_of_pretrain": "holds no EMA weights"}[case]
    assert message in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("backbone", "tile", "overlap", "batch_size"),
                         [("unet", 40, 8, 1), ("unet", 32, 16, 3), ("nafnet", 48, 0, 2), ("unet", 200, 8, 1)])
def test_streaming_equals_tiled(backbone: str, tile: int, overlap: int, batch_size: int) -> None:
    """restore_streaming (uint8 in, one row of tiles in float, uint8 out) = restore_tiled, quantized."""
    from qtlib.restore import restore_streaming, restore_tiled

    model = trained_like(CFGS[backbone])
    arr = np.random.default_rng(1).integers(0, 256, (75, 101, 3), dtype=np.uint8)
    with torch.no_grad():
        ref = to_uint8(restore_tiled(model, torch.from_numpy(arr).permute(2, 0, 1).float() / 255, 4.0, tile, overlap,
                                     batch_size) if tile < 101 else model(torch.from_numpy(arr).permute(2, 0, 1)
                                                                          .float()[None] / 255, torch.tensor([4.0]))[0])
        got = restore_streaming(model, arr, 4.0, tile, overlap, batch_size)
        from_pil = restore_streaming(model, Image.fromarray(arr), 4.0, tile, overlap, batch_size)
    assert got.shape == arr.shape and got.dtype == np.uint8 and np.array_equal(got, from_pil)
    diff = np.abs(got.astype(int) - ref.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3  # float summation order only


def test_tile_for_default_and_explicit() -> None:
    from qtlib.restore import DEFAULT_TILE, tile_for

    assert tile_for(2048, 1000, None) is None and tile_for(2049, 10, None) == DEFAULT_TILE
    assert tile_for(100, 100, 64) == 64 and tile_for(64, 64, 64) is None
    assert tile_for(10**5, 10**5, None, None) is None and tile_for(300, 10, None, 256) == 256
    assert tile_for(300, 10, None, 100) == 100


def test_restore_path_tiles_above_side_by_default(tmp_path: Path) -> None:
    model = trained_like(CFGS["unet"])
    arr = np.random.default_rng(2).integers(0, 256, (90, 70, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "x.png")
    restore_path(model, tmp_path / "x.png", tmp_path / "auto.png", score=3.0, overlap=8, tile_above=64,
                 progress=False)
    restore_path(model, tmp_path / "x.png", tmp_path / "whole.png", score=3.0, tile_above=None, progress=False)
    auto, whole = (np.asarray(Image.open(tmp_path / n)).astype(int) for n in ("auto.png", "whole.png"))
    assert auto.shape == whole.shape == arr.shape
    assert 0 < np.abs(auto - whole).max() <= 8  # tiled (seams differ a little), not restored whole
