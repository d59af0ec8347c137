"""test.py's engine: metrics, the one evaluation loop (train-time validation calls it too), reports and plots."""
