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


def _build(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """build.sh with a container tool that only records its commands (and says every base image exists)."""
    calls = tmp_path / "calls"
    tool = tmp_path / "tool"
    tool.write_text(f'#!/bin/sh\necho "$1 $2" >> {calls}\n')
    tool.chmod(0o755)
    done = subprocess.run(["bash", str(BUILD_SCRIPT), *args], capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "CONTAINER_TOOL": str(tool)})
    return done, calls.read_text().splitlines() if calls.exists() else []


def test_smoke_may_come_first_or_alone_and_a_second_target_is_refused(tmp_path):
    """`build.sh --smoke` (as the usage line reads) took --smoke for the target and stopped with the usage."""
    for args in (["--smoke"], ["--smoke", "cpu"], ["cpu", "--smoke"]):
        done, calls = _build(tmp_path, *args)
        assert done.returncode == 0, done.stderr
        assert [c.split()[0] for c in calls] == ["image", "build", "run", "run"], (args, calls)
        (tmp_path / "calls").unlink()
    done, calls = _build(tmp_path, "cpu", "cuda")
    assert done.returncode == 2 and "one target" in done.stderr and calls == []
