"""python -m pipeline compile | run --local [--pipeline NAME] | submit --host URL [--pipeline NAME]

Pipelines: cmce (the whole method), add-gallery-model and upgrade-query-model (live-gallery operations
on the artifacts of a previous run, see pipeline/lifecycle.py)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

log = logging.getLogger("pipeline")
ROOT = Path(__file__).resolve().parents[1]
COMPILED = ROOT / "pipeline" / "cmce_pipeline.yaml"
LIFECYCLE = ("add-gallery-model", "upgrade-query-model")
PACKAGES = {"cmce": COMPILED, **{name: ROOT / "pipeline" / f"{name.replace('-', '_')}.yaml" for name in LIFECYCLE}}
# the lifecycle pipelines' inputs: artifacts of a previous run, by URI
INPUT_URIS = ("dataset_uri", "query_model_uri", "gallery_uri", "train_embeddings_uri")


def pipeline_function(name: str):
    if name == "cmce":
        from pipeline.cmce_pipeline import cmce_pipeline

        return cmce_pipeline
    from pipeline.lifecycle import PIPELINES

    return PIPELINES[name]


def compile_pipeline(out: Path = COMPILED, name: str = "cmce") -> Path:
    from kfp import compiler

    tmp = out.with_name(f".{out.stem}.tmp.yaml")
    compiler.Compiler().compile(pipeline_function(name), str(tmp))
    os.replace(tmp, out)
    return out


def _lifecycle_arguments(args: argparse.Namespace) -> dict:
    """URIs of the previous run's artifacts: from --inputs-from (a `cmce run` output folder) or flags."""
    out: dict = {}
    if args.inputs_from:
        from cmce.steps import RunLayout

        lay = RunLayout(Path(args.inputs_from).resolve())
        out = {"dataset_uri": str(lay.dataset), "query_model_uri": str(lay.model("query")),
               "gallery_uri": str(lay.gallery), "train_embeddings_uri": str(lay.train_embeddings("x").parent)}
    for key in INPUT_URIS:
        if getattr(args, key, None):
            out[key] = getattr(args, key)
    required = INPUT_URIS if args.pipeline == "upgrade-query-model" else INPUT_URIS[:3]  # add: no train embeddings
    out = {k: v for k, v in out.items() if k in required}
    needed = [k for k in required if k not in out]
    if needed:
        raise SystemExit(f"pipeline {args.pipeline} needs --inputs-from RUN_DIR or --{needed[0].replace('_', '-')}")
    if args.params:
        import yaml

        raw = yaml.safe_load(Path(args.params).read_text())
        out["params_yaml"] = json.dumps(raw)
        key = "add_gallery_model" if args.pipeline == "add-gallery-model" else "new_query_model"
        out["model_name"] = ((raw.get("lifecycle") or {}).get(key) or {}).get("name", "")
    if args.model_name:
        out["model_name"] = args.model_name
    if args.run_name:
        out["run_name"] = args.run_name
    return out


def _arguments(args: argparse.Namespace) -> dict:
    if args.pipeline != "cmce":
        return _lifecycle_arguments(args)
    out: dict = {}
    if args.params:
        import yaml

        raw = yaml.safe_load(Path(args.params).read_text())
        out["params_yaml"] = json.dumps(raw)
        out["gallery_models"] = [m["name"] for m in raw["gallery_models"]]
        out["query_model"] = raw["query_model"]["name"]
    for key in ("epochs", "lam", "reject_fraction", "index_type", "protocol", "dataset", "run_name", "embed_shards",
                "embed_workers"):
        value = getattr(args, key)
        if value is not None:
            out[key] = value
    if args.gallery_models:
        out["gallery_models"] = args.gallery_models.split(",")
    return out


def run_local(args: argparse.Namespace) -> Path:
    """Run the whole DAG on this machine with kfp.local's subprocess runner (the embedded default)."""
    from kfp import local

    from pipeline.cmce_pipeline import make_pipeline

    run = make_pipeline(parallelism=args.parallelism) if args.pipeline == "cmce" else pipeline_function(args.pipeline)
    arguments = _arguments(args)
    root = Path(args.root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root))
    started = time.time()
    run(**arguments, mlflow_uri="" if args.no_mlflow else uri)
    prefix = "cmce-" if args.pipeline == "cmce" else f"cmce-{args.pipeline}-"
    runs = sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith(prefix)
                   and (args.pipeline != "cmce" or not p.name.startswith(tuple(f"cmce-{n}-" for n in LIFECYCLE)))),
                  key=lambda p: p.stat().st_mtime)
    run_dir = runs[-1]
    log.info("pipeline finished in %.0f s; artifacts under %s", time.time() - started, run_dir)
    listing = sorted(p for task in run_dir.rglob("executor_output.json") for p in task.parent.iterdir()
                     if p.name != "executor_output.json")
    sys.stderr.write("artifacts:\n" + "".join(f"  {p}\n" for p in listing))
    if not args.no_mlflow:
        sys.stderr.write(f"MLflow: {uri} (mlflow ui --backend-store-uri {uri})\n")
    results = next(run_dir.glob("evaluate*/results"), None)
    if results is not None:
        sys.stdout.write(results.read_text())
    decision = next(run_dir.glob("gate*/decision"), None)
    if decision is not None:
        sys.stdout.write(decision.read_text())
    return run_dir


def submit(args: argparse.Namespace) -> None:
    """Submit the compiled YAML to a KFP endpoint (cannot be exercised without a cluster)."""
    import kfp

    client = kfp.Client(host=args.host, namespace=args.namespace)
    package = args.package or PACKAGES[args.pipeline]
    run = client.create_run_from_pipeline_package(str(package), arguments=_arguments(args),
                                                  run_name=args.run_name or args.pipeline,
                                                  experiment_name=args.experiment)
    sys.stdout.write(json.dumps({"run_id": run.run_id}) + "\n")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compile", help="compile every pipeline to YAML (pipeline/*.yaml)")
    c.add_argument("--out-dir", type=Path, default=COMPILED.parent)
    for name, help_ in (("run", "run the pipeline"), ("submit", "submit the compiled pipeline to KFP")):
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("--pipeline", default="cmce", choices=sorted(PACKAGES), help="which pipeline (default cmce)")
        sp.add_argument("--inputs-from", default=None, metavar="RUN_DIR",
                        help="lifecycle pipelines: take the dataset, query model, gallery and train embeddings "
                             "from this `cmce run` output folder")
        for key in INPUT_URIS:
            sp.add_argument(f"--{key.replace('_', '-')}", default=None, help="lifecycle pipelines: input artifact URI")
        sp.add_argument("--model-name", default=None,
                        help="lifecycle pipelines: the model to add / the new query model (default from params)")
        sp.add_argument("--params", default=None, help="params file (default: the one compiled in, params.yaml)")
        sp.add_argument("--gallery-models", default=None, help="comma-separated subset of gallery model names")
        sp.add_argument("--epochs", type=int, default=None)
        sp.add_argument("--lam", type=float, default=None)
        sp.add_argument("--reject-fraction", type=float, default=None)
        sp.add_argument("--index-type", default=None)
        sp.add_argument("--protocol", default=None, choices=["heldout", "disjoint", "cross_vendor"])
        sp.add_argument("--dataset", default=None,
                        help="data source (digits, fashion_mnist, imagefolder, emoji, cub200, cars196, sop)")
        sp.add_argument("--run-name", default=None)
        sp.add_argument("--embed-shards", type=int, default=None, help="cmce pipeline: gallery slices in parallel")
        sp.add_argument("--embed-workers", type=int, default=None, help="cmce pipeline: decoding processes per slice")
    r = sub.choices["run"]
    r.add_argument("--local", action="store_true", required=True, help="run on this machine with kfp.local")
    r.add_argument("--root", default="runs/kfp", help="pipeline root for local artifacts")
    r.add_argument("--no-mlflow", action="store_true")
    r.add_argument("--parallelism", type=int, default=1,
                   help="gallery-model branches run at once (default 1: they share this machine's cores)")
    s = sub.choices["submit"]
    s.add_argument("--host", required=True, help="KFP API endpoint, e.g. https://kfp.example.com/pipeline")
    s.add_argument("--namespace", default=None)
    s.add_argument("--experiment", default="cmce")
    s.add_argument("--package", type=Path, default=None, help="compiled YAML (default: the --pipeline's)")
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    if args.command == "compile":
        for name, package in PACKAGES.items():
            log.info("wrote %s", compile_pipeline(args.out_dir / package.name, name))
    elif args.command == "run":
        run_local(args)
    else:
        submit(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
