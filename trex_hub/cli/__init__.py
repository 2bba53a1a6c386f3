"""Command-line programs: trex-download, trex-extract, trex-eval, trex-train.

Thin layers: argument parsing, progress output and exit codes (0 ok, 1 failure, 2 usage error).
The console scripts are in ``scripts.py``.
"""
