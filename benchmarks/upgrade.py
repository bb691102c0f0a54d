"""The paper's query-model upgrade experiment: train every model on 50 % of the training data, then a
new query model on 100 %, upgrade (refit transformations from stored embeddings, gallery images
unread), and compare Recall@1 / MAP@R before and after for ensemble sizes 1..N.

    python -m benchmarks.upgrade [--config params.yaml] [--out runs/bench_upgrade] [--no-write]

Prints a Markdown table and writes it, dated, to BENCHMARKS.md (in place of its previous section).
"""

from __future__ import annotations

import argparse
import logging
import shlex
import time
from dataclasses import replace
from pathlib import Path

from benchmarks.args import config_or_error
from benchmarks.report import LOG_FORMAT, ROOT, config_shown, write_section
from cmce import stages
from cmce.evaluate import EvalInputs, evaluate
from cmce.layout import RunLayout
from cmce.lifecycle import upgrade_query_model


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", default=str(ROOT / "params.yaml"))
    p.add_argument("--out", default=str(ROOT / "runs" / "bench_upgrade"))
    p.add_argument("--no-write", action="store_true", help="print only, do not write BENCHMARKS.md")
    return p


def main(argv: list[str] | None = None) -> None:
    p = build_parser()
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    started = time.time()
    full = config_or_error(p, args.config, {"output_dir": args.out, "kd.enabled": False}, flags={"output_dir": "--out"})
    half = replace(full, query_model=replace(full.query_model, data_fraction=0.5),
                   gallery_models=[replace(m, data_fraction=0.5) for m in full.gallery_models])
    lay = RunLayout(Path(args.out), [m.name for m in full.gallery_models])
    stages.prepare_data(half, stages.PrepareInputs(), stages.DatasetOutputs(lay.dataset))
    q_old = lay.model("query_half")
    stages.train_model(half, stages.TrainInputs(lay.dataset, half.query_model.name), stages.ModelOutputs(q_old))
    for g in lay.gallery_names:
        stages.train_model(half, stages.TrainInputs(lay.dataset, g), stages.ModelOutputs(lay.model(g)))
        stages.fit_transform(half, stages.FitInputs(lay.dataset, q_old, lay.model(g)),
                             stages.FitOutputs(lay.transformation(g), lay.train_embeddings(g)))
        stages.embed_member(stages.MemberInputs(lay.dataset, q_old, lay.model(g), lay.transformation(g),
                                                half.batch_size), stages.GalleryOutputs(lay.member(g)))
    stages.combine(stages.FilesInputs([lay.member(g) for g in lay.gallery_names]), stages.GalleryOutputs(lay.gallery))
    before = evaluate(EvalInputs(lay.dataset, q_old, lay.gallery, [lay.transformation(g) for g in lay.gallery_names]),
                      full.evaluate, lay.root / "eval_before", full.batch_size, full.seed)

    q_new = lay.model("query_full")
    stages.train_model(full, stages.TrainInputs(lay.dataset, full.query_model.name), stages.ModelOutputs(q_new))
    new_transforms = lay.root / "transforms_upgraded"
    upgraded = lay.root / "gallery_upgraded.parquet"
    upgrade_query_model(lay.gallery, q_new, lay.dataset, [lay.train_embeddings(g) for g in lay.gallery_names],
                        full.transform, new_transforms, upgraded, full.seed, full.batch_size)
    after = evaluate(EvalInputs(lay.dataset, q_new, upgraded, sorted(new_transforms.glob("*.pt"))),
                     full.evaluate, lay.root / "eval_after", full.batch_size, full.seed)

    rows = ["| configuration | R@1 before | R@1 after | MAP@R before | MAP@R after |", "|---|---|---|---|---|"]
    keys = ["sym_query"] + [f"asym_ensemble/{n}" for n in range(1, len(lay.gallery_names) + 1)]
    for k in keys:
        b, a = before[k], after[k]
        rows.append(f"| {k} | {100 * b['R@1']:.2f} | {100 * a['R@1']:.2f} | {100 * b['MAP@R']:.2f} | "
                    f"{100 * a['MAP@R']:.2f} |")
    body = ["Before: query and gallery models trained on 50 % of the train split. After: a new query model on "
            "100 %, transformations refitted from the stored raw train embeddings, gallery re-transformed from "
            "its stored raw embeddings (no gallery image read). Test split, leave-one-out; values in %.", "", *rows]
    # the config as the project root reaches it (its file name alone was no path from there)
    write_section("Query-model upgrade without gallery images",
                   f"python -m benchmarks.upgrade --config {shlex.quote(config_shown(args.config))}", body,
                   time.time() - started, write=not args.no_write)

if __name__ == "__main__":
    main()
