"""Frozen, typed configuration objects.

The fields mirror ``workflow/schemas/config.schema.yaml`` one to one; the schema
holds the defaults, ranges and documentation, these classes hold the types.
``qtlib.config.load_config`` validates a YAML file against the schema and builds
a :class:`Config` from it. A test checks that schema and dataclasses agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

Range = tuple[float, float]
RecipeKind = Literal["rain", "snow", "haze", "low_light", "underwater"]
Perceptual = Literal["auto", "vgg", "ms_ssim", "nlpd", "none"]
Augmentation = Literal["identity", "hflip", "vflip", "rot90", "rot180", "rot270", "transpose", "transverse"]
LRSchedule = Literal["constant", "cosine"]
RegParams = Literal["embedding", "injected", "upsampling"]


@dataclass(frozen=True)
class ComputeConfig:
    deterministic: bool = True
    bf16: bool = False


@dataclass(frozen=True)
class DataConfig:
    size: int = 192
    min_size: int = 32
    max_pixels: int = 178_956_970
    paired: str = ""
    unlabeled: str = ""
    test: str = ""
    leaks: Literal["error", "warn"] = "error"
    geometry: Literal["native", "square"] = "native"
    max_side: int = 0


@dataclass(frozen=True)
class DemoConfig:
    task: RecipeKind = "rain"
    source_recipe: str = "rain_source"
    target_recipe: str = "rain_target"
    n_paired: int = 12
    n_unlabeled: int = 8
    n_test: int = 4
    size: int = 192


@dataclass(frozen=True)
class Recipe:
    """A named degradation: a weather/light kind plus optional blur, noise and JPEG."""

    kind: RecipeKind
    intensity: Range = (0.3, 0.6)
    blur_sigma: Range = (0.0, 0.0)
    noise_std: Range = (0.0, 0.0)
    jpeg_quality: Range | None = None


@dataclass(frozen=True)
class DegradeConfig:
    recipes: dict[str, Recipe] = field(default_factory=dict)


@dataclass(frozen=True)
class Member:
    """One metric of the IQA ensemble and its (un-normalized) weight."""

    metric: str
    weight: float
    grad: bool | None = None
    """Whether the reward passes gradients through it; None = auto: false for a hand-crafted member when a
    learned one (catalog source qtlib) is in the same list, as the authors' code treats BRISQUE; else true."""


@dataclass(frozen=True)
class LearnedConfig:
    """``iqa.learned``: the fitted file of the learned member ``liteiqa`` and its reward's defenses."""

    path: str = ""
    cap: bool = True
    transforms: int = 0


@dataclass(frozen=True)
class IQAConfig:
    ensemble: tuple[Member, ...] = (Member("brisque", 0.5), Member("niqe", 0.5))
    blocks: tuple[int, int] = (2, 2)
    batch_size: int = 16
    allow_download: bool = False
    fast_paths: bool = True
    learned: LearnedConfig = LearnedConfig()


@dataclass(frozen=True)
class UNetConfig:
    width: int = 16
    depth: int = 3
    in_channels: int = 3
    out_channels: int = 3


@dataclass(frozen=True)
class NAFNetConfig:
    width: int = 32
    enc_blocks: tuple[int, ...] = (1, 1, 1, 28)
    middle_blocks: int = 1
    dec_blocks: tuple[int, ...] = (1, 1, 1, 1)
    in_channels: int = 3
    out_channels: int = 3


@dataclass(frozen=True)
class ConditioningConfig:
    enabled: bool = True
    embedding: Literal["sinusoidal", "discrete"] = "sinusoidal"
    bands: int = 6
    hidden: int = 64
    levels: int = 8
    top_score: float = 7.0
    injection: tuple[str, ...] = ("bottleneck",)


@dataclass(frozen=True)
class ModelConfig:
    backbone: Literal["unet", "nafnet"] = "unet"
    unet: UNetConfig = UNetConfig()
    nafnet: NAFNetConfig = NAFNetConfig()
    conditioning: ConditioningConfig = ConditioningConfig()


@dataclass(frozen=True)
class PretrainConfig:
    steps: int = 300
    batch_size: int = 8
    patch_size: int = 96
    lr: float = 1e-3
    weight_decay: float = 0.0
    perceptual: Perceptual = "none"
    perceptual_weight: float = 0.1
    lr_schedule: LRSchedule = "constant"
    geometric: bool = True
    checkpoint_every: int = 100
    max_nonfinite_steps: int = 10


#: The augmentation name of the label-ensembling pseudo-label (``label.mean_label``): the mean of the views.
MEAN_LABEL = "mean"


@dataclass(frozen=True)
class LabelConfig:
    shards: int = 2
    batch_size: int = 8
    augmentations: tuple[Augmentation, ...] = ("hflip", "vflip", "rot90")
    mean_label: bool = False
    view_labels: bool = True
    tile: int = 1024
    tile_overlap: int = 32

    @property
    def label_names(self) -> tuple[str, ...]:
        """The pseudo-labels of one image, in store order: the views (``view_labels``), then ``mean``
        (``mean_label``)."""
        return (*(self.augmentations if self.view_labels else ()), *((MEAN_LABEL,) if self.mean_label else ()))


@dataclass(frozen=True)
class GateConfig:
    tau1: float | Literal["auto"] = "auto"
    tau2: float | Literal["auto"] = "auto"
    quantile: float = 0.95
    bank_size: int = 3
    enabled: bool = True


def start_step(start: float, budget: int | None) -> int:
    """A loss term's ``start`` as a global step: below 1 a share of ``budget`` (the run's steps), else a step.

    Raises:
        ValueError: a share without a budget (``budget`` None).
    """
    if start >= 1:
        return int(start)
    if start > 0 and budget is None:
        raise ValueError(f"start {start}: a share of the run's budget, but no budget (rounds x steps) was given")
    return math.floor(start * (budget or 0) + 1e-9)  # 0.29 x 100 is 28.999...: 29


@dataclass(frozen=True)
class RecLoss:
    weight: float = 1.0
    start: float = 0
    block_weighting: bool = True


@dataclass(frozen=True)
class PerLoss:
    weight: float = 0.1
    start: float = 0
    kind: Perceptual = "auto"


@dataclass(frozen=True)
class PrefLoss:
    weight: float = 0.1
    start: float = 0.2
    beta: float = 1.0
    delta: float = 0.1
    second_weight: float = 0.5
    reg_weight: float = 1.0
    low_levels: tuple[float, ...] = (4.0, 5.0, 6.0)
    reg_anchor: Literal["round", "initial"] = "initial"
    reg_params: tuple[RegParams, ...] = ("embedding", "injected")
    l2_target: Literal["poorest", "best"] = "poorest"
    unit_rewards: bool = False
    params: Literal["all", "injection"] = "all"
    low_grad: bool = True


@dataclass(frozen=True)
class CroppedLoss:
    weight: float = 0.1
    start: float = 0.2
    fraction: float = 0.5


@dataclass(frozen=True)
class SupLoss:
    weight: float = 0.0
    per_weight: float = 0.0
    start: float = 0
    batch_size: int = 0
    geometric: bool = True
    strong_view: bool = False


@dataclass(frozen=True)
class StrongView:
    """``train.strong_view``: blur, noise and JPEG on the student's input of pseudo-label samples."""

    enabled: bool = False
    p: float = 0.5
    blur_sigma: Range = (0.3, 1.0)
    noise_std: Range = (0.005, 0.03)
    jpeg_quality: Range = (40, 90)


@dataclass(frozen=True)
class Losses:
    rec: RecLoss = RecLoss()
    per: PerLoss = PerLoss()
    pref: PrefLoss = PrefLoss()
    cropped: CroppedLoss = CroppedLoss()
    sup: SupLoss = SupLoss()


@dataclass(frozen=True)
class TrainConfig:
    method: Literal["qualiteacher", "plain_mt", "filter_mt"] = "qualiteacher"
    epochs: int = 1
    steps: int = 0
    batch_size: int = 4
    patch_size: int = 96
    lr: float = 1e-4
    lr_schedule: LRSchedule = "constant"
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    ema_decay: float = 0.998
    ema_half_life: float = 0.0
    reward_window: int = 192
    geometric: bool = False
    strong_view: StrongView = StrongView()
    reward_ensemble: tuple[Member, ...] = ()
    gpus: int = 1
    checkpoint_every: int = 50
    max_nonfinite_steps: int = 10
    score_condition: bool = True
    preference: bool = True
    cropped: bool = True
    input_labels: bool = False
    condition: Literal["absolute", "relative"] = "absolute"
    relative_margin: float = 0.0
    fast_passes: bool = True
    losses: Losses = Losses()


@dataclass(frozen=True)
class RewardConfig:
    """``reward``: fitting the learned member ``liteiqa`` on the paired data (:mod:`qtlib.reward_fit`)."""

    crop: int = 192
    holdout: float = 0.25
    hidden: int = 64
    steps: int = 400
    lr: float = 0.003
    weight_decay: float = 0.0001
    rank_weight: float = 1.0
    calibration_weight: float = 0.1
    refresh: bool = False
    refresh_levels: tuple[float, ...] = (0.0, 4.0, 7.0)


@dataclass(frozen=True)
class EvaluateConfig:
    levels: tuple[float, ...] = (0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0)
    panel: tuple[str, ...] = ("brisque", "niqe", "piqe")
    n_examples: int = 4
    tile: int = 1024
    tile_overlap: int = 32
    headroom: bool = True


@dataclass(frozen=True)
class Config:
    results_dir: str = "results"
    seed: int = 0
    rounds: int = 2
    device: Literal["auto", "cpu", "cuda"] = "auto"
    compute: ComputeConfig = ComputeConfig()
    data: DataConfig = DataConfig()
    demo: DemoConfig = DemoConfig()
    degrade: DegradeConfig = DegradeConfig()
    iqa: IQAConfig = IQAConfig()
    model: ModelConfig = ModelConfig()
    pretrain: PretrainConfig = PretrainConfig()
    label: LabelConfig = LabelConfig()
    gate: GateConfig = GateConfig()
    train: TrainConfig = TrainConfig()
    reward: RewardConfig = RewardConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
