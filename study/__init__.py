"""The study on top of the code: its grid and settings (grid.py), the files of a run directory (rundir.py), what
a number depends on (fingerprint.py), the metrics (metrics.py) with their uncertainty (stats.py), and the
comparison table of runs (results.py) and the page to read them by (report.py: runs/report.html). `python -m study`
answers launch.sh.

This file imports nothing: `python -m study commands` runs without torch.
"""
