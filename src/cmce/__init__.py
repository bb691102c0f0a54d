"""cmce: asymmetric image retrieval with cross-model compatible ensembles."""

import logging
import os
import sys

try:
    os.getcwd()
except FileNotFoundError:  # torch's MKL then dies on import with "Cannot load libtorch_cpu.so", naming no cause
    sys.stderr.write("cmce: the working folder no longer exists (deleted or moved); cd to an existing folder\n")
    raise SystemExit(2) from None

# set by `python -m pipeline run --local` for its tasks: a terminal's Ctrl-C reaches the whole process group, and a
# task stopping on it printed its traceback above the runner's one line whenever it came before the runner had
# silenced what the tasks print. The runner stops its tasks itself once it has (SIGTERM).
TASK_IGNORES_CTRL_C = "CMCE_TASK_IGNORES_CTRL_C"
if os.environ.get(TASK_IGNORES_CTRL_C) == "1":
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)

# faiss logs its CPU-feature probing at INFO on every import: noise in every step's log
logging.getLogger("faiss.loader").setLevel(logging.WARNING)

__version__ = "0.1.0"
