"""Fitting vilscale weights to a model of another resolution, window or class count (what a fine-tune
from an export or a run does), and the errors when they cannot fit."""

from __future__ import annotations

import pytest
import torch

from vilscale.model import adapt_state_dict, create_model


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    yield


def test_a_new_resolution_window_and_class_count_are_fitted_and_reported():
    torch.manual_seed(0)
    source = create_model("vil_nano", pos_embed="rpe", img_size=32, window=2, num_classes=10)
    target = create_model("vil_nano", pos_embed="rpe", img_size=64, window=4, num_classes=5)
    fresh_head = target.head.weight.detach().clone()
    state, report = adapt_state_dict(source.state_dict(), target, head="replace")
    target.load_state_dict(state)
    assert target.stages[0].blocks[0].attn.rel_bias_local.shape == (2, 15 * 15)
    # a full-attention stage's table follows the larger map: (2*2-1)^2 -> (2*4-1)^2 entries
    assert target.stages[2].blocks[0].attn.rel_bias_local.shape == (4, 7 * 7)
    assert torch.equal(target.head.weight, fresh_head), "a 10-class head cannot serve 5 classes: it is replaced"
    assert torch.equal(target.stages[1].blocks[0].mlp.fc1.weight, source.stages[1].blocks[0].mlp.fc1.weight)
    summary = report.summary()
    assert "head replaced (10 -> 5 classes" in summary and "position table(s) interpolated" in summary, summary
    assert torch.isfinite(target(torch.randn(1, 3, 64, 64))).all()


def test_absolute_position_tables_follow_the_map():
    source = create_model("vil_nano", img_size=32, num_classes=10)
    target = create_model("vil_nano", img_size=48, num_classes=10)
    state, report = adapt_state_dict(source.state_dict(), target)
    assert state["stages.0.pos_embed.row_embed"].shape == (1, 12, 16)
    assert state["stages.1.pos_embed.col_embed"].shape == (1, 6, 32)
    assert len(report.interpolated) == 6 and report.head == "kept"  # rows and columns of 3 stages


def test_the_same_shape_loads_unchanged():
    source = create_model("vil_nano", num_classes=10)
    target = create_model("vil_nano", num_classes=10)
    state, report = adapt_state_dict(source.state_dict(), target)
    assert all(torch.equal(state[k], v) for k, v in source.state_dict().items())
    assert report.interpolated == [] and report.head == "kept"


@pytest.mark.parametrize(("source_kwargs", "message"), [
    ({"pos_embed": "rpe"}, "no place"),  # rpe tables into an ape model
    ({"dims": (32, 64, 96)}, "needs"),  # another width: nothing to interpolate
])
def test_weights_of_another_model_are_refused_with_a_hint(source_kwargs, message):
    source = create_model("vil_nano", num_classes=10, **source_kwargs)
    target = create_model("vil_nano", num_classes=10)
    with pytest.raises(ValueError, match=message) as error:
        adapt_state_dict(source.state_dict(), target)
    assert "model name" in str(error.value)
