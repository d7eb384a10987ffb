"""Where does each loss term push the student? Gradient norms and their cosine with the ground truth's.

For a student checkpoint of a finished run (default: its pretrained model) and that run's test set
(which has ground truth), each term of eq. (11) is computed alone on the same batches, as
``train_step`` computes it, and its gradient with respect to every student weight is compared
with the gradient of L1 against the clean image (the direction in which the student gets better
on ground truth):

- ``rec``: L1 to the teacher's label (the mean of its views, as ``label.mean_label`` makes it);
- ``pref``: L1 + 0.5 L2 of eq. (8) (L_reg is 0 at the anchor), the reward on ``train.reward_window``;
- ``cropped``: eq. (9) on crops of half the window;
- ``gt``: L1 to the clean image (the reference direction; its cosine with itself is 1).

Run (from the repository root, on a proxy run folder)::

    python -m benchmarks.bench_terms results/proxy/rain/qualiteacher/seed_0 [--batches 4] [--json F]

Prints, per term, the mean gradient norm and the mean cosine with ``gt`` over the batches. A term
whose cosine with ``gt`` is about 0 moves the weights in a direction that ground truth does not
favour; one with a large norm and a cosine near 0 dominates the step and points nowhere.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from benchmarks.record import record, write_json
from qtlib.augment import get_augmentations, pick_labels, restore_views
from qtlib.config import load_config
from qtlib.config.types import (
    MEAN_LABEL,
    CroppedLoss,
    Losses,
    PerLoss,
    PrefLoss,
    RecLoss,
    SupLoss,
)
from qtlib.data.store import open_pair
from qtlib.layout import Layout
from qtlib.models import load_model
from qtlib.train import build_step_context, train_step
from qtlib.train.samples import Batch

OFF = Losses(rec=RecLoss(weight=0.0), per=PerLoss(weight=0.0), pref=PrefLoss(weight=0.0),
             cropped=CroppedLoss(weight=0.0), sup=SupLoss(weight=0.0))


def term_losses(base: Losses, term: str) -> Losses:
    """``base`` with only ``term`` on (``gt``: the supervised L1 against the clean image), every start 0."""
    on = {
        "rec": replace(OFF, rec=replace(base.rec, weight=1.0, start=0, block_weighting=False)),
        "pref": replace(OFF, pref=replace(base.pref, weight=1.0, start=0, reg_weight=0.0)),
        "cropped": replace(OFF, cropped=replace(base.cropped, weight=1.0, start=0)),
        "gt": replace(OFF, sup=replace(base.sup, weight=1.0, per_weight=0.0, start=0)),
    }
    return on[term]


def batches(run: Path, n: int, size: int, patch: int, seed: int = 0):
    """``n`` batches of ``size`` test images: (degraded, clean, top-left of the training patch)."""
    layout = Layout(run)
    degraded, clean = open_pair(layout.degraded("test").parent, clean=True)
    rng = np.random.default_rng(seed)
    rows = rng.permutation(len(degraded))[: n * size]
    for chunk in np.array_split(rows, n):
        x, gt = degraded.read_tensor(chunk), clean.read_tensor(chunk)
        h, w = x.shape[-2:]
        t, l = rng.integers(0, h - patch + 1), rng.integers(0, w - patch + 1)
        yield x, gt, (t, l)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="a finished run folder (its config.yaml, pretrain/, data/test/)")
    p.add_argument("--student", type=Path, default=None, help="checkpoint to measure (default: the pretrained model)")
    p.add_argument("--teacher", type=Path, default=None, help="the labelling teacher (default: the student)")
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    cfg = load_config(args.run / "config.yaml")
    tc = cfg.train
    layout = Layout(args.run)
    student_path = args.student or layout.pretrained
    teacher = load_model(args.teacher or student_path, use_ema=True)
    dev = torch.device("cpu")
    augs = get_augmentations(cfg.label.augmentations)
    sums: dict[str, list[float]] = {}
    terms = ("gt", "rec", "pref", "cropped")
    for x, gt, (t, left) in batches(args.run, args.batches, tc.batch_size, tc.patch_size):
        with torch.no_grad():
            views = restore_views(lambda v: teacher(v, teacher.top_score), x, augs)
            label = pick_labels(views, list(cfg.label.augmentations), [MEAN_LABEL])[:, 0].clamp(0, 1)
            plain = teacher(x, teacher.top_score).clamp(0, 1)
        window = min(tc.reward_window or tc.patch_size, x.shape[-1], x.shape[-2])
        ps = tc.patch_size
        batch = Batch(x=x[..., t:t + ps, left:left + ps], target=label[..., t:t + ps, left:left + ps],
                      weight=torch.ones(x.shape[0], 1, ps, ps), cond=torch.full((x.shape[0],), 7.0),
                      low=torch.full((x.shape[0],), 3.0), crop_yx=torch.zeros(x.shape[0], 2, dtype=torch.long),
                      window=x[..., :window, :window], ref=plain[..., :window, :window],
                      sup_x=x[..., t:t + ps, left:left + ps], sup_y=gt[..., t:t + ps, left:left + ps])
        grads = {}
        for term in terms:
            student = load_model(student_path, use_ema=False)
            student.train()
            opt = torch.optim.SGD(student.parameters(), lr=0.0)
            tcfg = replace(tc, losses=term_losses(tc.losses, term), preference=term == "pref",
                           cropped=term == "cropped", method="qualiteacher")
            ctx = build_step_context(student, opt, tcfg, cfg.iqa, dev, top_score=7.0, window=window, budget=1,
                                     perceptual="none")
            train_step(ctx, batch, step=0)
            grads[term] = torch.cat([q.grad.flatten() for q in student.parameters() if q.grad is not None])
        for term in terms:
            g, ref = grads[term], grads["gt"]
            sums.setdefault(f"{term}_norm", []).append(float(g.norm()))
            sums.setdefault(f"{term}_cos_gt", []).append(float(torch.nn.functional.cosine_similarity(g, ref, dim=0)))
    out = {k: float(np.mean(v)) for k, v in sums.items()}
    print(f"{args.run} (student {student_path.name}, {args.batches} batches of {tc.batch_size}; reward window "
          f"{tc.reward_window} px)")
    for term in terms:
        print(f"  {term:<8} |grad| {out[f'{term}_norm']:.4f}   cos(grad, grad_gt) {out[f'{term}_cos_gt']:+.3f}")
    write_json(args.json, [record("bench_terms", "cpu", run=str(args.run), student=str(student_path), **out)])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
