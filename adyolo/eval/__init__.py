"""Evaluation: post-processing of raw head outputs, WIDER FACE AP and a generic mAP@0.5."""
