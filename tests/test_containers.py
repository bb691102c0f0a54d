"""The image smoke check in containers/build.sh runs only in CI's container tier; run its Python here so a
renamed import fails in the test tier, on every machine, before an image is built."""

import re
import subprocess
import sys
from pathlib import Path

BUILD_SCRIPT = Path(__file__).resolve().parents[1] / "containers" / "build.sh"


def test_the_image_smoke_check_runs_against_the_installed_package():
    match = re.search(r"^decode_check='(.*?)'$", BUILD_SCRIPT.read_text(), re.S | re.M)
    assert match, "containers/build.sh no longer defines decode_check"
    result = subprocess.run([sys.executable, "-c", match.group(1)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
