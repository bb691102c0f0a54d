"""cmce: asymmetric image retrieval with cross-model compatible ensembles."""

import logging
import os
import sys

try:
    os.getcwd()
except FileNotFoundError:  # torch's MKL then dies on import with "Cannot load libtorch_cpu.so", naming no cause
    sys.stderr.write("cmce: the working folder no longer exists (deleted or moved); cd to an existing folder\n")
    raise SystemExit(2) from None

# faiss logs its CPU-feature probing at INFO on every import: noise in every step's log
logging.getLogger("faiss.loader").setLevel(logging.WARNING)

__version__ = "0.1.0"
