"""`python -m cmce.dvc_stage [--make-dir DIR] <cmce arguments>`: the `cmd` of a DVC stage that names models.

DVC runs every `cmd` through a shell after putting `${...}` values into it, so a model name from params.yaml
in a `cmd` (`q1;touch X;#`, `query v2`) was shell text. Here the command line holds no config text at all:
`{dotted.key}` stands for that config value (`{query_model.name}`, `{batch_size}`) and `{key}` for the gallery
model of a `foreach` stage, read from DVC_STAGE (`train_gallery@resnet`), which DVC sets for each stage's
command. The config (the command's `--config`, else `params.yaml`) is checked whole first, and each value
becomes one argument of `cmce`, never shell text. A bad name is exit 2 and one line naming its key.
An entry point beside cli.py, as thin: it imports nothing of DVC and reads only that variable.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shlex
import shutil
import sys
from pathlib import Path

import yaml

from cmce.arguments import OneLineParser
from cmce.config import Config, check_model_name, load_config, read_yaml

log = logging.getLogger("cmce")
PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_.]*)\}")
DEFAULT_PARAMS = "params.yaml"  # DVC's own default params file, in the stage's folder


def params_file(command: list[str]) -> str:
    """The config the cmce command reads (`--config X` or `--config=X`), else DVC's default params file."""
    for i, arg in enumerate(command):
        if arg == "--config" and i + 1 < len(command):
            return command[i + 1]
        if arg.startswith("--config="):
            return arg.partition("=")[2]
    return DEFAULT_PARAMS


def check_gallery_keys(path: str) -> None:
    """The keys of the mapping form of `gallery_models` are model names (the config names them by position)."""
    try:
        raw = read_yaml(Path(path).read_text())
    except (OSError, ValueError, yaml.YAMLError):  # unreadable, not YAML: load_config says so, naming the file
        return
    models = raw.get("gallery_models") if isinstance(raw, dict) else None
    for name in models if isinstance(models, dict) else ():
        check_model_name(name, f"{path}: gallery_models.{name}")


def config_value(cfg: Config, dotted: str, stage: str | None) -> str:
    """The text of placeholder `{dotted}`: a config value, or `key`, this foreach stage's gallery model."""
    if dotted == "key":
        if not stage:
            raise ValueError("{key}: DVC_STAGE is not set (run by `dvc repro`, which sets it for each stage)")
        name = stage.rpartition("@")[2]
        if "@" not in stage or name not in [m.name for m in cfg.gallery_models]:
            raise ValueError(f"{{key}}: DVC_STAGE={stage!r} is not a foreach stage of a gallery model in the config")
        return name
    value: object = cfg
    for part in dotted.split("."):
        value = getattr(value, part, None)
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(f"{{{dotted}}}: not a config value this command line may hold")
    return str(value)


def resolve(args: list[str], cfg: Config, stage: str | None) -> list[str]:
    return [PLACEHOLDER.sub(lambda m: config_value(cfg, m.group(1), stage), a) for a in args]


def main(argv: list[str] | None = None) -> int:
    from cmce.errors import log_to_stderr

    log_to_stderr()
    p = OneLineParser(prog="python -m cmce.dvc_stage", description=__doc__.splitlines()[0])
    p.add_argument("--make-dir", default=None, metavar="DIR", help="the stage's output folder, which a step may "
                   "leave empty: emptied (DVC keeps it: persist) and made, once the config is checked")
    p.add_argument("command", nargs=argparse.REMAINDER, help="the cmce command line, with {placeholders}")
    args = p.parse_args(argv)
    stage = os.environ.get("DVC_STAGE")
    where = f"DVC stage {stage}" if stage else "python -m cmce.dvc_stage"
    if not args.command:
        log.error("%s: no cmce command given", where)
        return 2
    try:
        path = params_file(args.command)
        check_gallery_keys(path)
        cfg = load_config(path)
        command = resolve(args.command, cfg, stage)
        make_dir = resolve([args.make_dir], cfg, stage)[0] if args.make_dir else None
    except ValueError as err:
        log.error("%s: %s", where, err)
        return 2
    if make_dir:  # a student of an earlier run must not stay behind when this one trains none (kd.enabled: false)
        shutil.rmtree(make_dir, ignore_errors=True)
        Path(make_dir).mkdir(parents=True, exist_ok=True)
    log.info("%s: cmce %s", where, shlex.join(command))
    from cmce.cli import main as cmce

    return cmce(command)


if __name__ == "__main__":
    sys.exit(main())
