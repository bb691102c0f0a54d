"""Transformation settings chosen without the test split (the `lambda` and `tune` ablations): a validation
split carved from seed 0's train split, every model retrained on the rest, T refitted per setting."""

from __future__ import annotations

from dataclasses import replace

from benchmarks.refit import refit
from benchmarks.report import shown
from cmce.config import Config
from cmce.data.prepare import carve_validation
from cmce.data.readers import dataset_info
from cmce.layout import RunLayout
from cmce.stages import run_all

LAMBDA_GRID = (0.0, 0.01, 0.03, 0.1, 0.3, 1.0)
# the transformation settings searched by the `tune` ablation, one coordinate after the other in this order
TUNE_GRID: dict[str, tuple] = {"lam": LAMBDA_GRID, "depth": (1, 2, 3), "hidden_dim": (256, 512, 1024),
                               "epochs": (10, 30, 100)}
SETTING_NAMES = {"lam": "λ", "depth": "depth", "hidden_dim": "hidden width", "epochs": "epochs"}


class Validation:
    """Transformation settings measured without the test split: seed 0's train split carved into a
    validation dataset (whole classes / class groups under disjoint protocols), every model retrained on
    the rest once, then T refitted per setting on those frozen models. Each setting is also measurable
    on test (T refitted on the run's own models). Results cached by setting, shared by ablations."""

    def __init__(self, cfg: Config, lay: RunLayout, config_run: dict, fraction: float):
        self.cfg, self.lay, self.fraction = cfg, lay, fraction
        self.root = lay.root / "validation"
        self.val_lay = RunLayout(self.root / "run", lay.gallery_names)
        self.val_cfg = replace(cfg, output_dir=str(self.val_lay.root), kd=replace(cfg.kd, enabled=False))
        self.config_settings = {k: getattr(cfg.transform, k) for k in TUNE_GRID}
        self._val: dict[tuple, dict] = {}
        self._test: dict[tuple, dict] = {self._key(self.config_settings): config_run}
        self.ens = f"asym_ensemble/{len(cfg.gallery_models)}"

    @staticmethod
    def _key(settings: dict) -> tuple:
        return tuple(sorted(settings.items()))

    @staticmethod
    def _dirname(settings: dict) -> str:
        return "_".join(f"{k}{v:g}" for k, v in sorted(settings.items()))

    def val(self, settings: dict) -> dict:
        key = self._key(settings)
        if not self._val:  # the carve and the retraining happen once, when first needed
            carve_validation(self.lay.dataset, self.val_lay.dataset, self.fraction, self.cfg.seed)
            self._val[self._key(self.config_settings)] = run_all(self.val_cfg, prepare=False)
        if key not in self._val:
            self._val[key] = refit(self.val_cfg, self.val_lay, self.root / self._dirname(settings), settings)
        return self._val[key]

    def test(self, settings: dict) -> dict:
        key = self._key(settings)
        if key not in self._test:
            self._test[key] = refit(self.cfg, self.lay, self.lay.root / "tuned" / self._dirname(settings), settings)
        return self._test[key]

    def score(self, settings: dict) -> float:
        # λ trades R@1 (falls with λ) against MAP@R (rises): the pick weighs both equally
        m = self.val(settings)[self.ens]
        return m["R@1"] + m["MAP@R"]

    def cell(self, metrics: dict) -> str:
        return shown(metrics[self.ens])

    def carved_by(self) -> str:
        return dataset_info(self.val_lay.dataset)["validation"]["by"]


def describe(settings: dict) -> str:
    linear = settings.get("depth") == 1  # a linear T has no hidden layer: its width means nothing
    return ", ".join(f"{SETTING_NAMES[k]} {v:g}" for k, v in settings.items() if not (linear and k == "hidden_dim"))


def coordinate_search(v: Validation, grid: dict[str, tuple]) -> tuple[dict, list[tuple[str, dict, bool]]]:
    """One pass over the grid's settings in order, each set to its best validation score with the others
    held (ties keep the current value). Returns the chosen settings and, per row, (setting, the settings
    measured, chosen)."""
    current = dict(v.config_settings)
    trail = []
    for name, values in grid.items():
        if name == "hidden_dim" and current["depth"] == 1:
            continue  # a linear T has no hidden layer
        candidates = [current[name]] + [x for x in values if x != current[name]]
        best = max(candidates, key=lambda x: v.score({**current, name: x}))  # max keeps the first of ties
        trail += [(name, {**current, name: x}, x == best) for x in sorted(candidates)]
        current[name] = best
    return current, trail


def tuning_table(v: Validation, grid: dict[str, tuple]) -> list[str]:
    """The validation search over `grid`, then test for the config's settings, the tuned ones and the
    tuned ones with λ = 0 (alignment only): the issue's "λ = 0 vs tuned"."""
    chosen, trail = coordinate_search(v, grid)
    rows = [f"Validation: {100 * v.fraction:g} % of seed {v.cfg.seed}'s train split ({v.carved_by()}), every model "
            "retrained on the rest; settings chosen one after the other by validation R@1 + MAP@R of "
            f"{v.ens} (R@1 / MAP@R / TAR@FAR=0.001 in %).", "",
            "| setting | value | validation |", "|---|---|---|"]
    for name, at, picked in trail:
        tags = [t for t, on in (("chosen", picked), ("config", at[name] == v.config_settings[name])) if on]
        rows.append(f"| {SETTING_NAMES[name]} | {at[name]:g}{' (' + ', '.join(tags) + ')' if tags else ''} | "
                    f"{v.cell(v.val(at))} |")
    finals = {"config": v.config_settings, "tuned": chosen, "tuned with λ = 0": {**chosen, "lam": 0.0}}
    groups: dict[tuple, tuple[dict, list[str]]] = {}  # equal settings share one row, named by all their labels
    for label, settings in finals.items():
        groups.setdefault(v._key(settings), (settings, []))[1].append(label)
    rows += ["", "| T settings | validation | test |", "|---|---|---|"]
    for settings, names in groups.values():
        rows.append(f"| {' and '.join(names)}: {describe(settings)} | {v.cell(v.val(settings))} | "
                    f"{v.cell(v.test(settings))} |")
    return rows

