"""Benchmarks, run as scripts: `python bench/NAME.py`.

Python puts a script's own folder first on sys.path, and there bench/kernels.py would stand in for the `kernels`
package that transformers (5.25 on) imports with its activations: importing this package takes bench/ off the
path again, so every script imports it (or a module of it) before anything imports transformers.
"""
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != _HERE]
