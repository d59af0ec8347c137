"""Shared helpers (classes and palette, file I/O, checkpoint I/O, precision, distributed set-up, CLI,
errors, drawing, the garbage collector) and one package per pipeline stage: data -> evaluation ->
training, inference."""
