"""Deployment exports of a trained detector (ONNX); `launch/export.py` is the command line."""
