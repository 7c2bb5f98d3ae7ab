"""`python -m atlas ...` and `torchrun --nproc_per_node N -m atlas ...`: the same CLI."""

import sys

from atlas.cli import main

sys.exit(main())
