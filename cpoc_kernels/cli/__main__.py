"""``python -m cpoc_kernels.cli``: the ``cpoc`` command."""
import sys

from cpoc_kernels.cli import main

sys.exit(main())
