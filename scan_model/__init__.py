"""SCAN reference model in PyTorch (inference, checkpoints, presets)."""
