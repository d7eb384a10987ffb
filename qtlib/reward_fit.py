"""The reward stage: fit the learned member ``liteiqa`` on the paired data (and refit it against the student).

A researcher with this pipeline has paired data with ground truth; this stage turns it into a
no-reference quality model (:mod:`qtlib.iqa.learned`) without human labels:

1. **Ladders.** For each paired image (a ``reward.crop`` px crop of it), a ladder of candidates
   with known quality (:data:`FAMILIES`): the degraded input, the clean image, blends of the two,
   the pretrained model's restoration and its blends with the input and with the clean image, and
   generic distortions (blur, noise, JPEG, resampling) of the clean image and of the restoration.
   The target recipe of the unlabeled images is never used. With ``students`` (the refresh of
   ``reward.refresh``), the current student's restorations of the inputs at several condition
   levels join each ladder: whatever the student found that pleases the reward is then fitted
   for what it is.
2. **Labels.** Full-reference quality against the clean image, from metrics that work offline:
   ``q = 10 * (0.5 * clip((PSNR - 15) / 25, 0, 1) + 0.5 * clip(SSIM, 0, 1))`` (PSNR: pyiqa's, as the
   evaluation's; SSIM: :func:`ssim_y`). PSNR alone ranks a blurred image above a sharp one with a
   little noise; SSIM weighs structure. The clean image scores 10.
3. **Fit.** The frozen backbone's features once per candidate, then the head: a pairwise
   logistic ranking loss within each ladder (scores compare well within an image and poorly
   across images; pairs closer than 0.05 in ``q`` are ties and left out) plus
   ``reward.calibration_weight`` x MSE to ``q`` (the 0..10 condition scale). Full-batch AdamW,
   ``reward.steps`` steps, seeded.
4. **Report.** A share of the paired images (``reward.holdout``, whole ladders) is held out:
   within-image Spearman with ``q`` and with PSNR, over all candidates and per family (the
   family's candidates, the input and the clean image), for the fitted model and for BRISQUE and NIQE on
   the same ladders. The cap of the defenses is the 95th percentile of the clean images' scores.

Outputs: the model file (:func:`qtlib.iqa.learned.save_learned`, with this config slice and the
SHA-256 of its inputs), ``report.parquet`` (one row per held-out candidate) and ``report.md``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
import torch.nn.functional as F

from qtlib.config.types import RewardConfig
from qtlib.data import ImageStore
from qtlib.data.store import open_pair
from qtlib.data.degradations import add_noise, blur, jpeg
from qtlib.iqa import create_metric, get_info
from qtlib.iqa.learned import (
    HeadConfig,
    LearnedFile,
    LiteFeatures,
    QualityHead,
    save_learned,
)
from qtlib.layout import manifest_in
from qtlib.ledger import write_table
from qtlib.models import load_model
from qtlib.runtime import file_hash, resolve_device
from qtlib.util.markdown import to_markdown

log = logging.getLogger(__name__)

#: Candidate families of a ladder, in order, with the parameter of each member.
FAMILIES: dict[str, tuple[float, ...]] = {
    "input": (0.0,),
    "clean": (0.0,),
    "blend_input": (0.25, 0.5, 0.75),          # clean + a (input - clean)
    "restored": (0.0,),
    "blend_restored_input": (0.5,),             # restored + a (input - restored)
    "blend_restored_clean": (0.5,),             # restored + a (clean - restored)
    "blur_clean": (0.7, 1.5),                   # Gaussian sigma, px
    "noise_clean": (0.02, 0.05),                # std on [0, 1]
    "jpeg_clean": (20.0, 50.0),                 # quality
    "resample_clean": (0.5,),                   # down by this factor and back up (bicubic)
    "blur_restored": (1.0,),
    "noise_restored": (0.03,),
    "jpeg_restored": (40.0,),
}
STUDENT = "student"
"""The family of the refresh: the student's restorations at ``reward.refresh_levels``."""


def ssim_y(images: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """``(N,)`` SSIM (Wang et al. 2004: 11 px Gaussian window, sigma 1.5) of each image against ``clean`` on the
    luma (Y of YCbCr), with kornia. pyiqa's float64 SSIM gives the same ranking (Pearson 0.999 and at most
    0.02 apart on a proxy ladder) at 20x the cost on a CPU."""
    import kornia

    y = kornia.color.rgb_to_ycbcr(images)[:, :1]
    ref = kornia.color.rgb_to_ycbcr(clean.expand_as(images))[:, :1].contiguous()
    return kornia.metrics.ssim(y, ref, 11).mean(dim=(1, 2, 3))


def quality_label(psnr: torch.Tensor, ssim: torch.Tensor) -> torch.Tensor:
    """``q`` on 0..10 from PSNR (dB) and SSIM against the clean image (inf PSNR: the clean image itself)."""
    p = ((psnr.nan_to_num(posinf=100.0) - 15.0) / 25.0).clamp(0, 1)
    return 10.0 * (0.5 * p + 0.5 * ssim.clamp(0, 1))


def _resample(x: torch.Tensor, factor: float) -> torch.Tensor:
    h, w = x.shape[-2:]
    small = F.interpolate(x, size=(max(8, round(h * factor)), max(8, round(w * factor))), mode="bicubic",
                          align_corners=False, antialias=True)
    return F.interpolate(small, size=(h, w), mode="bicubic", align_corners=False).clamp(0, 1)


def ladder(degraded: torch.Tensor, clean: torch.Tensor, restored: torch.Tensor, seed: int,
           students: Sequence[tuple[float, torch.Tensor]] = ()) -> tuple[torch.Tensor, list[tuple[str, float]]]:
    """One image's candidates: ``(K, 3, H, W)`` in [0, 1], and each one's (family, parameter).

    Args:
        degraded, clean, restored: ``(3, H, W)`` the input, its ground truth, the pretrained model's output.
        seed: the noise's seed.
        students: ``(level, (3, H, W) output)`` of the current student (the refresh), or none.
    """
    g = torch.Generator().manual_seed(seed)
    d, c, r = degraded[None], clean[None], restored[None]
    out: list[torch.Tensor] = []
    names: list[tuple[str, float]] = []

    def add(family: str, a: float, img: torch.Tensor) -> None:
        out.append(img.clamp(0, 1))
        names.append((family, float(a)))

    ops: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
        "blur": blur, "noise": lambda x, s: add_noise(x, s, g), "jpeg": lambda x, q: jpeg(x, int(q)),
        "resample": _resample}
    for family, params in FAMILIES.items():
        for a in params:
            if family == "input":
                add(family, a, d)
            elif family == "clean":
                add(family, a, c)
            elif family == "blend_input":
                add(family, a, c + a * (d - c))
            elif family == "restored":
                add(family, a, r)
            elif family == "blend_restored_input":
                add(family, a, r + a * (d - r))
            elif family == "blend_restored_clean":
                add(family, a, r + a * (c - r))
            else:
                op, _, base = family.partition("_")
                add(family, a, ops[op](c if base == "clean" else r, a))
    for level, y in students:
        add(STUDENT, level, y[None])
    return torch.cat(out), names


@dataclass(frozen=True)
class Ladders:
    """Every candidate of every ladder: features, labels and where it came from."""

    features: torch.Tensor
    """(N, D) backbone features."""
    q: torch.Tensor
    """(N,) quality label on 0..10."""
    frame: pd.DataFrame
    """One row per candidate: image_id, ladder (int), family, param, psnr, ssim, q."""
    images: torch.Tensor | None = None
    """(M, 3, H, W) the candidates of the ``keep`` ladders, in frame order (the held-out report's classical
    scores)."""


def _crop(x: torch.Tensor, side: int, rng: np.random.Generator) -> tuple[int, int]:
    h, w = x.shape[-2:]
    side = min(side, h, w)
    return int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))


@torch.no_grad()
def build_ladders(paired_dir: str | Path, pretrained: str | Path, cfg: RewardConfig, seed: int,
                  features: LiteFeatures, device: torch.device,
                  students: Sequence[tuple[str | Path, Sequence[float]]] = (),
                  keep: Sequence[int] = ()) -> Ladders:
    """The ladders of every paired image (see the module docstring), with features and labels.

    Args:
        paired_dir: the prepared paired folder (``degraded.zarr``, ``clean.zarr``).
        pretrained: the pretrained model (the restorations of the ladders).
        cfg: the ``reward`` section; seed: the run's seed (crops and noise).
        features: the backbone features.
        students: ``(checkpoint, levels)``: restorations of the inputs by each student at each level join
            the ladders (the refresh).
        keep: the ladders (paired rows) whose candidate images are returned too (the held-out report's).

    Every ladder is cut at one side, ``reward.crop`` or the smallest image side if smaller, so that
    candidates of all ladders stack.
    """
    degraded, clean = open_paired(paired_dir)
    side = min(cfg.crop, int(degraded.sizes.min()))
    keep = set(int(k) for k in keep)
    model = load_model(pretrained, use_ema=False, device=str(device))
    learners = [(load_model(p, use_ema=False, device=str(device)), tuple(levels)) for p, levels in students]
    psnr = create_metric("psnr", device)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 23]))
    feats, labels, rows, kept = [], [], [], []
    for i, image_id in enumerate(degraded.ids):
        d_full, c_full = degraded.read_tensor([i])[0], clean.read_tensor([i])[0]
        top, left = _crop(d_full, side, rng)
        d = d_full[:, top:top + side, left:left + side].to(device)
        c = c_full[:, top:top + side, left:left + side].to(device)
        r = model(d[None], model.top_score)[0].clamp(0, 1)
        outs = [(lv, m(d[None], float(lv))[0].clamp(0, 1)) for m, levels in learners for lv in levels]
        cands, names = ladder(d.cpu(), c.cpu(), r.cpu(), seed + i, [(lv, y.cpu()) for lv, y in outs])
        cands = cands.to(device)
        p = psnr(cands, c[None].expand_as(cands)).flatten().float()
        s = ssim_y(cands, c[None]).float()
        q = quality_label(p, s)
        feats.append(features(cands).cpu())
        labels.append(q.cpu())
        rows += [{"image_id": image_id, "ladder": i, "family": f, "param": a, "psnr": float(pv), "ssim": float(sv),
                  "q": float(qv)} for (f, a), pv, sv, qv in zip(names, p.tolist(), s.tolist(), q.tolist(), strict=True)]
        if i in keep:
            kept.append(cands.cpu())
    return Ladders(torch.cat(feats), torch.cat(labels), pd.DataFrame(rows), torch.cat(kept) if kept else None)


def open_paired(paired_dir: str | Path) -> tuple[ImageStore, ImageStore]:
    """The degraded and clean stores of a prepared paired folder.

    Raises:
        ValueError: the two stores differ, or hold no image (there is nothing to fit on).
    """
    degraded, clean = open_pair(paired_dir, clean=True)
    assert clean is not None  # required above
    return degraded, clean


def ranking_pairs(q: torch.Tensor, ladder_id: torch.Tensor, tie: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """``(i, j)`` index pairs of candidates of one ladder with ``q_i > q_j + tie`` (pairs closer are ties).

    Built once per ladder, so memory grows with the ladders' sizes, not with the square of all candidates.
    """
    firsts, seconds = [], []
    for lid in torch.unique(ladder_id):
        members = torch.nonzero(ladder_id == lid).flatten()
        qq = q[members]
        a, b = torch.nonzero(qq[:, None] - qq[None, :] > tie, as_tuple=True)
        firsts.append(members[a])
        seconds.append(members[b])
    empty = torch.zeros(0, dtype=torch.long)
    return (torch.cat(firsts) if firsts else empty), (torch.cat(seconds) if seconds else empty)


def ranking_loss(score: torch.Tensor, pairs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Mean pairwise logistic loss ``log(1 + exp(-(s_i - s_j)))`` over ``pairs`` (:func:`ranking_pairs`)."""
    i, j = pairs
    if len(i) == 0:
        return score.sum() * 0.0
    return F.softplus(-(score[i] - score[j])).mean()


def fit_head(features: torch.Tensor, q: torch.Tensor, ladder_id: torch.Tensor, cfg: RewardConfig,
             seed: int) -> tuple[QualityHead, list[float]]:
    """Fit the head on one set of ladders: ranking within each ladder + calibration to ``q``.

    Returns:
        The head (eval mode) and the loss per step.
    """
    torch.manual_seed(seed)
    head = QualityHead(HeadConfig(features.shape[1], cfg.hidden))
    head.set_standardization(features)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    pairs = ranking_pairs(q, ladder_id)
    history = []
    for _ in range(cfg.steps):
        s = head(features)
        loss = cfg.rank_weight * ranking_loss(s, pairs) + cfg.calibration_weight * F.mse_loss(s, q)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append(float(loss.detach()))
    return head.eval(), history


def within_image_spearman(frame: pd.DataFrame, score: str, truth: str) -> float:
    """Mean over ladders of Spearman(score, truth) within the ladder (NaN-free ladders of 3+ candidates)."""
    rhos = []
    for _, g in frame.groupby("ladder"):
        g = g[[score, truth]].replace([np.inf, -np.inf], np.nan).dropna()
        if len(g) >= 3 and g[score].nunique() > 1 and g[truth].nunique() > 1:
            rhos.append(g[score].rank().corr(g[truth].rank()))
    return float(np.mean(rhos)) if rhos else math.nan


def usable(metric: str, side: int) -> bool:
    """A comparison metric of the report scores ``side`` px images and has its files (else it is left out)."""
    info = get_info(metric)
    if info.min_size > side:
        return False
    if info.missing_weights():
        log.warning("reward report: %s left out: its weight files are missing (qt weights prepare)", metric)
        return False
    return True


def report_table(held: pd.DataFrame, scores: Sequence[str]) -> pd.DataFrame:
    """Within-image Spearman of each score column with ``q`` and with PSNR: all candidates, then per family
    (its candidates between the two ends of the ladder, the input and the clean image)."""
    rows = []
    ends = ("input", "clean")
    groups = [("all", held)] + [(f, held[held["family"].isin([f, *ends])]) for f in held["family"].unique()
                                 if f not in ends]
    for name, part in groups:
        for col in scores:
            rows.append({"candidates": name, "score": col, "spearman_q": within_image_spearman(part, col, "q"),
                         "spearman_psnr": within_image_spearman(part, col, "psnr")})
    return pd.DataFrame(rows)


@dataclass(frozen=True)
class FitResult:
    """What :func:`fit_reward` wrote and measured."""

    model: Path
    report: Path | None
    table: Path | None
    summary: pd.DataFrame
    cap: float
    n_fit: int
    n_held: int


def report_schema(scores: Sequence[str]) -> pa.Schema:
    """Schema of ``report.parquet``: one row per held-out candidate, its labels and every score compared."""
    return pa.schema(
        [pa.field("image_id", pa.string(), nullable=False), pa.field("ladder", pa.int64(), nullable=False),
         pa.field("family", pa.string(), nullable=False), pa.field("param", pa.float64()),
         pa.field("psnr", pa.float64()), pa.field("ssim", pa.float64()), pa.field("q", pa.float64()),
         *[pa.field(c, pa.float64()) for c in scores]],
        metadata={"qtlib.table": "reward_report", "qtlib.scores": ",".join(scores)})


def fit_reward(paired_dir: str | Path, pretrained: str | Path, out: str | Path, cfg: RewardConfig, seed: int,
               *, report: str | Path | None = None, table: str | Path | None = None,
               students: Sequence[tuple[str | Path, Sequence[float]]] = (), device: str = "auto",
               classical: Sequence[str] = ("brisque", "niqe")) -> FitResult:
    """Fit ``liteiqa`` on the paired data and write the model file (and its held-out report).

    Args:
        paired_dir: the prepared paired folder.
        pretrained: the pretrained model (restorations of the ladders).
        out: the model file to write (``Layout.reward_model`` or a round's ``reward.pt``).
        cfg: the ``reward`` section; seed: the run's seed.
        report, table: ``report.md`` and ``report.parquet`` to write (None: not written).
        students: the refresh's students, ``(checkpoint, levels)``.
        device: cpu, cuda or auto.
        classical: metrics scored on the held-out ladders for comparison (BRISQUE, NIQE).

    Returns:
        :class:`FitResult`.
    """
    dev = resolve_device(device)
    features = LiteFeatures().to(dev)
    n_img = len(open_paired(paired_dir)[0])
    rng = np.random.default_rng(np.random.SeedSequence([seed, 29]))
    n_held = min(round(cfg.holdout * n_img), n_img - 1)  # at least one image to fit on
    held_ids = sorted(rng.permutation(n_img)[:n_held].tolist())
    ladders = build_ladders(paired_dir, pretrained, cfg, seed, features, dev, students,
                            keep=held_ids if report is not None else ())
    frame = ladders.frame
    is_held = frame["ladder"].isin(held_ids).to_numpy()
    fit_idx = torch.from_numpy(np.flatnonzero(~is_held))
    head, history = fit_head(ladders.features[fit_idx], ladders.q[fit_idx],
                             torch.tensor(frame["ladder"].to_numpy())[fit_idx], cfg, seed)
    with torch.no_grad():
        scores = head(ladders.features).numpy()
    frame = frame.assign(liteiqa=scores, held_out=is_held)
    clean_scores = frame.loc[frame["family"] == "clean", "liteiqa"]
    cap = float(np.percentile(clean_scores, 95)) if len(clean_scores) else math.inf
    summary = pd.DataFrame()
    if report is not None and n_held:
        held = frame[is_held].copy()
        images = ladders.images  # the held-out candidates, in frame order
        classical = [n for n in classical if usable(n, min(images.shape[-2:]))]
        for name in classical:
            metric = create_metric(name, dev)
            with torch.no_grad():
                raw = torch.cat([metric(images[i:i + 16].to(dev)).reshape(-1).float().cpu()
                                 for i in range(0, len(images), 16)])
            held[name] = (-raw if get_info(name).lower_better else raw).numpy()  # ranked: higher = better
        summary = report_table(held, ["liteiqa", *classical])
        if table is not None:
            write_table(held.drop(columns=["held_out"]), table, report_schema(["liteiqa", *classical]))
        Path(report).write_text(render_report(summary, cfg, n_img - n_held, n_held, cap, history), encoding="utf-8")
    manifest = manifest_in(paired_dir)  # the sha256 of every source file of the split
    meta = {"config": asdict(cfg), "seed": seed, "paired": file_hash(manifest) if manifest.is_file() else "",
            "pretrained": file_hash(pretrained),
            "students": [file_hash(p) for p, _ in students], "n_candidates": len(frame),
            "n_fit_images": int(n_img - n_held), "n_held_images": int(n_held), "final_loss": float(history[-1])}
    if not summary.empty:
        meta["spearman_q_all"] = float(summary.query("candidates == 'all' and score == 'liteiqa'")["spearman_q"].iloc[0])
    path = save_learned(out, LearnedFile(head.state_dict(), head.cfg, cap, meta))
    log.info("reward: fitted on %d images (%d candidates), %d held out; cap %.2f", n_img - n_held,
             int((~is_held).sum()), n_held, cap)
    return FitResult(path, Path(report) if report else None, Path(table) if table else None, summary, cap,
                     int(n_img - n_held), int(n_held))


def render_report(summary: pd.DataFrame, cfg: RewardConfig, n_fit: int, n_held: int, cap: float,
                  history: Sequence[float]) -> str:
    """``report.md``: the held-out within-image Spearman table and the fit's facts."""
    wide = summary.pivot(index="candidates", columns="score", values="spearman_q")
    wide_psnr = summary.pivot(index="candidates", columns="score", values="spearman_psnr")
    order = [c for c in ["liteiqa", "brisque", "niqe"] if c in wide.columns]
    table = pd.concat([wide[order].add_suffix(" vs q"), wide_psnr[order].add_suffix(" vs PSNR")], axis=1)
    table = table.reset_index()
    facts = (f"Fitted on {n_fit} paired images, {n_held} held out (whole ladders). {cfg.steps} steps, hidden "
             f"{cfg.hidden}, final loss {history[-1]:.4f}. Cap (95th percentile of the clean images' scores): "
             f"{cap:.3f}.")
    how = ("Within-image Spearman on the held-out ladders, with the label q (PSNR + SSIM) and with PSNR. `all`: "
           "every candidate of a ladder; a family: its candidates, the input and the clean image. BRISQUE and NIQE "
           "are direction-corrected.")
    return "\n".join(["# The learned reward (liteiqa): fit report", "", facts, "", how, "", to_markdown(table)])
