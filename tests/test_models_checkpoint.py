"""Checkpoints: bit-exact round trip, resumable training, atomic writes, safe loading."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from qtlib.config import ConditioningConfig, ModelConfig, NAFNetConfig, UNetConfig
from qtlib.models import (
    EMA,
    Checkpoint,
    CheckpointError,
    build_model,
    capture_rng_state,
    load_checkpoint,
    load_model,
    restore_rng_state,
    save_checkpoint,
)

CFG = ModelConfig(backbone="nafnet", nafnet=NAFNetConfig(width=4, enc_blocks=(1, 1), middle_blocks=1,
                                                         dec_blocks=(1, 1)),
                  conditioning=ConditioningConfig(embedding="discrete"))


def train_steps(model: nn.Module, opt: torch.optim.Optimizer, ema: EMA, n: int) -> None:
    for _ in range(n):
        x = torch.rand(2, 3, 8, 8)
        score = torch.randint(0, 8, (2,)).float()
        loss = nn.functional.l1_loss(model(x, score), x.flip(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update(model)


def make_state(tmp_path: Path) -> tuple[nn.Module, EMA, torch.optim.Optimizer, Path]:
    torch.manual_seed(0)
    model = build_model(CFG)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ema = EMA(model, decay=0.9)
    train_steps(model, opt, ema, 3)
    ckpt = Checkpoint(kind="train-state", model_config=CFG, model_state=model.state_dict(), ema_state=ema.state_dict(),
                      optimizer_state=opt.state_dict(), step=3, round=1, rng=capture_rng_state(),
                      extra={"loss": [0.5, 0.25], "note": "tiny"})
    return model, ema, opt, save_checkpoint(tmp_path / "state.pt", ckpt)


def test_round_trip_bit_exact(tmp_path: Path) -> None:
    model, ema, _, path = make_state(tmp_path)
    x = torch.rand(2, 3, 13, 11)
    score = torch.tensor([2.0, 7.0])
    student = load_model(path, use_ema=False)
    teacher = load_model(path)
    assert not student.training and not teacher.training
    model.eval()
    assert torch.equal(student(x, score), model(x, score))
    assert torch.equal(teacher(x, score), ema.module.eval()(x, score))
    assert not torch.equal(student(x, score), teacher(x, score))


def test_fields_round_trip(tmp_path: Path) -> None:
    _, _, opt, path = make_state(tmp_path)
    ckpt = load_checkpoint(path)
    assert ckpt.kind == "train-state" and ckpt.step == 3 and ckpt.round == 1
    assert ckpt.model_config == CFG and dataclasses.is_dataclass(ckpt.model_config)
    assert ckpt.extra == {"loss": [0.5, 0.25], "note": "tiny"}
    assert ckpt.ema_state is not None and ckpt.ema_state["num_updates"] == 3
    assert ckpt.optimizer_state is not None
    assert ckpt.optimizer_state["param_groups"][0]["lr"] == opt.state_dict()["param_groups"][0]["lr"]
    assert ckpt.qtlib_version


def test_resume_continues_identically(tmp_path: Path) -> None:
    model, ema, opt, path = make_state(tmp_path)
    train_steps(model, opt, ema, 2)  # the uninterrupted run
    ckpt = load_checkpoint(path, kinds=("train-state",))
    resumed = build_model(ckpt.model_config)
    resumed.load_state_dict(ckpt.model_state)
    opt2 = torch.optim.AdamW(resumed.parameters(), lr=1e-2)
    opt2.load_state_dict(ckpt.optimizer_state)
    ema2 = EMA(resumed, decay=0.9)
    ema2.load_state_dict(ckpt.ema_state)
    restore_rng_state(ckpt.rng)
    train_steps(resumed, opt2, ema2, 2)
    for a, b in zip(model.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(ema.module.state_dict().values(), ema2.module.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_rng_capture_restore() -> None:
    state = capture_rng_state()
    first = (random.random(), np.random.rand(), np.random.randn(), torch.rand(3))
    restore_rng_state(state)
    second = (random.random(), np.random.rand(), np.random.randn(), torch.rand(3))
    assert first[:3] == second[:3] and torch.equal(first[3], second[3])


def test_atomic_save_replaces_and_leaves_no_temp(tmp_path: Path) -> None:
    _, _, _, path = make_state(tmp_path)
    ok = load_checkpoint(path)
    bad = dataclasses.replace(ok, optimizer_state={"state": {}, "param_groups": [{"fn": print}]})
    with pytest.raises(CheckpointError, match=r"optimizer_state.param_groups\[0\].fn"):
        save_checkpoint(path, bad)
    assert load_checkpoint(path).step == 3  # the old file is intact
    save_checkpoint(path, dataclasses.replace(ok, step=4))
    assert load_checkpoint(path).step == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.pt"]


def test_exception_invalid_fields() -> None:
    with pytest.raises(ValueError, match="kind: got 'best'"):
        Checkpoint(kind="best", model_config=CFG, model_state={})
    with pytest.raises(ValueError, match="extra: must hold plain JSON values"):
        Checkpoint(kind="student", model_config=CFG, model_state={}, extra={"t": torch.ones(1)})


def test_exception_missing_corrupt_foreign_kind(tmp_path: Path) -> None:
    _, _, _, path = make_state(tmp_path)
    with pytest.raises(CheckpointError, match=r"missing\.pt: checkpoint not found"):
        load_model(tmp_path / "missing.pt")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(CheckpointError, match=r"truncated\.pt: corrupt checkpoint"):
        load_model(truncated)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match=r"garbage\.pt: not a checkpoint file"):
        load_model(garbage)
    foreign = tmp_path / "foreign.pt"
    torch.save(build_model(CFG).state_dict(), foreign)  # a bare state_dict, not a qtlib checkpoint
    with pytest.raises(CheckpointError, match=r"foreign\.pt: not a qtlib checkpoint"):
        load_model(foreign)
    with pytest.raises(CheckpointError, match=r"state\.pt: a 'train-state' checkpoint, expected 'teacher'"):
        load_model(path, kinds=("teacher",))


def test_exception_weights_do_not_fit_config(tmp_path: Path) -> None:
    other = ModelConfig(unet=UNetConfig(width=4, depth=1))
    ckpt = Checkpoint(kind="student", model_config=other, model_state=build_model(CFG).state_dict())
    path = save_checkpoint(tmp_path / "mismatch.pt", ckpt)
    with pytest.raises(CheckpointError, match=r"mismatch\.pt: weights do not fit the stored model config"):
        load_model(path)


class _RunsCode:
    """Pickles as a call to exec(): loading with a full unpickler writes the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",))


def test_pickled_object_is_refused_without_running(tmp_path: Path) -> None:
    marker = tmp_path / "marker.txt"
    payload = {"format": "qtlib-checkpoint", "format_version": 1, "kind": "student",
               "model_config": {}, "model_state": {}, "extra": _RunsCode(marker)}
    evil = tmp_path / "evil.pt"
    torch.save(payload, evil)
    for load in (load_checkpoint, load_model):
        with pytest.raises(CheckpointError, match=r"evil\.pt: refused to load: .*pickled Python object.*exec"):
            load(evil)
    assert not marker.exists()
    # Control: the file really is dangerous, a full unpickler runs its code.
    torch.load(evil, weights_only=False)
    assert marker.read_text() == "code ran"


@pytest.mark.parametrize(("where", "bad"), [("model", float("nan")), ("ema", float("inf"))])
def test_exception_nonfinite_weights_refused_naming_the_tensor(tmp_path: Path, where: str, bad: float,
                                                               capsys: pytest.CaptureFixture) -> None:
    """A diverged checkpoint is refused on load (weights_only=True still), by load_model and by qt restore."""
    from qtlib.cli import main
    from qtlib.imageio import write_image

    model = build_model(CFG)
    ema = EMA(model, 0.9)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    name = next(k for k, v in state.items() if v.is_floating_point() and v.ndim > 1)
    if where == "model":
        state[name].view(-1)[:3] = bad
        ema_state = None
    else:
        ema_state = ema.state_dict()
        ema_state["module"][name].view(-1)[0] = bad
    path = save_checkpoint(tmp_path / "bad.pt", Checkpoint("student" if ema_state else "pretrain", CFG, state,
                                                           ema_state))
    where_name = "model_state" if where == "model" else "ema_state.module"
    count = 3 if where == "model" else 1
    with pytest.raises(CheckpointError, match=rf"bad\.pt: refused to load: tensor {where_name}\['{name}'\] has "
                                              rf"{count} non-finite"):
        load_model(path)
    write_image(tmp_path / "x.png", torch.rand(3, 16, 16))
    assert main(["restore", "--checkpoint", str(path), "--quiet", str(tmp_path / "x.png"), str(tmp_path / "y.png")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("qt restore: error: ") and err.count("\n") == 1 and name in err
    assert not (tmp_path / "y.png").exists()
