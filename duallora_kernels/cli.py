"""The ``duallora`` command. Each subcommand lives in its own module under
``duallora_kernels.commands`` and provides ``add_parser(subparsers)`` and ``run(args) -> int``.

Shared here: :class:`HelpFormatter` (each option's default shown once), and the ``--threads``
option (:func:`add_threads_option`, :func:`apply_threads`)."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

COMMANDS = ("train", "pretrain", "bench", "profile-memory")
#: The exit status of a command stopped by Ctrl-C (128 + SIGINT), as shells report it.
INTERRUPTED = 130


class HelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to an option's help unless the help states its default itself; flags
    (options that take no value) get none, they are off unless given."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            not action.option_strings
            or action.nargs == 0
            or action.default is argparse.SUPPRESS
            or "default" in text.lower()
        ):
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


def usable_cores() -> int:
    """The CPUs this process may run on (its affinity mask), not the machine's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def default_threads() -> int:
    """torch's own choice of CPU threads, but never more than :func:`usable_cores`: more threads than
    cores make torch's OpenMP threads spin-wait for each other (10-20x slower on a busy machine)."""
    import torch

    return max(1, min(torch.get_num_threads(), usable_cores()))


def add_threads_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threads", type=int, default=None, metavar="N",
        help=f"CPU threads torch uses (default: torch's choice, at most the cores this process may use: "
             f"{usable_cores()} here)",
    )


def apply_threads(requested: int | None) -> int:
    """Set torch's CPU thread count (``None``: :func:`default_threads`) and return it; ValueError when
    ``requested`` is < 1 or more than the cores this process may use."""
    import torch

    cores = usable_cores()
    if requested is None:
        threads = default_threads()
    elif isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
        raise ValueError(f"--threads must be an int >= 1, got {requested!r}")
    elif requested > cores:
        raise ValueError(f"--threads {requested} is more than the {cores} core(s) this process may use "
                         f"(os.sched_getaffinity); threads beyond the cores only wait for each other. "
                         f"Use --threads {cores} or fewer")
    else:
        threads = requested
    torch.set_num_threads(threads)
    return threads


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="duallora", description="DualLoRA continual learning of vision transformers, with fused kernels."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        module = importlib.import_module(f"duallora_kernels.commands.{name.replace('-', '_')}")
        p = module.add_parser(sub)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    # What followed the command name: a command that stops early can print how to continue.
    args._argv = argv[argv.index(args.command) + 1:] if args.command in argv else []
    try:
        return int(args._run(args) or 0)
    except (ValueError, FileNotFoundError) as err:
        # bad input (arguments, data, checkpoints): say what is wrong and what to do, no traceback
        print(f"duallora {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # commands that can say more (train) catch it themselves
        print(f"duallora {args.command}: interrupted", file=sys.stderr)
        return INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
