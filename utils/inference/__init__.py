"""The inference path: the Predictor, its precision guard, summaries, and predict.py's and test_draw.py's engines."""
