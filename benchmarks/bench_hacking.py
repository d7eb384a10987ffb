"""How easily is each reward fooled? Pixel-space gradient ascent from a restoration, scored by ground truth.

For each held-out test image (a prepared test folder: ``degraded.zarr`` + ``clean.zarr``) the
pretrained model's restoration is the start. Each reward then gets ``--steps`` steps of gradient
ascent on its own score, in pixel space, of two kinds:

- ``sign``: ``x += 1/255 * sign(grad)`` (an L-inf step of one grey level);
- ``l2``: ``x += (0.25/255) * grad / rms(grad)`` (an RMS step of a quarter grey level);

clamped to [0, 1]. At every step the reward, PSNR and SSIM against the clean image are recorded.
Per run: the first step at which the reward rates the image above its clean version (the reward
is fooled), and the first step that costs 0.5 dB of PSNR. The rewards: BRISQUE, NIQE and their
ensemble (``qtlib.iqa.Reward``), the learned member with each defense (``--reward``, a fitted
file), and two references: random sign steps (the null, what a reward with no information costs)
and ascent on the true PSNR (what a reward that knew the truth would gain).

Targets for the defended learned reward (issue 24): within 50 sign steps it never rates a hacked
image above the clean one, and its ascent costs less PSNR than the random null.

Run (from the repository root)::

    python -m benchmarks.bench_hacking --images results/data/test --pretrained results/pretrain/model.pt \\
        --reward results/reward/model.pt [--n 8 --steps 50] [--json F]
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from benchmarks.record import record, write_json
from qtlib.config.types import IQAConfig, LearnedConfig, Member
from qtlib.data.store import open_pair
from qtlib.iqa import Reward, create_metric
from qtlib.models import load_model

Score = Callable[[torch.Tensor], torch.Tensor]
SIGN, L2 = 1.0 / 255.0, 0.25 / 255.0


@dataclass
class Trace:
    """One (reward, step kind) run over a batch: per step, per image."""

    reward: np.ndarray
    psnr: np.ndarray
    ssim: np.ndarray
    clean_reward: np.ndarray

    def first(self, mask: np.ndarray) -> np.ndarray:
        """Per image, the first step where ``mask`` (steps x images) holds; -1 = never."""
        hit = mask.any(axis=0)
        return np.where(hit, mask.argmax(axis=0), -1)


def ascend(score: Score | None, x0: torch.Tensor, clean: torch.Tensor, kind: str, steps: int,
           psnr: Callable, ssim: Callable, seed: int = 0) -> Trace:
    """``steps`` ascent steps on ``score`` from ``x0`` (``score`` None: random sign steps, the null)."""
    g = torch.Generator().manual_seed(seed)
    x = x0.clone()
    rows_r, rows_p, rows_s = [], [], []
    with torch.no_grad():
        clean_r = score(clean) if score is not None else torch.zeros(len(x))
    for step in range(steps + 1):
        xr = x.clone().requires_grad_(score is not None)
        r = score(xr) if score is not None else torch.zeros(len(x))
        with torch.no_grad():
            rows_r.append(r.detach().numpy())
            rows_p.append(psnr(x, clean).flatten().numpy())
            rows_s.append(ssim(x, clean).flatten().numpy())
        if step == steps:
            break
        if score is None:
            d = torch.randint(0, 2, x.shape, generator=g).float() * 2 - 1
        else:
            (grad,) = torch.autograd.grad(r.sum(), xr)
            d = grad.sign() if kind == "sign" else grad / grad.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt().clamp_min(1e-12)
        x = (x + (SIGN if kind == "sign" else L2) * d).clamp(0, 1).detach()
    return Trace(np.stack(rows_r), np.stack(rows_p), np.stack(rows_s), clean_r.detach().numpy())


def rewards(reward_file: str | None) -> dict[str, Score | None]:
    """The rewards measured: classical, learned with each defense, and the references."""
    out: dict[str, Score | None] = {
        "brisque": Reward(IQAConfig(ensemble=(Member("brisque", 1.0),))),
        "niqe": Reward(IQAConfig(ensemble=(Member("niqe", 1.0),))),
        "brisque+niqe": Reward(IQAConfig()),
    }
    if reward_file:
        base = IQAConfig(ensemble=(Member("liteiqa", 1.0),), learned=LearnedConfig(path=reward_file, cap=False))
        for name, learned in (("liteiqa", base.learned), ("liteiqa+cap", replace(base.learned, cap=True)),
                              ("liteiqa+tta4", replace(base.learned, transforms=4)),
                              ("liteiqa+cap+tta4", replace(base.learned, cap=True, transforms=4))):
            out[name] = Reward(replace(base, learned=learned))
    out["random (null)"] = None
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", required=True, type=Path, help="a prepared test folder (degraded.zarr, clean.zarr)")
    p.add_argument("--pretrained", required=True, type=Path, help="the model whose restorations are the start")
    p.add_argument("--reward", default=None, help="a fitted liteiqa file (results/reward/model.pt)")
    p.add_argument("--n", type=int, default=8, help="test images (the first n)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    degraded, clean_store = open_pair(args.images, clean=True)
    rows = np.arange(min(args.n, len(degraded)))
    x, clean = degraded.read_tensor(rows), clean_store.read_tensor(rows)
    model = load_model(args.pretrained)
    with torch.no_grad():
        x0 = model(x, model.top_score).clamp(0, 1)
    psnr, ssim = create_metric("psnr"), create_metric("ssim")
    truth = lambda y: psnr(y, clean).flatten()
    scores = {**rewards(args.reward), "true PSNR": truth}
    print(f"{len(rows)} images of {args.images}, start: the pretrained restoration ({float(psnr(x0, clean).mean()):.2f} "
          f"dB); {args.steps} steps; 'fooled': reward above the clean image's; '-0.5 dB': PSNR 0.5 dB below the start")
    print(f"{'reward':<18} {'step':<5} {'fooled at (median)':>18} {'fooled (share)':>15} {'-0.5 dB at (median)':>20} "
          f"{'dPSNR at end':>13}")
    records = []
    for name, score in scores.items():
        for kind in ("sign", "l2"):
            t = ascend(score, x0, clean, kind, args.steps, psnr, ssim)
            fooled = t.first(t.reward > t.clean_reward[None]) if score is not None and name != "true PSNR" else \
                np.full(len(rows), -1)
            cost = t.first(t.psnr < t.psnr[0][None] - 0.5)
            d_end = float((t.psnr[-1] - t.psnr[0]).mean())

            def med(v: np.ndarray) -> float:
                hit = v[v >= 0]
                return float(np.median(hit)) if len(hit) else math.nan

            print(f"{name:<18} {kind:<5} {med(fooled):>18.1f} {float((fooled >= 0).mean()):>15.2f} {med(cost):>20.1f} "
                  f"{d_end:>+13.3f}")
            records.append(record("bench_hacking", "cpu", reward=name, step_kind=kind, steps=args.steps,
                                  n_images=len(rows), fooled_share=float((fooled >= 0).mean()),
                                  fooled_median_step=med(fooled), cost_05db_share=float((cost >= 0).mean()),
                                  cost_05db_median_step=med(cost), dpsnr_end=d_end,
                                  dssim_end=float((t.ssim[-1] - t.ssim[0]).mean()),
                                  psnr_curve=t.psnr.mean(1).round(4).tolist()))
    write_json(args.json, records)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
