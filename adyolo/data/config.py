"""The data section of a run config."""

from __future__ import annotations

from dataclasses import dataclass, field

from adyolo.data.synthetic import SyntheticConfig
from adyolo.data.transforms import AugmentConfig
from adyolo.schema import ConfigError


@dataclass
class DataConfig:
    train: str | None = None
    """Training images: a folder (searched recursively) or a .txt list of image paths. None: the synthetic default."""
    val: str | None = None
    """Validation images, as `train`. None: the synthetic default's val split (only when `train` is None too)."""
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    """The embedded synthetic dataset, used when `train` is None."""
    synthetic_root: str = "runs/synthetic"
    """Where the synthetic dataset is generated (once; reused while its settings are unchanged)."""
    workers: int = 4
    """DataLoader worker processes per rank (0: load in the training process)."""
    cache: bool = False
    """Decode and resize every image once, into RAM, at the start (each process holds its own copy,
    shared by its loader workers; at most images x img_size^2 x 3 bytes: 79 MB for the 400 + 100 images of
    the synthetic default at 256 px, 16 GB for WIDER FACE's 12,880 + 3,226 at 640 px)."""
    skip_bad_labels: bool = False
    """Skip and count malformed label lines instead of stopping with file:line."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    """Training augmentation; validation only letterboxes."""

    def __post_init__(self) -> None:
        if self.workers < 0:
            raise ConfigError("workers", f"{self.workers} must be 0 or more")
        if self.train is None and self.val is not None:
            raise ConfigError("val", "a validation set needs a training set too; set data.train")
        if self.train is not None and self.val is None:
            raise ConfigError("val", f"set data.val for the training set {self.train!r}")
