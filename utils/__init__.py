"""Data, losses, metrics and the training/evaluation machinery shared by the scripts."""
