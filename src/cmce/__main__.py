"""`python -m cmce` (and `torchrun -m cmce`, and the `cmce` console script): the `cmce` command."""

from cmce.errors import exit_process, starting  # the standard library only: guards the heavy imports below


def entry() -> None:
    with starting("cmce"):
        from cmce import distributed
        from cmce.cli import main

        code = main()
    exit_process(code, at_once=distributed.threads_left_waiting())


if __name__ == "__main__":
    entry()
