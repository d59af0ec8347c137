"""train.py's engine: run preparation, the epoch loop, checkpoint state and resume, losses, distillation."""
