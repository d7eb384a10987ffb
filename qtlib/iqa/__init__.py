"""No-reference IQA on pyiqa: catalog, normalization, ensemble and block scores, rewards, offline weights.

Every score in qtlib goes through this package; ``create_metric`` is the one
place ``pyiqa.create_metric`` is called.
"""

from qtlib.iqa.catalog import CATALOG, MetricInfo, UnknownMetricError, WeightFile, get_info, normalize, pyiqa_cache_dir
from qtlib.iqa.factory import MissingWeightsError, create_metric

__all__ = [
    "CATALOG",
    "MetricInfo",
    "MissingWeightsError",
    "UnknownMetricError",
    "WeightFile",
    "create_metric",
    "get_info",
    "normalize",
    "pyiqa_cache_dir",
]
