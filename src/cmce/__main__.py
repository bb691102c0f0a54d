"""`python -m cmce` (and `torchrun -m cmce`): the `cmce` command."""

from cmce.cli import entry

entry()
