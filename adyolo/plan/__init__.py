"""Memory planning: what a training configuration needs per rank, predicted without a GPU (`launch/plan.py`)."""
