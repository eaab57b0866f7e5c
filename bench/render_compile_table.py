"""Kept because ops/aot.py names this path: ``python -m duallora_kernels.readme --section compile-table``
(same flags; ``python -m duallora_kernels.readme`` renders every generated README section)."""
import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout without `pip install -e .`
sys.argv[1:1] = ["--section", "compile-table"]
runpy.run_module("duallora_kernels.readme", run_name="__main__")
