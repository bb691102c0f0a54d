"""No loader that can run code from a file that could come from elsewhere: a scan of the project's own
Python sources (the runtime refusal of a hostile checkpoint is in test_bad_input.py)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for d in ("src", "components", "pipeline", "benchmarks") for p in (ROOT / d).rglob("*.py"))

# calls that unpickle or evaluate what they read
FORBIDDEN = {
    "pickle.load", "pickle.loads", "pickle.Unpickler", "joblib.load", "dill.load", "dill.loads",
    "cloudpickle.load", "cloudpickle.loads", "pd.read_pickle", "pandas.read_pickle", "torch.jit.load",
    "mlflow.pyfunc.load_model", "mlflow.pytorch.load_model", "mlflow.sklearn.load_model",
    "yaml.load", "yaml.unsafe_load", "yaml.full_load", "eval", "exec",
}
PICKLE_NAMES_ALLOWED = {"UnpicklingError", "PicklingError"}  # exception types to catch


def dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{dotted(node.value)}.{node.attr}"
    return ""


def keyword(call: ast.Call, name: str) -> ast.AST | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def calls() -> list[tuple[Path, ast.Call, str]]:
    out = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call):
                out.append((path.relative_to(ROOT), node, dotted(node.func)))
    return out


def test_sources_are_scanned():
    assert ROOT / "src" / "cmce" / "checkpoint.py" in SOURCES and len(SOURCES) > 20


def test_every_torch_load_is_weights_only():
    loads = [(p, c) for p, c, name in calls() if name == "torch.load"]
    assert loads, "no torch.load call found: the scan is looking in the wrong place"
    bad = []
    for path, call in loads:
        flag = keyword(call, "weights_only")
        if not (isinstance(flag, ast.Constant) and flag.value is True):
            bad.append(f"{path}:{call.lineno}")
    assert bad == [], f"torch.load without weights_only=True at {bad}"


def test_no_unpickling_or_code_evaluating_loader():
    bad = [f"{p}:{c.lineno} {name}" for p, c, name in calls() if name in FORBIDDEN]
    for path, call, name in calls():
        if name in ("np.load", "numpy.load"):
            flag = keyword(call, "allow_pickle")
            if not (isinstance(flag, ast.Constant) and flag.value is False):
                bad.append(f"{path}:{call.lineno} {name} without allow_pickle=False")
    assert bad == []


def test_pickle_module_is_only_used_for_its_exception_types():
    uses = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Attribute) and dotted(node.value) == "pickle":
                if node.attr not in PICKLE_NAMES_ALLOWED:
                    uses.append(f"{path.relative_to(ROOT)}:{node.lineno} pickle.{node.attr}")
            if isinstance(node, ast.ImportFrom) and node.module == "pickle":
                uses.append(f"{path.relative_to(ROOT)}:{node.lineno} from pickle import ...")
    assert uses == []
