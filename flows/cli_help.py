"""What every `fedmnist` subcommand's `--help` shows besides its options: a description of what it
does and examples as one types them. One helper, so every subcommand's help has the same shape
(tests/flows/test_cli_help.py holds every subcommand to it). Standard library only: `--help`
stays quick.
"""

from __future__ import annotations

import argparse
from typing import Any

EXAMPLES = "examples:"  # the epilog's first line, which the help test looks for


def doc(description: str, *examples: str) -> dict[str, Any]:
    """`add_parser` keywords: `description` (kept as written: line breaks are the author's),
    and an epilog listing `examples`, one command a line.

    Args:
        description: what the subcommand does, in a sentence or a short paragraph.
        examples: command lines, e.g. `fedmnist models list`; a `  # ...` tail explains one.
    """
    return {
        "description": description,
        "epilog": "\n".join([EXAMPLES, *(f"  {e}" for e in examples)]),
        "formatter_class": argparse.RawDescriptionHelpFormatter,
    }


def version_text() -> str:
    """`fedmnist --version`: the package version and the Python running it (no heavy import)."""
    import platform

    import fedcore

    return f"fedmnist {fedcore.__version__} (federated-mnist, Python {platform.python_version()})"
