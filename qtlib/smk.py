"""Glue for the workflow's scripts: config, log redirection and GPU lease for one job.

A rule's script is then a few lines: ``with job(snakemake, gpus=1) as ctx: stage(...)``.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from qtlib.config import Config, config_from_dict
from qtlib.lease import lease_gpus
from qtlib.util.atomic import remove_stale_temps


@dataclass(frozen=True)
class JobContext:
    """What a stage needs from Snakemake: the typed config and the device to run on."""

    cfg: Config
    device: str


def with_learned_file(cfg: Config, reward: Any) -> Config:
    """``cfg`` with ``iqa.learned.path`` set to the job's ``reward`` input (the workflow's fitted learned member)
    when the config names no file of its own; unchanged without such an input."""
    path = str(reward) if reward else ""
    if not path or cfg.iqa.learned.path:
        return cfg
    return replace(cfg, iqa=replace(cfg.iqa, learned=replace(cfg.iqa.learned, path=path)))


@contextlib.contextmanager
def job(snakemake: Any, gpus: int = 0) -> Iterator[JobContext]:
    """Redirect output to the rule's log, validate the config, clear temporaries a killed earlier attempt
    left beside the outputs, lease ``gpus`` devices (CPU if none)."""
    log_path = Path(snakemake.log[0])
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w", buffering=1) as fh, contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
        logging.basicConfig(stream=fh, level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                            force=True)
        cfg = with_learned_file(config_from_dict(dict(snakemake.config), source="snakemake config"),
                                getattr(snakemake.input, "reward", None) if "reward" in snakemake.input.keys() else None)
        for out in snakemake.output:  # a killed earlier attempt of this job may have left temporaries
            for stale in remove_stale_temps(out):
                logging.getLogger("qtlib").info("removed %s, left by an interrupted earlier run", stale)
        # Small tensors on a busy machine: oversubscribed thread pools are many times slower.
        torch.set_num_threads(max(1, int(snakemake.threads)))
        n = gpus if cfg.device != "cpu" else 0
        with lease_gpus(n) as lease:
            device = "cpu" if cfg.device == "cpu" else lease.device
            logging.getLogger("qtlib").info("rule %s: device %s (leased GPUs: %s)", snakemake.rule, device,
                                            list(lease.devices) or "none")
            try:
                yield JobContext(cfg, device)
                logging.getLogger("qtlib").info("rule %s: done", snakemake.rule)
            except Exception:
                logging.getLogger("qtlib").exception("rule %s failed", snakemake.rule)
                print(f"rule {snakemake.rule} failed, see {log_path}", file=sys.__stderr__)
                raise
