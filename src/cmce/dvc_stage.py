"""`python -m cmce.dvc_stage [--make-dir DIR] [--params FILE] <cmce arguments>`: a DVC stage's `cmd` naming models.

DVC runs every `cmd` through a shell after putting `${...}` values into it, so a model name from params.yaml
in a `cmd` (`q1;touch X;#`, `query v2`) was shell text. Here the command line holds no config text at all:
`{dotted.key}` stands for that config value (`{query_model.name}`, `{batch_size}`) and `{key}` for the gallery
model of a `foreach` stage, read from DVC_STAGE (`train_gallery@resnet`), which DVC sets for each stage's
command. The config (the command's `--config`, else `--params`, else `params.yaml`) is checked whole first, and
each value becomes one argument of `cmce`, never shell text. A bad name is exit 2 and one line naming its key.
`{{` and `}}` are literal braces, as in str.format: `--out 'o/{{run}}.pt'` writes `o/{run}.pt`.
A config that is not a regular file, an empty `--config=`, a `--make-dir` that is a file: exit 2, one line.
An entry point beside cli.py, as thin: it imports nothing of DVC and reads only that variable.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import shlex
from pathlib import Path

import yaml

from cmce.arguments import OneLineParser
from cmce.config import Config, check_model_name, load_config
from cmce.config_yaml import read_config_text, read_yaml
from cmce.overrides import parse_overrides
from cmce.storage import local_input

log = logging.getLogger("cmce")
# `{{`, `}}`: literal braces; a brace left over (`{x}}`, `{a-b}`) is refused, as str.format refuses it
PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_.]*)\}|([{}])")
DEFAULT_PARAMS = "params.yaml"  # DVC's own default params file, in the stage's folder


def option_values(command: list[str], flag: str) -> list[str]:
    """The values `command` gives option `flag`, in order, as `--flag X` or `--flag=X`."""
    return [v for k, a in enumerate(command) for v in ([command[k + 1]] if a == flag and k + 1 < len(command)
                                                       else [a.partition("=")[2]] if a.startswith(f"{flag}=") else [])]


def params_file(command: list[str]) -> str:
    """The config the cmce command reads (`--config X` or `--config=X`), else DVC's default params file."""
    return next(iter(option_values(command, "--config")), DEFAULT_PARAMS)


def check_gallery_keys(path: str | Path) -> None:
    """The keys of the mapping form of `gallery_models` are model names (the config names them by position)."""
    try:
        raw = read_yaml(read_config_text(path))
    except (ValueError, yaml.YAMLError):  # not a regular file, too big, not YAML: load_config says so, naming it
        return
    models = raw.get("gallery_models") if isinstance(raw, dict) else None
    for name in models if isinstance(models, dict) else ():
        check_model_name(name, f"{path}: gallery_models.{name}")


def _field_names(obj: object) -> set[str]:
    return {f.name for f in dataclasses.fields(obj)}


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
    for part in dotted.split("."):  # the config's own fields only: `{query_model.__module__}` put Python's in
        value = getattr(value, part, None) if dataclasses.is_dataclass(value) and part in _field_names(value) else None
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(f"{{{dotted}}}: not a config value this command line may hold")
    return str(value)


def resolve(args: list[str], cfg: Config, stage: str | None) -> list[str]:
    def value(m: re.Match[str]) -> str:
        if m.group(2):  # was kept as a literal brace: `o/x_{query_model.name}}.pt` wrote `o/x_query}.pt`
            raise ValueError(f"{m.string!r}: a single {m.group(2)!r} at character {m.start() + 1}; a placeholder is "
                             "{dotted.key}, a literal brace is written twice ('{{' or '}}')")
        return config_value(cfg, m.group(1), stage) if m.group(1) else m.group(0)[0]  # `{{` → `{`, `}}` → `}`

    return [PLACEHOLDER.sub(value, a) for a in args]


def overrides_of(command: list[str]) -> list[str]:
    """The command's own `--set KEY=VALUE` pairs: a placeholder takes the value the command runs with
    (`--set query_model.width=4` with `{query_model.width}` in `--out` named a width-4 model `…_w8.pt`)."""
    return option_values(command, "--set")


def config_path(command: list[str], params: str | None = None) -> Path:
    """The local config file of `command` (`params` for one that reads none, as export-query), checked as cmce checks
    it before reading (a FIFO hung here)."""
    if params is not None and option_values(command, "--config"):
        raise ValueError("--params is for a cmce command that takes no --config; this one's --config is its params")
    path = params_file(command) if params is None else params
    if params == "":
        raise ValueError("--params: empty")
    if not path:
        raise ValueError("--config: empty")
    return local_input(path)


def make_output_dir(make_dir: str) -> list[Path]:
    """Make the stage's output folder (DVC needs it even when the step leaves it empty); returns the folders made,
    outermost first, for removal when the command fails."""
    if not make_dir:
        raise ValueError("--make-dir: empty")
    folder = Path(make_dir)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--make-dir {make_dir}: is a file, not a folder")
    made = [p for p in (folder, *folder.parents) if not p.exists()][::-1]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"--make-dir {make_dir}: {err.strerror or err}") from None
    return made


def remove_made_dirs(made: list[Path]) -> None:
    """The folders make_output_dir made, innermost first, as long as they are empty (a failed command left them)."""
    for folder in reversed(made):
        try:
            folder.rmdir()
        except OSError:
            return


def _role(path: Path) -> str | None:
    """The role an embedding-model checkpoint records; None for any other file (a transformation, a dataset)."""
    from cmce.checkpoint import CheckpointError, load_embedding_model
    from cmce.output_checks import file_format

    if file_format(path) != "checkpoint":  # told by its first bytes: no torch load of a foreign file
        return None
    try:
        return load_embedding_model(path).meta.get("role")  # refuses a checkpoint of any other format
    except (CheckpointError, OSError, ValueError):
        return None


def remove_stale_student(folder: str, command: list[str], cfg: Config) -> None:
    """After `train --kd-teacher` ran with kd.enabled false (it trains and writes nothing): an earlier run's
    student at its `--out` in the stage's folder must not stay as this run's output. Run after cmce succeeded, so
    its checks held (the --out is none of its inputs); only a KD student's checkpoint is removed, nothing else."""
    if command[:1] != ["train"] or not option_values(command, "--kd-teacher") or cfg.kd.enabled:
        return
    out = next(iter(option_values(command, "--out")), None)
    if out is None or not Path(out).is_file() or Path(out).resolve().parent != Path(folder).resolve():
        return
    if _role(Path(out)) == "kd_student":  # a query or gallery model kept there was removed as a student
        Path(out).unlink()
        log.info("removed %s: a student of an earlier run (kd.enabled is false)", out)


def write_source_digest(folder: Path, out: Path) -> None:
    """sha256 of every file under `folder` (Python's byte-code caches aside), one `digest  path` line each: what the
    lifecycle project depends on for the library's code. DVC applies a .dvcignore only inside its own project, so a
    dep on ../src/cmce there changed whenever Python wrote a .pyc, and every lifecycle stage ran again."""
    from cmce.storage import file_sha256, write_text

    if not folder.is_dir():
        raise ValueError(f"--source-digest {folder}: not a folder")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc")
    write_text(out, "".join(f"{file_sha256(p)}  {p.relative_to(folder).as_posix()}\n" for p in files))


def main(argv: list[str] | None = None) -> int:
    from cmce.errors import set_up_command

    set_up_command()
    p = OneLineParser(prog="python -m cmce.dvc_stage", description="the cmd of a DVC stage that names models "
                      "(see the module's docstring)")  # not __doc__: None under PYTHONOPTIMIZE=2
    p.add_argument("--make-dir", default=None, metavar="DIR", help="the stage's output folder, which a step may "
                   "leave empty: made (removed again if the command fails); an earlier KD student at --out is "
                   "removed once the command has run with kd.enabled false")
    p.add_argument("--params", default=None, metavar="FILE", help="the params file the {placeholders} read, for a "
                   "cmce command without --config (default: the command's --config, else params.yaml here)")
    p.add_argument("--source-digest", nargs=2, default=None, metavar=("FOLDER", "OUT"), help="instead of a command: "
                   "write the sha256 of every file under FOLDER (byte-code caches aside) to OUT")
    p.add_argument("command", nargs=argparse.REMAINDER, help="the cmce command line, with {placeholders}")
    args = p.parse_args(argv)
    stage = os.environ.get("DVC_STAGE")
    where = f"DVC stage {stage}" if stage else "python -m cmce.dvc_stage"
    if args.source_digest:
        try:
            if args.command:
                raise ValueError("--source-digest takes no cmce command")
            write_source_digest(*map(Path, args.source_digest))
        except (OSError, ValueError) as err:
            log.error("%s: %s", where, err)
            return 2
        return 0
    if not args.command:
        log.error("%s: no cmce command given", where)
        return 2
    try:
        path = config_path(args.command, args.params)
        check_gallery_keys(path)
        cfg = load_config(path, parse_overrides(overrides_of(args.command)))  # as the command will run: its --set too
        command = resolve(args.command, cfg, stage)
        folder = None if args.make_dir is None else resolve([args.make_dir], cfg, stage)[0]
        made = [] if folder is None else make_output_dir(folder)
    except (OSError, ValueError) as err:
        log.error("%s: %s", where, err)
        return 2
    log.info("%s: cmce %s", where, shlex.join(command))
    from cmce.cli import main as cmce

    try:
        status = cmce(command)
    except SystemExit as bad_arguments:  # argparse's exit 2, its one line already written
        status = bad_arguments.code if isinstance(bad_arguments.code, int) else 2
    if status != 0:
        remove_made_dirs(made)
    elif folder is not None:
        remove_stale_student(folder, command, cfg)
    return status


if __name__ == "__main__":
    from cmce.errors import exit_process, starting

    with starting("cmce.dvc_stage"):
        from cmce import distributed

        status = main()
    exit_process(status, at_once=distributed.threads_left_waiting())
