"""Evaluate stage: degraded / pretrained / teacher / student on a tiny prepared test set; schema, rows, tables, plots."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pyiqa
import pytest
import torch
from iqa_fixtures import natural_images, prepared  # noqa: F401  (fixture)
from torch import nn

from qtlib.config import ConditioningConfig, DataConfig, EvaluateConfig, ModelConfig, UNetConfig
from qtlib.data import ImageStore, prepare_paired
from qtlib.evaluate import (
    Candidate,
    EvalResult,
    EvalSet,
    controllability,
    differences,
    evaluate,
    metrics_schema,
    plan_runs,
    summarize,
)
from qtlib.headroom_table import headroom_schema
from qtlib.imageio import write_image
from qtlib.ledger import write_table
from qtlib.models import EMA, Checkpoint, build_model, save_checkpoint

PANEL = ("brisque", "niqe", "piqe")  # NIQE needs 96 px images
LEVELS = (0.0, 3.0, 7.0)
N_IMAGES = 2
MODEL = ModelConfig(unet=UNetConfig(width=4, depth=2), conditioning=ConditioningConfig(embedding="discrete"))
ROOT = Path(__file__).resolve().parents[1]


def perturbed(seed: int, embedding_std: float = 0.0) -> nn.Module:
    """A small U-Net moved off its init; its score embedding random (std ``embedding_std``) or still zero."""
    torch.manual_seed(seed)
    model = build_model(MODEL)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        for p in model.injection_parameters():
            p.copy_(embedding_std * torch.randn_like(p))
    return model.eval()


def write_test_set(root: Path) -> Path:
    """Two 96 px photo crops with Gaussian noise, prepared like ``qt prepare`` does (degraded + clean stores)."""
    clean = natural_images(N_IMAGES, 96)
    degraded = (clean + 0.08 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    for k in range(N_IMAGES):
        write_image(root / "raw" / "clean" / f"img_{k}.png", clean[k])
        write_image(root / "raw" / "degraded" / f"img_{k}.png", degraded[k])
    prepare_paired(root / "raw", root / "test", DataConfig(size=96, min_size=16, geometry="square"))
    return root / "test"


def write_headroom(path: Path, r: int) -> Path:
    """A hand-made headroom table of round r: two images, one view (hflip), the teacher at 20 + r dB."""
    frame = pd.DataFrame({
        "image_id": ["a", "b"], "round": r, "teacher_hash": "0" * 16, "psnr_plain": [20.0 + r, 20.0 + r],
        "psnr_hflip": [21.0 + r, 19.0 + r], "psnr_mean": [20.5 + r, 20.5 + r], "psnr_s_first": [19.0 + r] * 2,
        "s_first": "hflip", "psnr_gt_best": [21.0 + r, 19.0 + r], "gt_best": "hflip", "S_hflip": 5.0,
        "S_mean": 4.0, "psnr_vs_input_plain": 25.0, "psnr_vs_input_hflip": [45.0, 25.0], "psnr_vs_input_mean": 30.0,
    })
    return write_table(frame, path, headroom_schema(("hflip",), ("hflip",)))


def write_rounds(root: Path) -> dict[str, list[Path]]:
    """Minimal ledger, gate, bank and headroom tables of two rounds (the columns the plots and summary read)."""
    root.mkdir(parents=True, exist_ok=True)
    out: dict[str, list[Path]] = {"ledgers": [], "gates": [], "banks": [], "headrooms": []}
    for r in range(2):
        out["headrooms"].append(write_headroom(root / f"headroom_{r}.parquet", r))
        ledger = pd.DataFrame({"image_id": ["a", "b", "c"], "augmentation": "hflip", "status": "ok",
                               "teacher_hash": "0" * 16, "round": r, "S": [3.0 + r, 5.0, 7.5]})
        gate = pd.DataFrame({"image_id": ["a", "b", "c"], "round": r, "decision": ["kept", "kept", "dropped"]})
        bank = pd.DataFrame({"image_id": ["a", "b"], "S": [5.0 + r, 7.5]})
        for name, frame in (("ledgers", ledger), ("gates", gate), ("banks", bank)):
            out[name].append(root / f"{name}_{r}.parquet")
            frame.to_parquet(out[name][-1])
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, prepared: Path) -> tuple[EvalResult, dict]:  # noqa: F811
    root = tmp_path_factory.mktemp("evaluate")
    test_dir = write_test_set(root)
    pretrained, teacher, student = perturbed(0), perturbed(1, 1.0), perturbed(2, 10.0)
    ema = EMA(student, decay=0.998)
    with torch.no_grad():  # the EMA inside student.pt differs from the student: evaluate must not use it
        for p in ema.module.parameters():
            p.mul_(0.5)
    paths = {
        "pretrained": save_checkpoint(root / "pretrain/model.pt", Checkpoint("pretrain", MODEL, pretrained.state_dict())),
        "teacher": save_checkpoint(root / "round_1/teacher.pt", Checkpoint("teacher", MODEL, teacher.state_dict())),
        "student": save_checkpoint(root / "round_1/student.pt",
                                   Checkpoint("student", MODEL, student.state_dict(), ema.state_dict())),
    }
    cfg = EvaluateConfig(levels=LEVELS, panel=PANEL, n_examples=2)
    result = evaluate(paths["pretrained"], paths["teacher"], paths["student"], test_dir, root / "eval", cfg,
                      **write_rounds(root / "rounds"), batch_size=1)
    models = {"pretrained": pretrained, "teacher": teacher, "student": student}
    return result, {"test_dir": test_dir, "models": models}


def psnr_of(model: nn.Module | None, test_dir: Path, level: float | None = None) -> np.ndarray:
    """pyiqa's PSNR of a model's output (or of the degraded input) against the clean images."""
    rows = np.arange(N_IMAGES)
    x = ImageStore(test_dir / "degraded.zarr").read_tensor(rows)
    gt = ImageStore(test_dir / "clean.zarr").read_tensor(rows)
    with torch.no_grad():
        y = x if model is None else model(x, None if level is None else torch.full((N_IMAGES,), level)).clamp(0, 1)
        return pyiqa.create_metric("psnr", device="cpu")(y, gt).double().flatten().numpy()


def test_metrics_parquet_schema(run: tuple[EvalResult, dict]) -> None:
    result, _ = run
    schema = pq.read_schema(result.metrics)
    expected = metrics_schema(PANEL, reference=True)
    assert schema.equals(expected, check_metadata=False)
    assert schema.names == ["image_id", "method", "level", "checkpoint_hash", *PANEL, "psnr", "ssim"]
    assert schema.metadata[b"qtlib.table"] == b"eval-metrics"
    assert not schema.field("method").nullable and schema.field("level").nullable


def test_cardinality_rows_per_method_and_level(run: tuple[EvalResult, dict]) -> None:
    result, _ = run
    metrics = pd.read_parquet(result.metrics)
    counts = metrics.assign(level=metrics["level"].fillna(-1.0)).groupby(["method", "level"]).size().to_dict()
    assert counts == {("degraded", -1.0): N_IMAGES, ("pretrained", 7.0): N_IMAGES, ("teacher", 7.0): N_IMAGES,
                      **{("student", lvl): N_IMAGES for lvl in LEVELS}}
    assert metrics.loc[metrics["method"] == "degraded", "level"].isna().all()
    assert metrics.loc[metrics["method"] == "degraded", "checkpoint_hash"].isna().all()
    assert metrics[list(PANEL) + ["psnr", "ssim"]].notna().all().all()
    assert list(result.means["method"]) == ["degraded", "pretrained", "teacher", *["student"] * len(LEVELS)]


def test_psnr_matches_pyiqa_and_uses_the_right_weights(run: tuple[EvalResult, dict]) -> None:
    """degraded = pyiqa PSNR of the input; pretrained, teacher and the student (STUDENT weights) likewise."""
    result, ctx = run
    metrics = pd.read_parquet(result.metrics)

    def psnr(method: str, level: float | None = None) -> np.ndarray:
        rows = metrics[(metrics["method"] == method) & (metrics["level"].isna() if level is None
                                                        else metrics["level"] == level)]
        return rows.set_index("image_id").loc[list(ids), "psnr"].to_numpy()  # in store row order

    ids = ImageStore(ctx["test_dir"] / "degraded.zarr").ids

    test_dir, models = ctx["test_dir"], ctx["models"]
    np.testing.assert_allclose(psnr("degraded"), psnr_of(None, test_dir), rtol=1e-9)
    np.testing.assert_allclose(psnr("pretrained", 7.0), psnr_of(models["pretrained"], test_dir, 7.0), rtol=1e-5)
    np.testing.assert_allclose(psnr("teacher", 7.0), psnr_of(models["teacher"], test_dir, 7.0), rtol=1e-5)
    for level in LEVELS:
        np.testing.assert_allclose(psnr("student", level), psnr_of(models["student"], test_dir, level), rtol=1e-5)
    assert len({round(float(psnr("student", lvl).mean()), 6) for lvl in LEVELS}) == len(LEVELS)


def test_summary_and_plots(run: tuple[EvalResult, dict]) -> None:
    result, _ = run
    text = result.summary.read_text()
    assert "| method |" in text and "**pretrained (reference)**" in text
    for header in ("dPSNR vs pretrained", "dSSIM vs pretrained", "dBRISQUE vs pretrained", "Spearman(level, mean)"):
        assert header in text
    assert "The student beats the pretrained model in PSNR at" in text
    # the headroom section comes last, after the unchanged sections, one table per round
    head, _, section = text.partition("## Headroom of the pseudo-labels (per round)")
    assert "## Controllability of the student" in head and "Headroom" not in head
    assert "Teacher PSNR per round (its plain output): round 0: 20.00 dB, round 1: 21.00 dB." in section
    assert "### Round 0 (2 images)" in section and "### Round 1 (2 images)" in section
    assert "| hflip | 20.00 | +0.000 | 50% | 50% | 100% |" in section
    assert "| mean | 21.50 | +0.500 | 100% | 0% |  |" in section  # round 1; the mean is no label here
    control = result.controllability.set_index("metric")
    assert list(control.index) == [*PANEL, "psnr", "ssim"]
    assert control["Spearman(level, mean)"].between(-1, 1).all() and (control["levels"] == len(LEVELS)).all()
    names = {p.stem for p in result.plots}
    assert names == {"controllability", "round_histograms", "drop_rates", "bank_mean_S", "examples"}
    for p in result.plots:
        assert p.parent == result.metrics.parent / "plots" and p.stat().st_size > 1000


def test_differences_and_spearman_by_hand() -> None:
    metrics = pd.DataFrame({
        "image_id": ["a", "b"] * 5,
        "method": ["degraded"] * 2 + ["pretrained"] * 2 + ["student"] * 6,
        "level": [np.nan] * 2 + [7.0] * 2 + [0.0, 0.0, 3.0, 3.0, 7.0, 7.0],
        "checkpoint_hash": [None] * 2 + ["p"] * 2 + ["s"] * 6,
        "psnr": [10.0, 12.0, 20.0, 22.0, 19.0, 19.0, 20.0, 22.0, 23.0, 25.0],
        "piqe": [50.0, 50.0, 30.0, 30.0, 40.0, 40.0, 35.0, 35.0, 35.0, 35.0],
    })
    means = summarize(metrics)
    diff = differences(means).set_index(["method", "level"])
    assert diff.loc[("student", 7.0), "dPSNR vs pretrained"] == pytest.approx(3.0)
    assert diff.loc[("degraded", np.nan), "dPIQE vs pretrained"] == pytest.approx(20.0)
    control = controllability(means, {"psnr": False, "piqe": True}).set_index("metric")
    assert control.loc["psnr", "Spearman(level, mean)"] == pytest.approx(1.0)
    assert control.loc["piqe", "Spearman(level, mean)"] == pytest.approx(-np.sqrt(3) / 2)  # ranks 3, 1.5, 1.5
    assert control.loc["psnr", "span (max - min)"] == pytest.approx(5.0)
    rounding = 20.0 + 1e-5 * np.arange(len(means))  # an inert condition's float noise
    inert = controllability(means.assign(psnr=rounding), {"psnr": False, "piqe": True}).set_index("metric")
    assert np.isnan(inert.loc["psnr", "Spearman(level, mean)"]) and inert.loc["psnr", "span (max - min)"] > 0


def test_plan_runs_levels_come_from_the_checkpoint_config() -> None:
    def cand(name: str, enabled: bool, top: float = 7.0) -> Candidate:
        return Candidate(name, nn.Identity(), ConditioningConfig(enabled=enabled, top_score=top), Path(name), "h",
                         "model")

    runs = plan_runs(cand("pretrained", True, 6.0), cand("teacher", False), cand("student", True), (7.0, 0.0, 7.0))
    assert [(r.method, r.level) for r in runs] == [("degraded", None), ("pretrained", 6.0), ("teacher", None),
                                                   ("student", 0.0), ("student", 7.0)]
    runs = plan_runs(cand("pretrained", True), cand("teacher", True), cand("student", False), (0.0, 7.0))
    assert [(r.method, r.level) for r in runs][-1] == ("student", None) and len(runs) == 4
    with pytest.raises(ValueError, match="evaluate.levels: expected at least one"):
        plan_runs(cand("pretrained", True), cand("teacher", True), cand("student", True), ())


def test_exception_test_set_and_panel(tmp_path: Path, run: tuple[EvalResult, dict]) -> None:
    _, ctx = run
    with pytest.raises(FileNotFoundError, match="degraded.zarr"):
        EvalSet.open(tmp_path)
    cfg = EvaluateConfig(levels=(7.0,), panel=("piqe", "psnr"))
    ckpt = Path(run[0].metrics).parents[1]
    with pytest.raises(ValueError, match=r"evaluate.panel: 'psnr' is full-reference"):
        evaluate(ckpt / "pretrain/model.pt", ckpt / "round_1/teacher.pt", ckpt / "round_1/student.pt",
                 ctx["test_dir"], tmp_path / "eval", cfg)
    from qtlib.models import CheckpointError

    with pytest.raises(CheckpointError, match="expected 'student'"):  # the EMA teacher is no student
        evaluate(ckpt / "pretrain/model.pt", ckpt / "round_1/teacher.pt", ckpt / "round_1/teacher.pt",
                 ctx["test_dir"], tmp_path / "eval", cfg)


def test_no_pyplot_and_no_backend_switch() -> None:
    """The evaluation draws on Figure objects: no pyplot import, no matplotlib.use() at import time."""
    for name in ("qtlib/evaluate.py", "qtlib/plots.py"):
        tree = ast.parse((ROOT / name).read_text())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert "matplotlib.pyplot" not in imported, name
        calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)]
        assert not any(c.func.attr == "use" and getattr(c.func.value, "id", "") == "matplotlib" for c in calls), name
