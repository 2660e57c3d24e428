"""The training engine: the only package that talks to accelerate / DeepSpeed."""
