"""Multi-task fine-tuning recipe: GLUE or your own tasks, mixed-task batches, one head per task.

Run it as ``cpkernels-train`` or ``python -m cpkernels.train`` (``--help`` lists the options);
`cpkernels.train.run(argv)` does the same from Python and returns the results dict.
`cpkernels.train.load_trained(output_dir)` loads a finished run back for inference: (model, tokenizer);
`load_heads` loads only the heads into a `MultiTaskModel`.
Modules: `data` (tasks, loading, sampler), `heads` (the multi-task model), `loop` (training,
evaluation, checkpoints, DDP), `metrics` (GLUE metrics), `cli`.
"""
from .cli import load_trained, main, run
from .heads import MultiTaskModel, load_heads

__all__ = ["MultiTaskModel", "load_heads", "load_trained", "main", "run"]
