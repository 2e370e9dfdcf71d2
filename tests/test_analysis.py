"""cpkernels.analysis and the analyze CLI: Gram formulas against materialised ΔW in float64, plots, CLI."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_sparsity import random_model

from cpkernels import analysis, analyze, sparsity
from cpkernels.adapters import read_adapters, save_adapters
from cpkernels.convert import cp_layers

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
REPO = Path(__file__).resolve().parents[1]


def materialised(model):
    """{layer: (T, d_out·d_in)} of flattened ΔW_t, from FusedCPLinear.delta_weight (float64, with s)."""
    return {name: torch.stack([m.delta_weight(t, torch.float64).flatten() for t in range(m.num_tasks)])
            for name, m in cp_layers(model)}


def cosine_rows(D):
    """Cosine similarity of the rows of D, 0 where a row is zero."""
    n = D.norm(dim=1)
    sim = (D @ D.T) / (n[:, None] * n[None, :])
    return torch.nan_to_num(sim, nan=0.0)


def mixed_rank_model():
    """Layers of different ranks (one of them pruned to 0) and a non-unit scale."""
    model = random_model(dims=(59, 17, 13, 7), rank=5, num_tasks=4, scale=0.6)
    _, m1 = list(cp_layers(model))[1]
    m1.set_factors(m1.A[:, :2], m1.B[:, :2], m1.C[:, :2])
    _, m2 = list(cp_layers(model))[2]
    m2.set_factors(m2.A[:, :0], m2.B[:, :0], m2.C[:, :0])
    return model


def test_gram_similarity_and_norms_match_materialised_updates():
    model = mixed_rank_model()
    D = materialised(model)
    per_layer_sim = analysis.task_similarity(model, per_layer=True)
    per_layer_gram = analysis.task_gram(model, per_layer=True)
    assert list(per_layer_sim) == [n for n, _ in cp_layers(model)]
    for name, d in D.items():
        torch.testing.assert_close(per_layer_gram[name], d @ d.T, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(per_layer_sim[name], cosine_rows(d), rtol=1e-10, atol=1e-12)
    everything = torch.cat(list(D.values()), dim=1)  # the model-wide update of each task
    sim = analysis.task_similarity(model)
    assert sim.shape == (4, 4) and sim.dtype == torch.float64 and sim.device.type == "cpu"
    torch.testing.assert_close(sim, cosine_rows(everything), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(analysis.task_update_norms(model), everything.norm(dim=1), rtol=1e-12, atol=0)
    for name, n in analysis.task_update_norms(model, per_layer=True).items():
        torch.testing.assert_close(n, D[name].norm(dim=1), rtol=1e-12, atol=0)


def test_zero_norm_tasks_have_similarity_zero_and_no_nan():
    model = random_model(num_tasks=4)
    layers = [m for _, m in cp_layers(model)]
    with torch.no_grad():
        for m in layers:
            m.C[2] = 0           # task 2: no update anywhere
        layers[0].C[1] = 0       # task 1: no update in the first layer only
    sim = analysis.task_similarity(model)
    assert torch.isfinite(sim).all()
    assert torch.equal(sim[2], torch.zeros(4, dtype=torch.float64)) and torch.equal(sim[:, 2], sim[2])
    assert sim[1, 1] == pytest.approx(1.0) and sim[0, 0] == pytest.approx(1.0)
    first = analysis.task_similarity(model, per_layer=True)[next(iter(cp_layers(model)))[0]]
    assert first[1].abs().max() == 0 and torch.isfinite(first).all()
    assert analysis.task_update_norms(model)[2] == 0

    fresh = random_model()
    with torch.no_grad():
        for _, m in cp_layers(fresh):
            m.C.zero_()  # init="cp": every update is zero
    assert torch.equal(analysis.task_similarity(fresh), torch.zeros(4, 4, dtype=torch.float64))


def test_factor_dict_input_matches_model_input():
    model = mixed_rank_model()
    factors = {name: {"A": m.A.detach().float(), "B": m.B.detach().float(), "C": m.C.detach().float(),
                      "scale": m.scale} for name, m in cp_layers(model)}
    # The computation runs in float64 whatever the stored dtype: fp32 inputs agree to fp32 rounding.
    torch.testing.assert_close(analysis.task_similarity(factors), analysis.task_similarity(model), rtol=1e-5,
                               atol=1e-6)
    torch.testing.assert_close(analysis.task_update_norms(factors), analysis.task_update_norms(model), rtol=1e-5,
                               atol=0)


def test_bad_input_errors():
    with pytest.raises(ValueError, match="no FusedCPLinear"):
        analysis.task_similarity(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="empty"):
        analysis.task_similarity({})
    with pytest.raises(ValueError, match="missing factor"):
        analysis.task_update_norms({"l": {"A": torch.ones(3, 2), "B": torch.ones(4, 2)}})
    with pytest.raises(ValueError, match="task rows"):
        analysis.task_similarity({"a": {"A": torch.ones(3, 2), "B": torch.ones(4, 2), "C": torch.ones(2, 2)},
                                  "b": {"A": torch.ones(3, 2), "B": torch.ones(4, 2), "C": torch.ones(3, 2)}})
    with pytest.raises(ValueError, match="square"):
        analysis.plot_task_similarity(torch.ones(2, 3), ["a", "b"], "unused.png")
    with pytest.raises(ValueError, match="task_names"):
        analysis.plot_task_similarity(torch.eye(3), ["a", "b"], "unused.png")
    with pytest.raises(ValueError, match="layers"):
        analysis.plot_layer_ranks({"rank": 3}, "unused.png")


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------
def assert_png(path, min_side=100):
    """A real, non-blank PNG: the signature, and matplotlib and PIL both decode it."""
    import matplotlib.image
    from PIL import Image

    path = Path(path)
    assert path.read_bytes()[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    with Image.open(path) as img:
        img.verify()
    pixels = matplotlib.image.imread(path)
    assert min(pixels.shape[:2]) >= min_side
    assert pixels[..., :3].std() > 0.01, f"{path} is blank"


def test_plots_are_valid_pngs(tmp_path):
    model = random_model()
    names = ["cola", "sst2", "a-much-longer-task-name", "t3"]
    out = analysis.plot_task_similarity(analysis.task_similarity(model), names, tmp_path / "sub" / "sim.png")
    assert out == tmp_path / "sub" / "sim.png"
    assert_png(out)
    with torch.no_grad():
        list(cp_layers(model))[1][1].C[:, :3] = 0
    report = sparsity.prune(model)
    assert_png(analysis.plot_layer_ranks(report, tmp_path / "ranks.png"))
    assert_png(analysis.plot_layer_ranks(model, tmp_path / "ranks_model.png"))
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["ranks.png", "ranks_model.png", "sim.png", "sub"], \
        "no temporary files may be left behind"


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def saved_adapters(tmp_path, tasks=None):
    model = random_model(num_tasks=3, scale=0.5)
    model.cpkernels_config.task_names = ["cola", "sst2", "mrpc"]
    first = next(iter(cp_layers(model)))[1]
    with torch.no_grad():
        first.C[:, 0] = 0  # one dead component: live rank 4 of 5
    save_adapters(model, tmp_path / "adapters", tasks=tasks)
    return model, tmp_path / "adapters"


def test_cli_on_saved_adapters(tmp_path):
    model, adapter_dir = saved_adapters(tmp_path)
    out = tmp_path / "figures"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "cpkernels.analyze", str(adapter_dir), "--out", str(out)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    for expected in ("cola", "sst2", "mrpc", "Task similarity", "per task"):
        assert expected in text
    report = json.loads((out / "report.json").read_text())
    torch.testing.assert_close(torch.tensor(report["task_similarity"], dtype=torch.float64),
                               analysis.task_similarity(model), rtol=1e-12, atol=1e-12)
    layers = report["compression"]["layers"]
    first = next(iter(layers))
    assert layers[first]["rank_before"] == 5 and layers[first]["rank_after"] == 4
    comp = report["compression"]["after"]
    assert comp["base_parameters"] == read_adapters(adapter_dir)[0]["base_parameters"]
    assert comp["per_task"] == 4 + 5 + 5
    assert comp["percent_per_task"] == pytest.approx(100 * 14 / comp["base_parameters"])
    assert f"{comp['percent_per_task']:.4g}%" in text
    assert_png(out / "task_similarity.png")
    assert_png(out / "layer_ranks.png")


def test_analyze_a_subset_of_saved_tasks(tmp_path):
    model, adapter_dir = saved_adapters(tmp_path, tasks=[2, 0])
    report = analyze.analyze(adapter_dir)
    assert report["task_names"] == ["mrpc", "cola"]
    full = analysis.task_similarity(model)
    torch.testing.assert_close(torch.tensor(report["task_similarity"], dtype=torch.float64),
                               full[[2, 0]][:, [2, 0]], rtol=1e-12, atol=1e-12)
    assert report["compression"]["before"]["num_tasks"] == 3  # amortised over all tasks of the model


@pytest.mark.parametrize("case", ["missing dir", "a file", "no adapter files"])
def test_cli_errors_are_clear(tmp_path, capsys, case):
    target = tmp_path / "nothing-here"
    if case == "a file":
        target.write_text("x")
    elif case == "no adapter files":
        target.mkdir()
    with pytest.raises(SystemExit) as exc:
        analyze.main([str(target), "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert str(target) in err
    assert {"missing dir": "does not exist", "a file": "not a directory",
            "no adapter files": "no adapter file"}[case] in err
    assert not (tmp_path / "out").exists()


def test_nan_propagates_into_similarity_and_norms():
    """A task whose C holds NaN used to get similarity 0 with every task (a clean-looking number)."""
    model = random_model(num_tasks=4)
    _, layer = list(cp_layers(model))[0]
    with torch.no_grad():
        layer.C[2, 1] = float("nan")
    sim = analysis.task_similarity(model)
    assert torch.isnan(sim[2]).all() and torch.isnan(sim[:, 2]).all()
    others = [0, 1, 3]
    assert not torch.isnan(sim[others][:, others]).any()
    assert torch.isnan(analysis.task_update_norms(model)[2])
    per_layer = analysis.task_similarity(model, per_layer=True)
    assert torch.isnan(per_layer[next(iter(per_layer))][2, 0])
    # A zero task still gets 0 (the documented convention), not NaN.
    with torch.no_grad():
        layer.C[2, 1] = 0.0
        for _, m in cp_layers(model):
            m.C[3].zero_()
    sim = analysis.task_similarity(model)
    assert not torch.isnan(sim).any() and (sim[3] == 0).all()
