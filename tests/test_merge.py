"""Merge safety. Before: a model merged on task 1 silently returned task 1's output under
task_context(model, 2), and a merged model's state_dict loaded into an unmerged model applied ΔW
twice (max error 0.65)."""
import pytest
import torch
from torch import nn

from cpkernels import convert, cp_layers, merge, task_context, unmerge


def _model(seed=0):
    torch.manual_seed(seed)
    model = convert(nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 5)), rank=3, num_tasks=4)
    with torch.no_grad():
        for _, layer in cp_layers(model):
            layer.C.normal_()
    return model


def test_merged_model_refuses_other_tasks():
    model = _model()
    x = torch.randn(3, 12)
    with torch.no_grad(), task_context(model, 1):
        task1 = model(x)
    with torch.no_grad(), task_context(model, 2):
        task2 = model(x)
    merge(model, 1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), task1, rtol=1e-5, atol=1e-5)  # no ids needed
        with task_context(model, 1):  # its own task is fine, as an int or a tensor
            torch.testing.assert_close(model(x), task1, rtol=1e-5, atol=1e-5)
    for ids in (2, torch.tensor([1, 2, 1]), torch.tensor([1, -1, 1])):
        with pytest.raises(ValueError, match="holds merged task 1.*cannot run task (2|-1).*unmerge"):
            with task_context(model, ids):
                model(x)
        with pytest.raises(ValueError, match="holds merged task 1.*cannot run task"):
            model[0](x, task_ids=ids)  # a layer called directly
    with torch.no_grad():
        torch.testing.assert_close(model(x, task_ids=torch.tensor([1, 1, 1])), task1, rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="holds merged task 1.*cannot run task 2"):
            model(x, task_ids=torch.tensor([1, 2, 1]))  # the model's task_ids= keyword
    unmerge(model)
    with torch.no_grad(), task_context(model, 2):
        torch.testing.assert_close(model(x), task2)


def test_merged_state_dict_is_marked_and_refused_by_an_unmerged_model():
    source, target = _model(0), _model(1)
    x = torch.randn(3, 12)
    assert not any(k.endswith("merged_task") for k in source.state_dict())
    with torch.no_grad(), task_context(source, 1):
        expected = source(x)
    merge(source, 1)
    state = source.state_dict()
    assert int(state["0.merged_task"]) == 1 and int(state["2.merged_task"]) == 1
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match=r"task 1 merged into its weights.*'0\.merged_task'.*twice"):
        target.load_state_dict(state)
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())  # nothing half-loaded
    # The documented ways out: unmerge before saving, or load into a model merged the same way.
    unmerge(source)
    target.load_state_dict(source.state_dict())
    with torch.no_grad(), task_context(target, 1):
        torch.testing.assert_close(target(x), expected)


def test_loading_into_a_merged_model_is_refused():
    model = _model()
    state = _model(1).state_dict()
    merge(model, 0)
    with pytest.raises(ValueError, match=r"holds merged task 0; call cpkernels.unmerge\(model\) before load_state_dict"):
        model.load_state_dict(state)
