"""Data building blocks: image intake (``qt prepare``), degradations (``qt degrade``), demo data (``qt demo-data``).

Public API::

    prepare_images(in_dir, out_dir, cfg) -> PrepareResult        # images.zarr + manifest.parquet
    prepare_paired(in_dir, out_dir, cfg) -> PairedResult         # degraded.zarr + clean.zarr + manifest
    ImageStore(path), load_images(path) -> Images(ids, array)    # read a store back
    degrade(image, recipe, generator) -> DegradeResult           # seeded, recorded degradations
    degrade_seeded(image, recipe, seeds) -> DegradeResult        # replay from recorded seeds
    degrade_path(src, dst, name, recipe, seed) -> DegradeRun     # files / folders -> PNG + degrade.json
    make_demo_data(out_dir, demo, recipes, seed) -> DemoResult   # the offline demo folder

The degradations live in ``qtlib.data.degradations`` (not ``degrade``, so that
the function ``qtlib.data.degrade`` does not shadow its own module).
"""

from qtlib.data.decode import STATUSES
from qtlib.data.degradations import (
    KINDS,
    DegradeResult,
    DegradeRun,
    UnknownRecipeError,
    degrade,
    degrade_path,
    degrade_seeded,
    derive_seed,
    get_recipe,
)
from qtlib.data.demo import DemoResult, make_demo_data
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
    "KINDS",
    "STATUSES",
    "DegradeResult",
    "DegradeRun",
    "DemoResult",
    "ImageStore",
    "Images",
    "NoUsableImagesError",
    "PairedResult",
    "PrepareResult",
    "UnknownRecipeError",
    "degrade",
    "degrade_path",
    "degrade_seeded",
    "derive_seed",
    "get_recipe",
    "image_id",
    "load_images",
    "make_demo_data",
    "prepare_images",
    "prepare_paired",
]
