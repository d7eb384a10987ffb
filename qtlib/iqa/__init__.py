"""No-reference IQA on pyiqa: catalog, normalization, ensemble and block scores, rewards, offline weights.

Every score in qtlib goes through this package, and :func:`create_metric` is the
one place ``pyiqa.create_metric`` is called (offline unless allowed).

- :data:`CATALOG`, :func:`normalize`: metric facts as data; raw -> [0, 1], higher = better.
- :class:`Ensemble`: ``score`` (per image) and ``score_blocks`` (per block, batched), no grad.
- :class:`Reward`: the differentiable ensemble for training losses.
- :mod:`qtlib.iqa.weights`: ``prepare`` / ``status`` of weight files (``qt weights``).
"""

from qtlib.iqa import weights
from qtlib.iqa.catalog import (
    CATALOG,
    MetricInfo,
    UnknownMetricError,
    WeightFile,
    get_info,
    normalize,
    pyiqa_cache_dir,
)
from qtlib.iqa.ensemble import BlockScores, Ensemble, EnsembleScores, split_blocks
from qtlib.iqa.factory import MissingWeightsError, create_metric
from qtlib.iqa.rewards import NoDifferentiableMemberError, Reward

__all__ = [
    "CATALOG",
    "BlockScores",
    "Ensemble",
    "EnsembleScores",
    "MetricInfo",
    "MissingWeightsError",
    "NoDifferentiableMemberError",
    "Reward",
    "UnknownMetricError",
    "WeightFile",
    "create_metric",
    "get_info",
    "normalize",
    "pyiqa_cache_dir",
    "split_blocks",
    "weights",
]
