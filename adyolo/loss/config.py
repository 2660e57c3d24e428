"""The loss section of a run config (YOLOv5-Face defaults)."""

from __future__ import annotations

from dataclasses import dataclass, field

from adyolo.schema import ConfigError


@dataclass
class LossConfig:
    box: float = 0.05
    """Gain of the CIoU box loss."""
    obj: float = 1.0
    """Gain of the objectness BCE."""
    cls: float = 0.5
    """Gain of the class BCE (computed only with more than one class)."""
    landmark: float = 0.005
    """Gain of the Wing landmark loss."""
    anchor_t: float = 4.0
    """A target is assigned to an anchor when their width and height ratios are both below this."""
    balance: list[float] = field(default_factory=lambda: [4.0, 1.0, 0.25, 0.06])
    """Objectness weight per level, strides 4, 8, 16, 32."""
    wing_width: float = 10.0
    wing_curvature: float = 2.0
    """Wing loss w and epsilon (Feng et al. 2018)."""

    def __post_init__(self) -> None:
        for key in ("box", "obj", "cls", "landmark"):
            if getattr(self, key) < 0:
                raise ConfigError(key, f"{getattr(self, key)} must not be negative")
        if self.anchor_t <= 1:
            raise ConfigError("anchor_t", f"{self.anchor_t} must be above 1")
        if len(self.balance) != 4 or any(b <= 0 for b in self.balance):
            raise ConfigError("balance", f"{self.balance}: expected 4 positive weights, one per level")
        if self.wing_width <= 0 or self.wing_curvature <= 0:
            raise ConfigError("wing_width", "wing_width and wing_curvature must be positive")
