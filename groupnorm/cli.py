"""`groupnorm` command line: `groupnorm study ...` and `groupnorm bench ...`.

Each subcommand lives in its own module, which provides ``add_arguments(parser)`` and
``main(args) -> int``; this file only wires them up.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "study": ("groupnorm.study.cli", "reproduce the paper's batch-size experiment (BN vs GN vs LN/IN/GN+WS)"),
    "bench": ("groupnorm.bench", "time the GroupNorm kernels against torch.nn.GroupNorm and the memory floor"),
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions keep their line breaks (so examples stay one per line); an option's default
    is appended when it tells something (not None or False) and its help does not give it already."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (
            action.option_strings
            and "(default" not in text
            and "default:" not in text
            and default is not None
            and default is not False
            and default is not argparse.SUPPRESS
        ):
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="groupnorm",
        description="Group Normalization toolkit (Wu & He, ECCV 2018).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `groupnorm COMMAND --help` for the options of one command.",
    )
    from groupnorm import __version__

    parser.add_argument("--version", action="version", version=f"groupnorm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:  # keep the other subcommands usable, and say why this one is not
            p = sub.add_parser(name, help=f"{help_text} [unavailable: {exc}]")
            p.set_defaults(_module=None, _error=f"`groupnorm {name}` is unavailable: {exc}")
            continue
        p = sub.add_parser(
            name,
            help=help_text,
            description=(module.__doc__ or help_text).strip(),
            formatter_class=HelpFormatter,
            allow_abbrev=False,  # --epoch for --epochs would slip past study --quick's override check
        )
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args._argv = list(sys.argv[1:] if argv is None else argv)  # for a command that restarts itself
    if args.command is None:
        parser.print_help()
        return 2
    if args._module is None:
        print(args._error, file=sys.stderr)
        return 1
    return int(args._module.main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
