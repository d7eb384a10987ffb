"""Data building blocks: image intake (``qt prepare``), degradations (``qt degrade``), demo data.

Public API::

    prepare_images(in_dir, out_dir, cfg) -> PrepareResult      # images.zarr + manifest.parquet
    prepare_paired(in_dir, out_dir, cfg) -> PairedResult       # degraded.zarr + clean.zarr + manifest
    ImageStore(path), load_images(path) -> Images(ids, array)  # read a store back
"""

from qtlib.data.decode import STATUSES
from qtlib.data.prepare import (
    NoUsableImagesError,
    PairedResult,
    PrepareResult,
    image_id,
    prepare_images,
    prepare_paired,
)
from qtlib.data.store import Images, ImageStore, load_images

__all__ = [
    "STATUSES",
    "ImageStore",
    "Images",
    "NoUsableImagesError",
    "PairedResult",
    "PrepareResult",
    "image_id",
    "load_images",
    "prepare_images",
    "prepare_paired",
]
