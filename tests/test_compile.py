"""ViL under torch.compile (#38 item 3): the attention is one custom op, ``torch.ops.vilscale.vil_attention``, so Dynamo
traces whole ViL blocks without graph breaks, and a compiled step computes what the eager one does."""

import json
import math

import pytest
import torch

import vilscale.kernels.op  # noqa: F401  (registers torch.ops.vilscale.*)
from vilscale.model import create_model


def nano(shift_mode: str = "random", pos_embed: str = "rpe"):
    torch.manual_seed(0)
    return create_model("vil_nano", num_classes=10, pos_embed=pos_embed, shift_mode=shift_mode,
                        attn_backend="chunked", drop_path_rate=0.0)


@pytest.mark.budget(30)
def test_the_custom_op_passes_torchs_operator_checks():
    """Schema, fake implementation (shapes without running), autograd registration and AOT dispatch, as
    torch.library.opcheck tests them, with every bias table and with none, all 9 chunks and one neighbour."""
    torch.manual_seed(0)
    heads, map_h, map_w, num_global, window, dim = 2, 4, 4, 1, 2, 8
    tokens = num_global + map_h * map_w
    q, k, v = (torch.randn(1, heads, tokens, dim, requires_grad=True) for _ in range(3))
    tables = (torch.randn(heads, (4 * window - 1) ** 2, requires_grad=True),
              torch.randn(heads, num_global, requires_grad=True), torch.randn(heads, num_global, requires_grad=True),
              torch.randn(heads, num_global, num_global, requires_grad=True))
    for present, neighbour in ((tables, -1), ((None,) * 4, 3)):
        args = (q, k, v, *present, torch.tensor(neighbour), map_h, map_w, num_global, window, "chunk", "chunked")
        results = torch.library.opcheck(torch.ops.vilscale.vil_attention.default, args)
        assert results and all(outcome == "SUCCESS" for outcome in results.values()), results


def test_the_neighbour_drawn_in_the_graph_is_the_one_eager_draws():
    """random_neighbour (a tensor, for compiled graphs) maps the official mode as neighbour_of_official_mode does,
    from the same draw of torch's generator: seeded alike, both give the same neighbour, and all 8 appear."""
    from vilscale.kernels.op import random_neighbour
    from vilscale.kernels.reference import neighbour_of_official_mode

    seen = set()
    for seed in range(64):
        torch.manual_seed(seed)
        eager = neighbour_of_official_mode(int(torch.randint(1, 9, ())))
        torch.manual_seed(seed)
        drawn = random_neighbour()
        assert drawn.dtype == torch.int64 and drawn.dim() == 0 and int(drawn) == eager, seed
        seen.add(eager)
    assert seen == {0, 1, 2, 3, 5, 6, 7, 8}


@pytest.mark.budget(60)
def test_dynamo_traces_a_vil_forward_without_graph_breaks():
    """Before the op, vil_nano's training forward broke the graph 47 times (the backends' checks, caches and
    launches); through the op it is one graph, in random-shift mode (the neighbour drawn in the graph) as in full."""
    for shift_mode in ("random", "full"):
        model = nano(shift_mode).train()
        torch._dynamo.reset()
        explained = torch._dynamo.explain(model)(torch.randn(2, 3, 32, 32))
        assert explained.graph_break_count == 0, (shift_mode, explained.break_reasons)
        assert explained.graph_count == 1
        assert "vilscale.vil_attention" in str(explained.graphs[0].code) or any(
            "vilscale.vil_attention" in str(node.target) for graph in explained.graphs for node in graph.graph.nodes)


@pytest.mark.budget(90)
@pytest.mark.parametrize("pos_embed", ["rpe", "ape"])
def test_a_compiled_training_step_computes_what_the_eager_one_does(pos_embed):
    """Loss and every parameter's gradient of a compiled forward and backward (random shifts: the compiled graph draws
    the neighbours from torch's generator as eager does, so both see the same chunks) equal the eager step's. The
    backward goes through the op's own backward (it recomputes the attention and differentiates it)."""
    x, y = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 3, 5, 9])
    results = []
    for compiled in (False, True):
        model = nano("random", pos_embed).train()
        step = torch.compile(model, backend="aot_eager", fullgraph=True) if compiled else model
        torch._dynamo.reset()
        torch.manual_seed(7)  # the shift draws
        loss = torch.nn.functional.cross_entropy(step(x), y)
        loss.backward()
        results.append((loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()
                                        if p.grad is not None}))
    (eager_loss, eager_grads), (compiled_loss, compiled_grads) = results
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=0, atol=1e-6)
    assert eager_grads.keys() == compiled_grads.keys()
    assert any(name.endswith("rel_bias_local") for name in eager_grads) == (pos_embed == "rpe")
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    # the shifts were drawn, not fixed: another seed gives another loss
    model = nano("random", pos_embed).train()
    torch.manual_seed(8)
    assert not torch.equal(torch.nn.functional.cross_entropy(model(x), y).detach(), eager_loss)


@pytest.mark.extended
@pytest.mark.slow
def test_a_compiled_training_run_resumes_bit_exactly(smoke, tmp_path):
    """train.compile=true (Inductor) on the smoke job, one rank, random shifts drawn in the graph: stopped after step
    3 and resumed to 8, it reads the uninterrupted compiled run's samples and ends with its weights, bit for bit, as
    an eager run does (tests/test_trainer.py)."""
    compiled = ("--set", "train.compile=true", "--set", "train.record_samples=true", "--set",
                "model.shift_mode=random", "--set", "train.log_every=1")
    whole, split = tmp_path / "whole", tmp_path / "split"
    smoke.train(whole, *compiled, nproc=1)
    smoke.train(split, *compiled, "--set", "train.exit_after_steps=3", nproc=1)
    result = smoke.train(split, *compiled, nproc=1)
    assert "resumed from step_00000003" in result.stderr
    assert smoke.samples(split) == smoke.samples(whole)
    a, b = (smoke.export(run, tmp_path / f"{run.name}.safetensors") for run in (whole, split))
    different = [key for key in a if not torch.equal(a[key], b[key])]
    assert a.keys() == b.keys() and not different, different[:5]
    losses = [json.loads(line)["loss"] for line in (whole / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) >= 8 and all(math.isfinite(loss) for loss in losses)
