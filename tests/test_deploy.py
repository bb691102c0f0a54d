"""deploy/serve.yaml, the Kubernetes manifest of `cmce serve`, kept in step with what it runs: its arguments parse as
cmce's, its probes and scrape path are the server's endpoints, its ports agree, its image and Secret are the
pipeline's. (No cluster here: what Kubernetes itself makes of it is not tested.)"""

import re
from pathlib import Path

import yaml

from cmce.cli import build_parser
from cmce.serving.app import ENDPOINTS
from pipeline.cmce_pipeline import Placement

ROOT = Path(__file__).resolve().parents[1]


def manifest() -> dict[str, dict]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all((ROOT / "deploy" / "serve.yaml").read_text())}


def test_the_serve_deployment_runs_cmce_serve_as_its_cli_reads_it():
    deployment = manifest()["Deployment"]
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert container["command"] == ["cmce", "serve"]
    args = build_parser().parse_args(["serve", *container["args"]])  # an unknown flag or bad value exits here
    port = next(p["containerPort"] for p in container["ports"] if p["name"] == "http")
    assert (args.host, args.port) == ("0.0.0.0", port)
    assert args.index.startswith("s3://") and args.query_model == "models:/cmce-query@production"
    assert "MLFLOW_TRACKING_URI" in {e["name"] for e in container["env"]}  # where models:/ is resolved
    served = set(re.findall(r"GET (/\w+)", ENDPOINTS))
    probes = [container[f"{kind}Probe"]["httpGet"] for kind in ("startup", "readiness", "liveness")]
    assert [p["path"] for p in probes] == ["/healthz", "/readyz", "/healthz"]
    assert {p["port"] for p in probes} == {"http"}
    annotations = pod["metadata"]["annotations"]
    assert {p["path"] for p in probes} | {annotations["prometheus.io/path"]} <= served
    assert int(annotations["prometheus.io/port"]) == port
    writable = {m["mountPath"] for m in container["volumeMounts"]}  # the root file system is read only
    assert container["securityContext"]["readOnlyRootFilesystem"] and pod["spec"]["securityContext"]["runAsNonRoot"]
    assert {e["value"] for e in container["env"] if e["name"] in ("TMPDIR", "HOME")} <= writable
    assert container["envFrom"] == [{"secretRef": {"name": Placement.secret, "optional": True}}]
    prefix = re.search(r"IMAGE_PREFIX:-([^}]+)\}", (ROOT / "containers" / "build.sh").read_text()).group(1)
    assert container["image"] == f"{prefix}:cpu"
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod["metadata"]["labels"].items()
    service = manifest()["Service"]
    assert service["spec"]["selector"] == selector and service["spec"]["ports"][0]["targetPort"] == "http"
