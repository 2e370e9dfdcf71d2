"""``python -m cpkernels.train`` (and ``torchrun ... -m cpkernels.train``)."""
from .cli import main

raise SystemExit(main())
