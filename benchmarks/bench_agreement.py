"""Does a reward rank restorations as ground truth does? Within-image Spearman on held-out test images, per task.

For each task (rain, snow, haze, low light, mixed), the real workflow builds the demo's data (a
paired set under the task's source recipe; a test set under its shifted target recipe), pretrains
a model and fits the learned member on the paired data (``reward_fit``): Snakemake targets
``reward/model.pt`` and the prepared test set in ``<out>/<task>/``. Then, on each held-out test
image, a ladder of candidates (:func:`qtlib.reward_fit.ladder`: the input, the clean image, blends,
the pretrained restoration and its blends, blur / noise / JPEG / resampling of the clean image and
of the restoration) is scored by every reward, and each reward's ranking of the ladder is compared
with the ranking by PSNR and by SSIM against the clean image (Spearman within the image, averaged
over images). The test images' target recipe is never seen by the fit.

Rewards: the learned member (``liteiqa``, fitted on that task's pairs), BRISQUE, NIQE and their
normalized mean (the offline default ensemble). DESIGN.md's table of the classical metrics used the
same idea on skimage crops.

Run (from the repository root; about 4 min per task on 2 cores)::

    python -m benchmarks.bench_agreement [--tasks rain,snow,haze,low_light,mixed] [--out results/agreement]
        [--json F]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pandas as pd
import torch
import yaml

from benchmarks.record import record, write_json
from qtlib.config.types import IQAConfig, LearnedConfig, Member
from qtlib.data.store import open_pair
from qtlib.iqa import Ensemble, create_metric
from qtlib.layout import Layout
from qtlib.models import load_model
from qtlib.reward_fit import ladder, ssim_y, within_image_spearman
from qtlib.util.markdown import to_markdown

ROOT = Path(__file__).resolve().parents[1]
#: task -> (demo.task, source recipe, target recipe, extra recipes)
MIXED = {"kind": "haze", "blur_sigma": [0.5, 1.0], "noise_std": [0.01, 0.03], "jpeg_quality": [40, 80]}
TASKS: dict[str, tuple[str, str, str, dict]] = {
    "rain": ("rain", "rain_source", "rain_target", {}),
    "snow": ("snow", "snow_source", "snow_target", {}),
    "haze": ("haze", "haze_source", "haze_target", {}),
    "low_light": ("low_light", "low_light_source", "low_light_target", {}),
    "mixed": ("haze", "mixed_source", "mixed_target", {"mixed_source": {**MIXED, "intensity": [0.3, 0.6]},
                                                       "mixed_target": {**MIXED, "intensity": [0.5, 0.9]}}),
}
REWARDS = ("liteiqa", "brisque", "niqe", "brisque+niqe")


def task_config(task: str, out: Path, seed: int) -> dict:
    kind, source, target, extra = TASKS[task]
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    cfg.update(results_dir=str(out), seed=seed, device="cpu")
    cfg["demo"] = {**cfg["demo"], "task": kind, "source_recipe": source, "target_recipe": target,
                   "n_paired": 32, "n_unlabeled": 2, "n_test": 16}
    if extra:
        cfg["degrade"] = {"recipes": extra}
    cfg["pretrain"] = {**cfg["pretrain"], "steps": 400}
    cfg["evaluate"] = {**cfg.get("evaluate", {}), "panel": ["brisque", "niqe", "liteiqa"]}  # schedules reward_fit
    return cfg


def run_workflow(config: Path, out: Path) -> None:
    layout = Layout(out)
    exe = str(Path(sys.executable).with_name("snakemake"))
    # The targets come first: `-q` takes any number of values and would swallow them.
    cmd = [exe, str(layout.reward_model), str(layout.degraded("test")), "--snakefile",
           str(ROOT / "workflow" / "Snakefile"), "--directory", str(ROOT), "--configfile", str(config),
           "--cores", "2", "--resources", "gpu=1", "-q", "host"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    (out / "snakemake.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed; see {out / 'snakemake.log'}")


@torch.no_grad()
def score_ladders(out: Path, seed: int) -> pd.DataFrame:
    """Every test image's ladder, with PSNR, SSIM and each reward (higher = better for every column)."""
    layout = Layout(out)
    degraded, clean = open_pair(layout.degraded("test").parent, clean=True)
    model = load_model(layout.pretrained)
    psnr = create_metric("psnr")
    learned = LearnedConfig(path=str(layout.reward_model), cap=False)
    ens = {name: Ensemble(IQAConfig(ensemble=members, learned=learned)) for name, members in (
        ("liteiqa", (Member("liteiqa", 1.0),)), ("brisque", (Member("brisque", 1.0),)),
        ("niqe", (Member("niqe", 1.0),)), ("brisque+niqe", (Member("brisque", 0.5), Member("niqe", 0.5))))}
    rows = []
    for i, image_id in enumerate(degraded.ids):
        d, c = degraded.read_tensor([i])[0], clean.read_tensor([i])[0]
        r = model(d[None], model.top_score)[0].clamp(0, 1)
        cands, names = ladder(d, c, r, seed + i)
        frame = pd.DataFrame(names, columns=["family", "param"]).assign(
            ladder=i, image_id=image_id, psnr=psnr(cands, c[None].expand_as(cands)).flatten().numpy(),
            ssim=ssim_y(cands, c[None]).numpy())
        for name, e in ens.items():
            frame[name] = e.score(cands).S.numpy()  # the normalized ensemble: higher = better
        rows.append(frame)
    return pd.concat(rows, ignore_index=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--out", type=Path, default=Path("results/agreement"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    table, records = [], []
    for task in [t.strip() for t in args.tasks.split(",") if t.strip()]:
        out = (args.out / task).resolve()
        out.mkdir(parents=True, exist_ok=True)
        config = out / "config.yaml"
        config.write_text(yaml.safe_dump(task_config(task, out, args.seed)))
        run_workflow(config, out)
        frame = score_ladders(out, args.seed)
        frame.to_parquet(out / "ladders.parquet", index=False)
        row = {"task": task, "images": int(frame["ladder"].nunique())}
        for reward in REWARDS:
            row[f"{reward} vs PSNR"] = within_image_spearman(frame, reward, "psnr")
            row[f"{reward} vs SSIM"] = within_image_spearman(frame, reward, "ssim")
        table.append(row)
        records.append(record("bench_agreement", "cpu", **row))
        print(f"{task}: " + ", ".join(f"{r} {row[f'{r} vs PSNR']:.2f}" for r in REWARDS), flush=True)
    result = pd.DataFrame(table)
    (args.out / "agreement.md").write_text(to_markdown(result.round(2)))
    print(to_markdown(result.round(2)))
    write_json(args.json, records)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
