"""Prediction with trained weights: faces and landmarks in images and videos (`launch/detect.py`)."""
