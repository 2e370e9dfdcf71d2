"""Quality studies on real data: does the CP multi-task method deliver what the paper says, at what cost?

``python -m cpkernels.eval.quality`` runs the comparison of `cpkernels.eval.quality` (CP multi-task
against per-task LoRA, head-only, full fine-tuning and single-task CP) on offline real text, and
`cpkernels.eval.report` writes its table, plot and hypothesis verdict. Needs the ``eval`` extra.
"""
