"""The ``distill`` command line.

Exit codes: 0 success, 2 a user error (bad recipe, missing file, bad value: one line, no
traceback), 3 a failed deployment gate, 1 an internal failure.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from distill import __version__
from distill.errors import TargetsNotMet, UserError

#: sub-command -> module with ``add_arguments(parser)`` and ``run(args) -> int``.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("distill.cli_train", "train a student from a recipe (default: digits_kd)"),
    "recipes": ("distill.cli_train", "list the shipped recipes"),
    "export": ("distill.cli_train", "export a checkpoint's student to ONNX"),
    "bench": ("distill.cli_bench", "measure an ONNX model's latency in ONNX Runtime"),
    "serve-bench": ("distill.cli_serve", "p99 under Poisson load with dynamic batching"),
    "gate": ("distill.cli_gate", "deployment gates on a report.json (exit 3 on failure)"),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, as for every user error
        self.print_usage(sys.stderr)
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported (start-up stays fast)."""
    parser = _Parser(
        prog="distill",
        description="Distill, prune and quantize a student; export and time it every epoch; "
        "stop when it meets its accuracy and p99 targets.",
    )
    parser.add_argument("--version", action="version", version=f"distill {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name != command:
            continue
        mod = importlib.import_module(module)
        stem = name.replace("-", "_")
        add = getattr(mod, f"add_{stem}_arguments", None) or mod.add_arguments
        add(p)
        p.set_defaults(_run=getattr(mod, f"run_{stem}", None) or mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TargetsNotMet as exc:
        print(f"gate failed: {exc}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
