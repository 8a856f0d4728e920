"""Parallelism applied to the model from outside: mesh, expert parallel, ZeRO-1, pipeline."""
