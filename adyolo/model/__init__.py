"""The ADYOLOv5-Face detector. Imports only torch: precision, sharding and launching live elsewhere."""

from adyolo.model.config import ModelConfig
from adyolo.model.detector import ADYOLOFace, build_model
from adyolo.model.fold import fold_batchnorm_

__all__ = ["ADYOLOFace", "ModelConfig", "build_model", "fold_batchnorm_"]
