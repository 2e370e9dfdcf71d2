"""`python -m cpkernels.analyze` and ``cpkernels-analyze``: kept at this path for the command and old
imports; the code lives in `cpkernels.cli.analyze`."""
import sys

from .cli.analyze import analyze, format_report, main  # noqa: F401

__all__ = ["main", "analyze", "format_report"]

if __name__ == "__main__":
    sys.exit(main())
