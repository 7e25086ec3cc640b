"""``cpoc`` command line: demo (mixed chat + continuous PoC; ``--pure`` for plain PoC), generate, validate,
bench-mixed, and the subcommands other modules register.

Exit codes: 0 success (validate: honest), 1 fraud, 2 bad input (one line ``cpoc: error: …`` on stderr, checked
before any model is built wherever possible), 3 no verdict (validate could not recompute some nonces).

Adding a subcommand: write ``register(subparsers)`` in your own module — it calls ``subparsers.add_parser(...)``,
adds arguments and ``set_defaults(func=handler)`` with ``handler(args) -> int`` (raise
:class:`~cpoc_kernels.cli.common.UsageError` for bad input; returning the handler, or taking ``(subparsers,
COMMANDS)`` and filling that table, works too) — and add ONE entry to :data:`REGISTRARS`: the function itself or a
lazy ``"package.module:function"`` string (imported only when the parser is built, so ``cpoc`` starts without your
dependencies being imported by the other commands' modules).
"""
from __future__ import annotations

import importlib
import sys

from cpoc_kernels.progress import ProgressBar

from .common import EXIT_FRAUD, EXIT_NO_VERDICT, EXIT_OK, EXIT_USAGE, Parser, UsageError, parse_nonces
from .files import register_generate, register_validate
from .mixed import register_bench_mixed, register_demo

COMMANDS: dict = {}  # subcommand name -> handler(args) -> int, for registrars that return or fill a table
REGISTRARS: list = [
    register_demo,
    register_generate,
    register_validate,
    register_bench_mixed,
    "cpoc_kernels.integrations.hf.serve:register",
    "cpoc_kernels.sim.bench:register",
]


def version() -> str:
    import cpoc_kernels

    return cpoc_kernels.__version__


def _registrar(entry):
    if callable(entry):
        return entry
    module, _, name = entry.partition(":")
    return getattr(importlib.import_module(module), name)


def _register(entry, sub) -> None:
    """Call one registrar: ``register(sub)`` (may return the handler of the subcommand it added) or
    ``register(sub, COMMANDS)`` (fills the table itself)."""
    import inspect

    register = _registrar(entry)
    before = set(sub.choices)
    params = [p for p in inspect.signature(register).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    handler = register(sub, COMMANDS) if len(params) >= 2 else register(sub)
    if callable(handler):
        for name in set(sub.choices) - before:
            COMMANDS.setdefault(name, handler)


def build_parser() -> Parser:
    parser = Parser(prog="cpoc", description="Gonka PoC v2 nonces inside inference batches (cpoc_kernels). "
                                             "Exit codes: 0 ok/honest, 1 fraud, 2 bad input, 3 no verdict.")
    parser.add_argument("--version", action="version", version=f"cpoc {version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for entry in REGISTRARS:
        _register(entry, sub)
    return parser


def _one_line(message) -> str:
    """The message on one line (a user's value may hold a newline)."""
    return " ".join(str(message).splitlines())


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        handler = getattr(args, "func", None) or COMMANDS[args.command]
        return handler(args)
    except SystemExit as exc:  # --help / --version
        return exc.code if isinstance(exc.code, int) else EXIT_OK
    except (UsageError, ValueError) as exc:
        print(f"cpoc: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except ImportError as exc:  # an installed but broken optional dependency
        print(f"cpoc: error: {_one_line(exc)} (reinstall the extra: pip install 'cpoc_kernels[hf,plot]')", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        print(f"cpoc: error: {_one_line(exc.strerror or exc)}{_one_line(where)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("cpoc: interrupted", file=sys.stderr)
        return 130


__all__ = ["COMMANDS", "EXIT_FRAUD", "EXIT_NO_VERDICT", "EXIT_OK", "EXIT_USAGE", "ProgressBar", "REGISTRARS", "UsageError",
           "build_parser", "main", "parse_nonces", "version"]

if __name__ == "__main__":
    sys.exit(main())
