"""RELIABILITY.md cites the test behind each row: every cited test must exist, in the module it is cited from
(renamed or removed tests left rows citing nothing)."""

import re

from tests.conftest import ROOT

CITED = re.compile(r"(\w+)::(test_\w+)|::(test_\w+)|(?<![\w/`])(test_\w+)|(;|\n- \[|\| )")


def _defined() -> dict[str, set[str]]:
    return {f.stem.removeprefix("test_"): set(re.findall(r"^(?:async )?def (test_\w+)", f.read_text(), re.M))
            for f in (ROOT / "tests").glob("test_*.py")}


def test_every_test_reliability_cites_exists_in_its_module():
    defined = _defined()
    anywhere = set().union(*defined.values())
    module, missing, cited = None, [], 0
    # `mod::test_a, test_b, ::test_c` cite mod's tests until a `;`, a new note or a table cell
    for match in CITED.finditer((ROOT / "RELIABILITY.md").read_text()):
        mod, name, after, bare, stop = match.groups()
        if stop:
            module = None
            continue
        module = mod or module
        name = name or after or bare
        cited += 1
        if module is None:
            if name not in anywhere:
                missing.append(name)
        elif name not in defined.get(module, ()):
            missing.append(f"{module}::{name}")
    assert cited > 300 and missing == []
