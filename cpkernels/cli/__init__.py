"""Command-line entries (ARCHITECTURE §4): `cpkernels.cli.analyze` (``cpkernels-analyze``)."""
