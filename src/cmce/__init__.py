"""cmce: asymmetric image retrieval with cross-model compatible ensembles."""

import logging

# faiss logs its CPU-feature probing at INFO on every import: noise in every step's log
logging.getLogger("faiss.loader").setLevel(logging.WARNING)

__version__ = "0.1.0"
