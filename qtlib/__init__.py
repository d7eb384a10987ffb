"""qtlib: QualiTeacher, quality-conditioned pseudo-labeling for real-world image restoration."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("qtlib")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+local"
