"""``python -m duallora_kernels COMMAND ...``: the ``duallora`` command, e.g. under torchrun:
``torchrun --nproc-per-node 2 -m duallora_kernels train ...``."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
