"""The command lines' parser: a bad argument is one line naming it, and a single-valued option given twice is
refused (`cmce`, `python -m pipeline`)."""

from __future__ import annotations

import argparse
import difflib
import sys
import typing
from typing import Any


class OnceAction(argparse._StoreAction):
    """The store action of every option: a single-valued option given twice is refused (the last silently won:
    `--config a.yaml --config b.yaml` read b.yaml alone). Options taking lists (append, nargs) are left alone."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        if self.nargs in (None, "?") and option_string is not None:
            if self.dest in parser.given:
                raise argparse.ArgumentError(self, "given twice; give it once")
            parser.given[self.dest] = option_string
        super().__call__(parser, namespace, values, option_string)


class OneLineParser(argparse.ArgumentParser):
    """A bad argument is one line naming it (exit 2), not the usage text; `--help` still shows the usage.
    Options are given whole: argparse took `--se` for `--set`, which the DVC stage entry point and any script that
    reads a command line for its options then did not see (a fresh KD student removed as stale)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)  # passed on to the subcommands' parsers too
        super().__init__(*args, **kwargs)
        self.register("action", None, OnceAction)
        self.register("action", "store", OnceAction)
        self.given: dict[str, str] = {}  # dest: option string, of the OnceAction options this parse has seen

    def parse_args(self, args: Any = None, namespace: Any = None) -> Any:
        """An unknown argument is refused by the subcommand it was given to, naming its --help and the option it
        may have meant (`cmce search --image a.png`: "see cmce --help", the option left to be guessed)."""
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            sub = next((a.choices.get(getattr(parsed, a.dest, None)) for a in self._actions
                        if isinstance(a, argparse._SubParsersAction)), None)
            if sub is not None and (ours := [e for e in extras if e.split("=", 1)[0] in self._option_string_actions]):
                # `cmce train ... --debug`: cmce's own option, which `cmce train --help` does not list
                self.error(f"argument {ours[0].split('=', 1)[0]}: an option of {self.prog} itself; give it before "
                           f"{sub.prog.rsplit(' ', 1)[-1]}")
            theirs = sub is not None and all(e in sub.argv for e in extras)  # not given before the subcommand
            (sub if theirs else self).error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        self.argv = list(sys.argv[1:] if args is None else args)  # what error() looks through for unknown options
        subparsers = [p for a in self._actions if isinstance(a, argparse._SubParsersAction) for p in a.choices.values()]
        for parser in (self, *subparsers):
            parser.given = {}
        parsed = super().parse_known_args(args, namespace)
        for parser in subparsers:  # an option both before and after the subcommand (`--mlflow-uri`)
            if both := sorted(set(self.given) & set(parser.given)):
                self.error(f"argument {parser.given[both[0]]}: given twice (before and after {parser.prog}); "
                           "give it once")
        return parsed

    def error(self, message: str) -> typing.NoReturn:
        unknown = self._unknown_options(getattr(self, "argv", []))
        if unknown and message.startswith("the following arguments are required"):
            # `train --confg c.yaml` was "the following arguments are required: --config", the typo unnamed
            message = f"unrecognized arguments: {' '.join(unknown)}"
        if message.startswith("unrecognized arguments: "):
            known = [o for o in self._option_string_actions if o.startswith("--")]
            meant = [m for o in self._unknown_options(message.split(": ", 1)[1].split())
                     for m in difflib.get_close_matches(o, known, n=1)]
            message += f" (did you mean {', '.join(meant)}?)" if meant else ""
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")

    def _unknown_options(self, args: list[str]) -> list[str]:
        """The options among `args` that this parser does not know (a subcommand's parser sees only its own)."""
        out = []
        for arg in args:
            if arg == "--":
                break
            name = arg.split("=", 1)[0]
            # a negative number is a value: argparse's own rule for telling one from an option
            if (arg.startswith("-") and arg != "-" and not self._negative_number_matcher.match(arg)
                    and name not in self._option_string_actions):
                out.append(name)
        return out


def not_blank(convert: typing.Callable[[str], Any] = str, what: str = "a value") -> typing.Callable[[str], Any]:
    """An argparse type refusing a blank value (`--gallery-uri "$URI"` with URI unset ran on, the flag silently
    unset; `--name ''` got one of MLflow's random names), then `convert` of the text."""
    def parse(text: str) -> Any:
        if not text.strip():
            raise argparse.ArgumentTypeError(f"blank; give {what} or leave the flag out")
        return convert(text)

    parse.__name__ = "path or URI" if what == "a value" else what  # argparse names it in its `invalid … value` line
    return parse


def int_in(low: int, high: int | None = None) -> typing.Callable[[str], int]:
    """An argparse type: an integer of at least `low` (and at most `high`), checked at parse time, so that the
    flag is named (a bad --embed-shards failed only in its task, after the training)."""
    def parse(text: str) -> int:
        value = int(text)
        if high is None and value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        if high is not None and not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be from {low} to {high}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}" if high is None else f"integer from {low} to {high}"  # argparse names it
    return parse
