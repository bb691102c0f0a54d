"""Loaded by every Python process started with this folder on PYTHONPATH (the dvc_repo fixture's `dvc repro`):
a DVC stage's command (DVC_STAGE set) writes the cmce modules it loaded to $CMCE_MODULES_SEEN/<stage>, so a test
can hold each stage's deps against the library code it ran. cmce ends a command with os._exit (no atexit)."""

import atexit
import os
import sys

_stage, _folder = os.environ.get("DVC_STAGE"), os.environ.get("CMCE_MODULES_SEEN")

if _stage and _folder:
    def _write() -> None:
        names = sorted(m for m in sys.modules if m == "cmce" or m.startswith("cmce."))
        with open(os.path.join(_folder, _stage), "a") as f:
            f.write("".join(f"{m}\n" for m in names))

    _exit = os._exit

    def _write_then_exit(code: int) -> None:
        try:
            _write()
        finally:
            _exit(code)

    atexit.register(_write)
    os._exit = _write_then_exit
