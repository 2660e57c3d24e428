"""YOLOv5-Face detection loss: assignment (assigner.py), terms (terms.py), their weighting (criterion.py)."""
