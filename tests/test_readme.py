"""The README's quick start is the front door: it must run as written."""
import pathlib
import re

import torch

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_quick_start_runs(capsys, tmp_path, monkeypatch):
    block = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)  # the block saves its adapters in the working directory
    scope = {}
    exec(compile(block, "README.md quick start", "exec"), scope)
    assert scope["y"].shape == (4, 128, 768)
    model = scope["model"]
    assert type(model.classifier) is torch.nn.Linear and model.classifier.weight.requires_grad
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert len(grads) == 5 and all(g is not None and torch.isfinite(g).all() for g in grads)  # A, B, C, head
    assert sorted(p.name for p in (tmp_path / "adapters").iterdir())  # written, and loaded back by the block
    assert torch.equal(scope["loaded"].classifier.weight, model.classifier.weight)
    assert "per task" in capsys.readouterr().out.lower()
