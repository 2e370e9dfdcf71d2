"""The README's quick start is the front door: it must run as written."""
import pathlib
import re

import torch

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_quick_start_runs(capsys):
    block = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    scope = {}
    exec(compile(block, "README.md quick start", "exec"), scope)
    assert scope["y"].shape == (4, 128, 768)
    grads = [p.grad for p in scope["model"].parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert "per task" in capsys.readouterr().out.lower()
