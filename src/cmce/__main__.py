"""`python -m cmce` (and `torchrun -m cmce`): the `cmce` command."""

import sys

from cmce.cli import main

sys.exit(main())
