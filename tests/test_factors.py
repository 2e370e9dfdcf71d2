"""LayerFactors (the one shape check), as_factors (model, dict, directory) and adapter_counts (the one
parameter count), against hand counts and FusedCPLinear.delta_weight in float64."""
import pytest
import torch
from torch import nn

from cpkernels import CPConfig, LayerFactors, convert, parameter_report, save_adapters
from cpkernels.convert import cp_layers
from cpkernels.factors import adapter_counts, as_factors, converted_layers, model_factors


def random_factors(d_out=13, d_in=11, r=3, T=4, bias=False):
    g = torch.Generator().manual_seed(0)
    return LayerFactors("l", torch.randn(d_out, r, generator=g), torch.randn(d_in, r, generator=g),
                        torch.randn(T, r, generator=g), 0.5, torch.randn(d_out, generator=g) if bias else None)


@pytest.mark.parametrize("change, message", [
    (dict(A=torch.ones(3)), r"layer 'l': A must be a 2-D tensor, got \(3,\)"),
    (dict(B=[[1.0]]), "layer 'l': B must be a 2-D tensor, got list"),
    (dict(C=torch.ones(4, 2)), r"ranks differ: A \(13, 3\), B \(11, 3\), C \(4, 2\)"),
    (dict(bias=torch.ones(11)), r"bias must have shape \(d_out,\) = \(13,\).*got \(11,\)"),
    (dict(scale=float("nan")), "scale must be a finite real number"),
    (dict(scale="2"), "scale must be a finite real number"),
])
def test_shape_check_names_the_layer_and_shapes(change, message):
    f = random_factors()
    kw = dict(name=f.name, A=f.A, B=f.B, C=f.C, scale=f.scale, bias=f.bias)
    kw.update(change)
    with pytest.raises(ValueError, match=message):
        LayerFactors(**kw)


def test_shapes_counts_and_dict_interface():
    f = random_factors(bias=True)
    assert (f.out_features, f.in_features, f.rank, f.num_tasks) == (13, 11, 3, 4)
    assert f.parameter_count() == {"shared": 3 * (11 + 13) + 13, "per_task": 3, "total": 3 * (11 + 13) + 13 + 12}
    assert f["A"] is f.A and "bias" in f and f["scale"] == 0.5
    g = f.with_factors(f.A[:, :1], f.B[:, :1], f.C[:, :1])
    assert g.rank == 1 and g.bias is f.bias and f.rank == 3
    nobias = random_factors()
    assert "bias" not in nobias
    with pytest.raises(KeyError):
        nobias["bias"]
    with pytest.raises(IndexError, match=r"task 4 is outside \[0, num_tasks=4\)"):
        f.delta_weight(4)


def test_from_model_views_parameters_and_delta_weight_matches_the_layer(tmp_path):
    torch.manual_seed(0)
    model = convert(nn.Sequential(nn.Linear(9, 7), nn.Tanh(), nn.Linear(7, 5)).double(),
                    CPConfig(rank=3, num_tasks=2, scale=0.3))
    with torch.no_grad():
        for _, layer in cp_layers(model):
            layer.C.normal_()
    model[2].bias.requires_grad_(True)
    factors = model_factors(model)
    assert factors["0"].A is model[0].A and factors["0"].bias is None and factors["2"].bias is model[2].bias
    for name, layer in cp_layers(model):
        for t in range(2):
            assert torch.equal(factors[name].delta_weight(t), layer.delta_weight(t, torch.float64))
    # The same factors from a saved directory.
    save_adapters(model, tmp_path)
    loaded = as_factors(tmp_path)
    assert all(torch.equal(loaded[n].C, factors[n].C.detach()) and loaded[n].scale == 0.3 for n in factors)
    # One count: parameter_report's adapter numbers are adapter_counts'.
    counts, report = adapter_counts(factors), parameter_report(model)
    assert counts["shared_trainable"] == report["shared_trainable"] == 3 * (9 + 7) + 3 * (7 + 5) + 5
    assert counts["per_task"] == report["per_task"] == 6
    with pytest.raises(ValueError, match="no FusedCPLinear"):
        converted_layers(nn.Linear(2, 2))


def test_as_factors_checks_dicts():
    with pytest.raises(ValueError, match="missing factor"):
        as_factors({"l": {"A": torch.ones(2, 1)}})
    with pytest.raises(ValueError, match="C has 3 task rows, earlier layers have 2"):
        as_factors({"a": {"A": torch.ones(2, 1), "B": torch.ones(3, 1), "C": torch.ones(2, 1)},
                    "b": {"A": torch.ones(2, 1), "B": torch.ones(3, 1), "C": torch.ones(3, 1)}})
    with pytest.raises(TypeError, match="expected a converted nn.Module"):
        as_factors([1])
