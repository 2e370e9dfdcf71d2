"""Multi-task fine-tuning recipe: GLUE or your own tasks, mixed-task batches, one head per task.

Run it as ``cpkernels-train`` or ``python -m cpkernels.train`` (``--help`` lists the options);
`cpkernels.train.cli.run(argv)` does the same from Python and returns the results dict.
Modules: `data` (tasks, loading, sampler), `heads` (the multi-task model), `loop` (training,
evaluation, checkpoints, DDP), `metrics` (GLUE metrics), `cli`.
"""
from .cli import main, run

__all__ = ["main", "run"]
