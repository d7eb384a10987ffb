"""End to end on real stores: tiny pretrain -> label (2 shards) -> gate -> one training round.

Everything is real: Zarr image stores written by the data module's writer, label
stores and ledgers written by ``qtlib.label.label_shard`` with real pyiqa BRISQUE
scores, a bank from ``qtlib.gate.run_gate``, the real differentiable Reward. The
sizes are tiny (U-Net width 4, depth 2; 128 px images, 64 px patches).

Tolerances: resuming from a step checkpoint reproduces the uninterrupted run
bit for bit on CPU (every random choice comes from the epoch plan, and the
optimizer, EMA and RNG states are restored). Two gloo processes with batch 1
match one process with batch 2 to 1e-5 absolute in every weight after a round
of AdamW steps (measured: 1.4e-6): the only differences are the order of
floating-point sums (gradient averaging over ranks versus the mean over the
batch) and convolutions run at another batch size. That test uses a
batch-invariant reward: pyiqa 0.1.16's BRISQUE is not (the same image scores
4.7847 alone and 4.7850 next to a copy of itself), which Adam then amplifies to
~1e-4 in the weights.
"""

from __future__ import annotations

import math
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from qtlib.layout import Layout, input_labels_beside
from qtlib.cli import main
from qtlib.config import config_from_dict
from qtlib.config.types import Config
from qtlib.data.store import ImageStore, StoreWriter, commit_path
from qtlib.gate import run_gate
from qtlib.label import label_shard
from qtlib.models import load_checkpoint
from qtlib.train import LOG_SCHEMA, RoundPaths, pretrain, train_one_round

pytestmark = pytest.mark.slow

SIZE = 128

SETTINGS = {
    "seed": 0,
    "device": os.environ.get("QT_TEST_DEVICE", "cpu"),  # cuda: the same checks on a GPU
    "iqa": {"ensemble": [{"metric": "brisque", "weight": 1.0}], "blocks": [2, 2], "batch_size": 8},
    "model": {"backbone": "unet", "unet": {"width": 4, "depth": 2}},
    "pretrain": {"steps": 4, "batch_size": 2, "patch_size": 64, "lr": 1e-3, "checkpoint_every": 2,
                 "perceptual": "none"},
    "label": {"shards": 2, "batch_size": 4},
    "gate": {"tau1": "auto", "tau2": "auto", "quantile": 0.95},
    "train": {"batch_size": 3, "patch_size": 64, "lr": 1e-3, "checkpoint_every": 2, "ema_decay": 0.9,
              "losses": {"per": {"kind": "none"}}},
}


def _config(**train: object) -> Config:
    data = {**SETTINGS, "train": {**SETTINGS["train"], **train}}
    return config_from_dict(data)


def _photos(n: int, offset: int) -> np.ndarray:
    """n uint8 HWC crops of skimage photos."""
    from skimage import data

    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    out = []
    for k in range(n):
        p = photos[(k + offset) % len(photos)]
        y, x = (37 * (k + offset)) % (p.shape[0] - SIZE), (53 * (k + offset)) % (p.shape[1] - SIZE)
        out.append(np.ascontiguousarray(p[y:y + SIZE, x:x + SIZE]))
    return np.stack(out)


def _degrade(clean: np.ndarray, seed: int) -> np.ndarray:
    """Bright streaks and noise: a crude rain, enough for a supervised pretraining signal."""
    rng = np.random.default_rng(seed)
    img = clean.astype(np.float32)
    streaks = (rng.random(img.shape[:3]) < 0.02).astype(np.float32)[..., None] * 120
    return np.clip(img + streaks + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)


def _write_store(path: Path, images: np.ndarray, prefix: str) -> None:
    writer = StoreWriter(path, len(images), SIZE)
    for i, img in enumerate(images):
        writer.append(f"{prefix}{i}", img)
    writer.close({})
    commit_path(writer.tmp, path)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Paired + unlabeled stores, a pretrained model, round-0 label stores and bank."""
    root = tmp_path_factory.mktemp("train_e2e")
    clean = _photos(4, 0)
    _write_store(root / "paired" / "clean.zarr", clean, "p")
    _write_store(root / "paired" / "degraded.zarr", _degrade(clean, 1), "p")
    _write_store(root / "images.zarr", _degrade(_photos(4, 5), 2), "u")
    cfg = _config()
    result = _pretrain(root / "paired", root / "pretrain" / "model.pt", cfg, losses=root / "pretrain" / "log.parquet")
    assert result.model is not None and result.steps == 4
    results = root / "results"
    for k in range(2):
        label_shard(result.model, root / "images.zarr", k, 2, Layout(results).label_store(0, k),
                    Layout(results).ledger(0, k), 0, cfg.iqa, cfg.label,
                    device="cpu", progress=False)
    ledgers = sorted((results / "round_0" / "ledger").glob("shard_*.parquet"))
    run_gate(ledgers, None, cfg.gate, len(cfg.label.augmentations), results / "round_0" / "gate.parquet",
             results / "round_0" / "bank.parquet")
    return {"root": root, "model": result.model, "images": root / "images.zarr", "results": results,
            "bank": results / "round_0" / "bank.parquet"}


def _round(w: dict[str, Path], out: Path, cfg: Config, **kw: object):
    paths = RoundPaths.of(teacher=w["model"], student=w["model"], bank=w["bank"], images=w["images"],
                          results_dir=w["results"], out_student=out / "student.pt", out_teacher=out / "teacher.pt",
                          losses=out / "losses.parquet")
    kw.setdefault("device", cfg.device)
    return train_one_round(paths, 0, cfg.train, cfg.iqa, cfg.compute, cfg.seed, **kw)


def _pretrain(paired: Path, out: Path, cfg: Config, **kw: object):
    return pretrain(paired, out, cfg.model, cfg.pretrain, cfg.compute, cfg.seed, device=cfg.device, **kw)


def test_pretrain_checkpoint_is_complete(world: dict[str, Path]) -> None:
    ckpt = load_checkpoint(world["model"])
    assert ckpt.kind == "pretrain" and ckpt.step == 4 and ckpt.optimizer_state and ckpt.rng
    assert ckpt.extra["perceptual"] == "none" and ckpt.extra["determinism"]["deterministic_algorithms"]
    assert not torch.are_deterministic_algorithms_enabled()  # the stage put the process back as it found it
    emb = [v for k, v in ckpt.model_state.items() if k.startswith("embedding.heads")]
    assert emb and all(torch.count_nonzero(v) == 0 for v in emb)  # conditioning still exactly zero
    log = pd.read_parquet(world["root"] / "pretrain" / "log.parquet")
    assert list(log["step"]) == [0, 1, 2, 3] and np.isfinite(log["loss"]).all()


def test_one_round_end_to_end(world: dict[str, Path], tmp_path: Path) -> None:
    bank = pd.read_parquet(world["bank"])
    r = _round(world, tmp_path, _config(batch_size=2, losses={"per": {"kind": "nlpd"}}))
    assert r.student and r.teacher and r.losses and r.partial is None
    assert r.n_samples == len(bank) and r.steps == r.total_steps == math.ceil(len(bank) / 2)
    assert r.switches.perceptual == "nlpd" and r.switches.preference and r.switches.cropped
    log = pd.read_parquet(r.losses)
    assert list(log.columns) == LOG_SCHEMA.names and len(log) == r.steps
    for term in ("loss", "rec", "per"):
        assert np.isfinite(log[term]).all(), term
    # the preference and the cropped term start at 20% of the run's budget (1 round x r.steps), the default
    first = int(0.2 * r.steps)
    assert first >= 1
    for term in ("pref_first", "pref_second", "pref_reg", "cropped", "reward_high", "reward_ref"):
        assert log[term].iloc[:first].isna().all() and np.isfinite(log[term].iloc[first:]).all(), term
    student, teacher = load_checkpoint(r.student), load_checkpoint(r.teacher)
    assert student.kind == "student" and teacher.kind == "teacher"
    assert student.extra["global_step"] == r.steps and student.optimizer_state and student.ema_state
    start = load_checkpoint(world["model"]).model_state
    for k, v in start.items():  # EMA: the teacher moved from the start, but less than the student
        moved_t = (teacher.model_state[k] - v).abs().sum()
        moved_s = (student.model_state[k] - v).abs().sum()
        assert moved_t <= moved_s + 1e-12
    assert any((teacher.model_state[k] - v).abs().sum() > 0 for k, v in start.items())
    assert any(torch.count_nonzero(v) for k, v in student.model_state.items() if k.startswith("embedding.heads"))


@pytest.mark.parametrize("method", ["plain_mt", "filter_mt"])
def test_baselines_run(world: dict[str, Path], tmp_path: Path, method: str) -> None:
    r = _round(world, tmp_path, _config(method=method))
    log = pd.read_parquet(r.losses)
    assert np.isfinite(log["rec"]).all()
    assert log[["pref_first", "cropped"]].isna().all().all()
    n_images = pd.read_parquet(world["bank"])["image_id"].nunique()
    if method == "filter_mt":
        assert r.n_samples == n_images


def test_input_labels_round(world: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """train.input_labels: every image of the bank scored, the kept inputs added as samples at their own S."""
    from qtlib.iqa import Ensemble
    from qtlib.train.inputs import input_labels_schema

    cheap = {"preference": False, "cropped": False}
    bank = pd.read_parquet(world["bank"])
    cfg = _config(input_labels=True, checkpoint_every=1, **cheap)
    with caplog.at_level("INFO", logger="qtlib.train.loop"):
        r = _round(world, tmp_path, cfg)
    assert r.student and r.switches.input_labels
    table = pd.read_parquet(tmp_path / "input_labels.parquet")  # beside the student
    assert list(table.columns) == input_labels_schema(["brisque"]).names
    assert sorted(table["image_id"]) == sorted(bank["image_id"].unique())  # a row per image of the bank
    poorest = bank.groupby("image_id")["S"].min().loc[table["image_id"]].to_numpy()
    assert np.array_equal(table["kept"], np.isfinite(table["S"]) & (table["S"] < poorest) & (table["S"] < 7.0))
    assert table["kept"].any(), table  # else the round below tests nothing
    assert r.n_samples == len(bank) + int(table["kept"].sum())  # the sample count grew
    assert f"{int(table['kept'].sum())} of {len(table)} inputs added" in caplog.text
    # the scores are the labelling ensemble's on the stored pixels
    x = ImageStore(world["images"]).read_tensor(table["source_index"].to_numpy())
    again = Ensemble(_config().iqa, "cpu").score(x)
    assert np.allclose(table["S"], again.S.double().numpy(), atol=1e-3)
    assert np.allclose(table["norm_brisque"], again.normalized["brisque"].double().numpy(), atol=1e-4)
    cut = _round(world, tmp_path / "cut", cfg, stop_after=1)
    with pytest.raises(ValueError, match="other inputs or another config"):  # the switch is in the fingerprint
        _round(world, tmp_path / "x", _config(checkpoint_every=1, **cheap), resume=cut.partial)
    rest = _round(world, tmp_path / "cut", cfg)  # a resumed round recomputes the same samples
    assert rest.resumed_from == 1 and rest.n_samples == r.n_samples
    _states_equal(r.student, rest.student)
    assert (tmp_path / "cut" / "input_labels.parquet").read_bytes() == (tmp_path / "input_labels.parquet").read_bytes()
    off = _round(world, tmp_path / "off", _config(**cheap))
    assert off.n_samples == len(bank) and not (tmp_path / "off" / "input_labels.parquet").exists()
    with pytest.raises(ValueError, match="train.input_labels needs train.method: qualiteacher .*got method plain_mt"):
        _round(world, tmp_path / "plain", _config(method="plain_mt", input_labels=True))


def _states_equal(a: Path, b: Path) -> None:
    ca, cb = load_checkpoint(a), load_checkpoint(b)
    for k in ca.model_state:
        assert torch.equal(ca.model_state[k], cb.model_state[k]), k
    if ca.ema_state:
        for k in ca.ema_state["module"]:
            assert torch.equal(ca.ema_state["module"][k], cb.ema_state["module"][k]), k
    if ca.optimizer_state:
        for i, s in ca.optimizer_state["state"].items():
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(s[key], cb.optimizer_state["state"][i][key]), (i, key)


def test_resume_is_bit_exact(world: dict[str, Path], tmp_path: Path) -> None:
    cfg = _config(checkpoint_every=1)
    full = _round(world, tmp_path / "full", cfg)
    assert full.steps >= 2
    first = _round(world, tmp_path / "cut", cfg, stop_after=1)
    assert first.student is None and first.partial and first.partial.is_file() and first.steps == 1
    rest = _round(world, tmp_path / "cut", cfg)  # picks up student.pt.partial by itself
    assert rest.resumed_from == 1 and rest.steps == full.steps and not first.partial.exists()
    _states_equal(full.student, rest.student)
    _states_equal(full.teacher, rest.teacher)
    a, b = pd.read_parquet(full.losses), pd.read_parquet(rest.losses)
    pd.testing.assert_frame_equal(a, b)
    assert full.losses.read_bytes() == rest.losses.read_bytes()  # no wall time in the log: equal bytes
    # equal bytes, not only equal values: the next round's fingerprint and teacher_hash hash these files
    assert full.student.read_bytes() == rest.student.read_bytes()
    assert full.teacher.read_bytes() == rest.teacher.read_bytes()


def test_stale_partial_is_ignored(world: dict[str, Path], tmp_path: Path) -> None:
    cheap = {"preference": False, "cropped": False}
    _round(world, tmp_path, _config(**cheap), stop_after=1)  # leaves student.pt.partial
    with pytest.raises(ValueError, match="other inputs or another config"):  # asked for explicitly: refused
        _round(world, tmp_path / "x", _config(lr=5e-4, **cheap), resume=tmp_path / "student.pt.partial")
    r = _round(world, tmp_path, _config(lr=5e-4, **cheap))  # found automatically: ignored, start afresh
    assert r.resumed_from == 0 and r.student


def test_pretrain_resume_is_bit_exact(world: dict[str, Path], tmp_path: Path) -> None:
    cfg = _config()
    paired = world["root"] / "paired"
    cut = _pretrain(paired, tmp_path / "m.pt", cfg, stop_after=3)
    assert cut.model is None and cut.partial.is_file()
    done = _pretrain(paired, tmp_path / "m.pt", cfg)
    assert done.resumed_from == 3  # a stop writes the step checkpoint where it stopped
    _states_equal(world["model"], done.model)


def test_cosine_schedules_decay_and_resume_exactly(world: dict[str, Path], tmp_path: Path) -> None:
    """train.lr_schedule cosine: the round's logged lr falls from train.lr; a resumed round equals a whole one."""
    cfg = _config(lr_schedule="cosine", checkpoint_every=1, preference=False, cropped=False)
    full = _round(world, tmp_path / "full", cfg)
    lr = pd.read_parquet(full.losses)["lr"].tolist()
    assert lr[0] == cfg.train.lr and all(a > b for a, b in zip(lr, lr[1:], strict=False)) and lr[-1] > 0
    _round(world, tmp_path / "cut", cfg, stop_after=1)
    rest = _round(world, tmp_path / "cut", cfg)
    assert rest.resumed_from == 1 and full.student.read_bytes() == rest.student.read_bytes()
    # pretrain.lr_schedule cosine: other weights than the constant rate, and resume stays bit-exact
    pc = replace(cfg, pretrain=replace(cfg.pretrain, lr_schedule="cosine"))
    paired = world["root"] / "paired"
    whole = _pretrain(paired, tmp_path / "p.pt", pc)
    _pretrain(paired, tmp_path / "q.pt", pc, stop_after=2)
    resumed = _pretrain(paired, tmp_path / "q.pt", pc)
    assert resumed.resumed_from == 2
    _states_equal(whole.model, resumed.model)
    with pytest.raises(AssertionError):
        _states_equal(world["model"], whole.model)


def test_strong_view_ema_half_life_and_resume_in_a_round(world: dict[str, Path], tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    """train.strong_view changes what the student learns (not the labels it learns from: the bank and the
    label stores are read-only inputs of the round), is drawn from the step, so a resumed round equals a whole
    one; train.ema_half_life sets the teacher's decay from the round's steps."""
    bank_bytes = world["bank"].read_bytes()
    base = dict(checkpoint_every=1, preference=False, cropped=False, ema_half_life=0.5)
    plain = _round(world, tmp_path / "plain", _config(**base))
    cfg = _config(**base, strong_view={"enabled": True, "p": 1.0})
    with caplog.at_level("INFO", logger="qtlib.train.loop"):
        full = _round(world, tmp_path / "full", cfg)
    decay = 0.5 ** (1 / (0.5 * full.total_steps))
    assert f"EMA decay {decay:.6f}" in caplog.text
    with pytest.raises(AssertionError):
        _states_equal(plain.student, full.student)
    _round(world, tmp_path / "cut", cfg, stop_after=1)
    rest = _round(world, tmp_path / "cut", cfg)
    assert rest.resumed_from == 1 and full.student.read_bytes() == rest.student.read_bytes()
    assert world["bank"].read_bytes() == bank_bytes


def contrast_reward(y: torch.Tensor) -> torch.Tensor:
    """A batch-invariant differentiable reward (module level, so spawned ranks can unpickle it)."""
    return 10 * y.std(dim=(1, 2, 3))


def dying_reward(y: torch.Tensor) -> torch.Tensor:
    """:func:`contrast_reward`, but data-parallel rank 1 kills its own process (SIGKILL) when it first calls it."""
    import signal

    import torch.distributed as dist

    if dist.is_initialized() and dist.get_rank() == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return contrast_reward(y)


def test_ddp_two_processes_match_one(world: dict[str, Path], tmp_path: Path) -> None:
    """With the input samples on (train.input_labels), whose scores rank 0 computes and broadcasts."""
    one = _round(world, tmp_path / "one", _config(batch_size=2, input_labels=True), reward=contrast_reward)
    two = _round(world, tmp_path / "two", _config(batch_size=1, gpus=2, input_labels=True), reward=contrast_reward)
    scores = [pd.read_parquet(input_labels_beside(r.student)) for r in (one, two)]
    assert scores[0]["kept"].any() and scores[0].equals(scores[1])  # rank 1 trained on rank 0's input samples
    assert two.steps == one.steps and two.global_step == one.global_step
    a, b = load_checkpoint(one.student), load_checkpoint(two.student)
    worst = max((a.model_state[k] - b.model_state[k]).abs().max().item() for k in a.model_state)
    assert worst < 1e-5, worst
    ta, tb = load_checkpoint(one.teacher), load_checkpoint(two.teacher)
    assert max((ta.model_state[k] - tb.model_state[k]).abs().max().item() for k in ta.model_state) < 1e-5
    la, lb = pd.read_parquet(one.losses), pd.read_parquet(two.losses)
    assert np.allclose(la["loss"], lb["loss"], atol=1e-4)


def test_ddp_a_killed_rank_fails_the_round_naming_it(world: dict[str, Path], tmp_path: Path) -> None:
    """Rank 1 dies by SIGKILL in its first reward call, while rank 0 goes on into the next collective: the
    round fails within a bounded time, naming the rank and the signal, and writes no student."""
    import time

    from qtlib.train.ddp import RankFailed

    t0 = time.monotonic()
    with pytest.raises(RankFailed, match="rank 1 of 2 .* killed by SIGKILL"):
        _round(world, tmp_path, _config(batch_size=1, gpus=2), reward=dying_reward)
    assert time.monotonic() - t0 < 120
    assert not (tmp_path / "student.pt").exists() and not (tmp_path / "teacher.pt").exists()


def test_cli_pretrain_and_train(world: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg_file = tmp_path / "config.yaml"
    cfg_file.write_text(yaml.safe_dump({**SETTINGS, "train": {**SETTINGS["train"], "preference": False}}))
    assert main(["pretrain", "--config", str(cfg_file), "--paired", str(world["root"] / "paired"),
                 "--out", str(tmp_path / "model.pt"), "--stop-after", "1"]) == 0
    assert "stopped" in capsys.readouterr().out
    assert main(["pretrain", "--config", str(cfg_file), "--paired", str(world["root"] / "paired"),
                 "--out", str(tmp_path / "model.pt")]) == 0
    args = ["train", "--round", "0", "--config", str(cfg_file), "--teacher", str(tmp_path / "model.pt"),
            "--student", str(tmp_path / "model.pt"), "--bank", str(world["bank"]), "--images",
            str(world["images"]), "--results-dir", str(world["results"]), "--out-student",
            str(tmp_path / "s.pt"), "--out-teacher", str(tmp_path / "t.pt"), "--log", str(tmp_path / "l.parquet")]
    assert main(args) == 0
    assert "method qualiteacher" in capsys.readouterr().out
    assert (tmp_path / "s.pt").is_file() and (tmp_path / "t.pt").is_file()
    assert main([*args[:-2], "--log", str(tmp_path / "l.parquet"), "--resume", str(tmp_path / "nope")]) == 1
    assert "no step checkpoint" in capsys.readouterr().err


def test_supervised_anchor_and_initial_w_init_in_a_round(world: dict[str, Path], tmp_path: Path) -> None:
    """train.losses.sup reads the paired folder each step; reg_anchor: initial takes W_init from `initial`."""

    from qtlib.models import Checkpoint, build_model, save_checkpoint
    from qtlib.train.loop import RoundSpec, _w_init

    ckpt = load_checkpoint(world["model"])
    model = build_model(ckpt.model_config)
    model.load_state_dict(ckpt.model_state)
    with torch.no_grad():
        for p in model.injection_parameters():
            p.add_(1.0)
    initial = save_checkpoint(tmp_path / "initial.pt", Checkpoint("pretrain", ckpt.model_config, model.state_dict()))
    cfg = _config(epochs=1, preference=False, cropped=False,
                  losses={"per": {"kind": "none"}, "sup": {"weight": 1.0, "batch_size": 2},
                          "pref": {"reg_anchor": "initial"}})
    paths = RoundPaths.of(teacher=world["model"], student=world["model"], bank=world["bank"], images=world["images"],
                          results_dir=world["results"], out_student=tmp_path / "s.pt", out_teacher=tmp_path / "t.pt",
                          losses=tmp_path / "l.parquet", paired=world["root"] / "paired", initial=initial)
    spec = RoundSpec(paths, 0, replace(cfg.train, preference=True), cfg.iqa, cfg.compute, cfg.seed)
    w_init = _w_init(spec, torch.device("cpu"))
    groups = cfg.train.losses.pref.reg_params
    assert groups == ("embedding", "injected")  # the default anchored set
    assert len(w_init) == len(model.reg_parameters(groups)) > len(model.injection_parameters())
    assert all(torch.equal(a, b.detach()) for a, b in zip(w_init, model.reg_parameters(groups), strict=True))
    assert _w_init(replace(spec, train=_config(losses={"pref": {"reg_anchor": "round"}}).train),
                   torch.device("cpu")) is None  # reg_anchor: round
    assert _w_init(replace(spec, train=cfg.train), torch.device("cpu")) is None  # no preference: no L_reg
    with pytest.raises(ValueError, match="reg_anchor: initial needs the initial"):
        _w_init(replace(spec, paths=replace(paths, initial=None)), torch.device("cpu"))
    # a round that starts from the pretrained model itself (round 0) anchors to it without `initial`
    assert _w_init(replace(spec, paths=replace(paths, initial=None)), torch.device("cpu"), "pretrain") is None
    r = train_one_round(paths, 0, cfg.train, cfg.iqa, cfg.compute, cfg.seed, device=cfg.device)
    log = pd.read_parquet(r.losses)
    assert log["sup"].notna().all() and (log["sup"] > 0).all()
    with pytest.raises(ValueError, match="no paired folder"):
        train_one_round(replace(paths, paired=None, out_student=tmp_path / "s2.pt"), 0, cfg.train, cfg.iqa,
                        cfg.compute, cfg.seed, device=cfg.device)


def nan_reward(y: torch.Tensor) -> torch.Tensor:
    """A reward that has gone NaN (differentiable, so the preference loss and every gradient are NaN)."""
    return y.mean(dim=(1, 2, 3)) * float("nan")


def test_nonfinite_loss_skips_steps_and_stops_past_the_limit(world: dict[str, Path], tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    from qtlib.train.guard import NonFiniteLossError

    now = {"per": {"kind": "none"}, "pref": {"start": 0}, "cropped": {"start": 0}}  # the NaN reward from step 0
    cfg = _config(batch_size=2, max_nonfinite_steps=100, losses=now)
    with caplog.at_level("WARNING", logger="qtlib.train.guard"):
        r = _round(world, tmp_path / "tolerated", cfg, reward=nan_reward)
    assert r.student is not None and r.steps > 2
    assert caplog.text.count("optimizer step skipped") == r.steps
    log = pd.read_parquet(r.losses)
    assert log["loss"].isna().all()
    start, student = load_checkpoint(world["model"]).model_state, load_checkpoint(r.student)
    assert all(torch.equal(v, student.model_state[k]) for k, v in start.items())  # no step was taken
    with pytest.raises(NonFiniteLossError, match=r"train round 0: stopped at step 2: 3 steps .* "
                                                 r"train.max_nonfinite_steps = 2"):
        _round(world, tmp_path / "stopped", _config(batch_size=2, max_nonfinite_steps=2, losses=now), reward=nan_reward)
    assert not (tmp_path / "stopped" / "student.pt").exists()
