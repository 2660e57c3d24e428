"""The loss section of a run config (YOLOv5-Face defaults)."""

from __future__ import annotations

from dataclasses import dataclass

from adyolo.schema import ConfigError

# YOLOv5's objectness weight per level, finest first, by the number of levels: its P3-P5 models (3
# levels, strides 8, 16, 32: the yolov5face neck) and its P3-P6 models (4 levels; the GD neck's P2-P5).
DEFAULT_BALANCE: dict[int, tuple[float, ...]] = {3: (4.0, 1.0, 0.4), 4: (4.0, 1.0, 0.25, 0.06)}


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
    balance: list[float] | None = None
    """Objectness weight per detection level, finest first; one per level of the model (4 for the GD neck,
    strides 4, 8, 16, 32; 3 for yolov5face, strides 8, 16, 32). Unset: YOLOv5's weights for that many
    levels, [4.0, 1.0, 0.25, 0.06] or [4.0, 1.0, 0.4] (a run config writes them in)."""
    wing_width: float = 10.0
    wing_curvature: float = 2.0
    """Wing loss w and epsilon (Feng et al. 2018)."""

    def __post_init__(self) -> None:
        for key in ("box", "obj", "cls", "landmark"):
            if getattr(self, key) < 0:
                raise ConfigError(key, f"{getattr(self, key)} must not be negative")
        if self.anchor_t <= 1:
            raise ConfigError("anchor_t", f"{self.anchor_t} must be above 1")
        if self.balance is not None and (len(self.balance) not in DEFAULT_BALANCE or any(b <= 0 for b in self.balance)):
            raise ConfigError("balance", f"{self.balance}: expected 3 or 4 positive weights, one per detection level")
        if self.wing_width <= 0 or self.wing_curvature <= 0:
            raise ConfigError("wing_width", "wing_width and wing_curvature must be positive")

    def balance_for(self, levels: int, neck: str | None = None) -> list[float]:
        """The objectness weights of a model with `levels` detection levels: `balance`, or the default for
        that many levels. Raises ConfigError when a given `balance` has another length (`neck` names the
        model in the message)."""
        if self.balance is None:
            if levels not in DEFAULT_BALANCE:
                raise ConfigError("balance", f"no default for {levels} detection levels; give {levels} weights")
            return list(DEFAULT_BALANCE[levels])
        if len(self.balance) != levels:
            model = f"the {neck!r} neck's model" if neck else "the model"
            raise ConfigError(
                "balance",
                f"{self.balance} has {len(self.balance)} weights, {model} has {levels} detection levels; give "
                f"{levels} weights (finest level first) or leave it unset for YOLOv5's "
                f"{list(DEFAULT_BALANCE.get(levels, ()))}",
            )
        return list(self.balance)
