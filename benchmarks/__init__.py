"""Speed and memory benchmarks, run by hand (`.venv/bin/python benchmarks/<name>.py`); figures in benchmarks/results/.

The page docs/benchmarks.md is generated from those files by `python -m benchmarks.page` (also `make docs`).
"""
