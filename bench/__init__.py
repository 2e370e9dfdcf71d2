"""The cpkernels benchmark suite (`pytest bench/ --benchmark-only`) and report (`python bench/report.py`).

A package so that its modules import as `bench.*` and never collide with `tests/`.
"""
