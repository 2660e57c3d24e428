"""adyolo: distributed training of the ADYOLOv5-Face small-face detector."""

__version__ = "0.1.0"
