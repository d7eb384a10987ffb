"""Infrastructure helpers shared by every stage: atomic writes and input checks.

This package sits below all stages: it imports only the standard library
(plus torch/numpy objects it is handed), never another ``qtlib`` module, so
any module may use it without import cycles.

Public API::

    atomic_path(path) -> Path                 # context manager: temp sibling, committed on success
    atomic_write_bytes(path, data) / atomic_write_text(path, text)
    commit_file(tmp, path), discard(tmp)      # the two halves, for writers that outlive a `with`
    replace_dir(tmp, final), remove_path(p)   # folders (e.g. Zarr stores)
    check_shape(x, ["B", "3", "H", "W"], name) -> dict[str, int]
    check_image(x, name, channels=None, value_range=None, min_size=None)
"""

from qtlib.util.atomic import (
    atomic_path,
    atomic_write_bytes,
    atomic_write_text,
    commit_file,
    default_file_mode,
    discard,
    make_temp,
    remove_path,
    replace_dir,
)
from qtlib.util.checks import (
    check_floating,
    check_image,
    check_range,
    check_shape,
    check_tensor,
)

__all__ = [
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_floating",
    "check_image",
    "check_range",
    "check_shape",
    "check_tensor",
    "commit_file",
    "default_file_mode",
    "discard",
    "make_temp",
    "remove_path",
    "replace_dir",
]
