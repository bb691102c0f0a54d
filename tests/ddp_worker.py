"""One torchrun rank for tests/test_distributed.py: runs `cmce train` (query model), `cmce train
--kd-teacher` and `cmce fit-transform` through the CLI inside one process group, recording this
rank's weights before and after every training loop (the library itself writes only on rank 0).

usage: python -m torch.distributed.run --nproc_per_node=2 ... tests/ddp_worker.py OUT CONFIG DATASET
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

import cmce.stages
import cmce.train
from cmce import distributed as ddp
from cmce.checkpoint import load_embedding_model, save_embedding_model
from cmce.cli import main


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def _as_gallery_model(query: Path, to: Path) -> Path:
    """The query model saved again with a gallery model's role: a KD teacher must be a gallery model, and training
    a real one here would double the test's time."""
    model = load_embedding_model(query)
    model.meta = {**model.meta, "role": "gallery"}
    save_embedding_model(model, to, torch.load(query, weights_only=True)["width"])
    return to


def run(out: Path, config: str, dataset: str) -> int:
    ctx = ddp.init_from_env(backend="gloo")
    record_dir = out / "ranks"
    record_dir.mkdir(parents=True, exist_ok=True)
    run_epochs, fit_transformation = cmce.train.run_epochs, cmce.stages.fit_transformation

    def spy_run_epochs(model, data, step_loss, cfg, epochs, seed, desc, param_groups=None, resume=None, **kwargs):
        batches: list[torch.Tensor] = []

        def recording(forward, x, y):
            batches.append(x.clone())
            return step_loss(forward, x, y)

        initial = _state(model)
        history = run_epochs(model, data, recording, cfg, epochs, seed, desc, param_groups, resume, **kwargs)
        rec = {"initial": initial, "final": _state(model), "sizes": [len(b) for b in batches],
               "first_batch": batches[0], "history": history}
        torch.save(rec, record_dir / f"{desc.replace('/', '_')}_rank{ctx.rank}.pt")
        return history

    def spy_fit_transformation(*args, **kwargs):
        mlp, history = fit_transformation(*args, **kwargs)
        torch.save({"final": _state(mlp), "history": history}, record_dir / f"transform_rank{ctx.rank}.pt")
        return mlp, history

    cmce.train.run_epochs = spy_run_epochs
    cmce.stages.fit_transformation = spy_fit_transformation
    common = ["--config", config, "--set", "train.epochs=1", "--set", "kd.epochs=1", "--set", "transform.epochs=2"]
    q, s, t = out / "q.pt", out / "s.pt", out / "t.pt"
    teacher = Path(tempfile.mkdtemp()) / "teacher.pt"  # this rank's copy, outside the folder the test lists
    for argv in (
        ["train", *common, "--dataset", dataset, "--model", "query", "--out", str(q)],
        ["train", *common, "--dataset", dataset, "--kd-teacher", teacher, "--out", str(s)],
        ["fit-transform", *common, "--dataset", dataset, "--query-model", str(q), "--gallery-model", teacher,
         "--out", str(t)],  # the gallery-role copy: a KD student is no gallery model
    ):
        if teacher in argv:  # made from the query model trained above
            argv[argv.index(teacher)] = str(_as_gallery_model(q, teacher))
        rc = main(argv)
        if rc != 0:
            return rc
    ddp.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(run(Path(sys.argv[1]), sys.argv[2], sys.argv[3]))
