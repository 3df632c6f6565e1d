"""ViL models over the registry: forward, backward and no NaN at capped sizes; shapes at any
resolution; backbone mode; parameter and FLOP counts against the official figures; bad input."""

from __future__ import annotations

import pytest
import torch

from vilscale.model import VARIANTS, count_flops, create_model, list_models
from vilscale.model.attention import FullAttention, ViLAttention
from vilscale.model.bench import OFFICIAL

PAPER_VARIANTS = [name for name in list_models() if name != "vil_nano"]
HEAVY = {"vil_base_deep", "vil_base_wide", "vil_medium_wide", "vil_medium_deep"}


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    yield


def _small_size(name: str) -> int:
    return 32 if name == "vil_nano" else 64  # the smallest size at which window 7 fits the ViL stages


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n for n in list_models()])
def test_every_variant_trains_one_step_without_nan(name):
    torch.manual_seed(0)
    size = _small_size(name)
    # no drop path: with one image it may drop a whole branch, whose weights then rightly get zero gradients
    model = create_model(name, img_size=size, num_classes=7, pos_embed="rpe" if name == "vil_small" else "ape",
                         drop_path_rate=0.0)
    image = torch.randn(1, 3, size, size)
    logits = model(image)
    assert logits.shape == (1, 7) and torch.isfinite(logits).all()
    torch.nn.functional.cross_entropy(logits, torch.tensor([3])).backward()
    last_blocks = {f"stages.{s}.blocks.{len(stage.blocks) - 1}." for s, stage in enumerate(model.stages)}
    for param_name, parameter in model.named_parameters():
        assert parameter.grad is not None, f"{param_name} got no gradient"
        assert torch.isfinite(parameter.grad).all(), f"{param_name} has a non-finite gradient"
        # the global queries' biases of a stage's last block shape only the global tokens' outputs, which the
        # stage drops: their gradient is zero by construction; every other parameter must learn
        structural_zero = param_name.endswith(("rel_bias_g2l", "rel_bias_g2g")) and \
            any(param_name.startswith(prefix) for prefix in last_blocks)
        assert structural_zero or parameter.grad.abs().sum() > 0, f"{param_name} got an all-zero gradient"


@pytest.mark.parametrize("name", PAPER_VARIANTS)
def test_parameter_counts_match_the_paper(name):
    with torch.device("meta"):
        model = create_model(name)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    assert params == pytest.approx(VARIANTS[name].params_m, rel=0.002)  # the README's 0.2%


@pytest.mark.parametrize("name,img_size", sorted(OFFICIAL))
def test_flops_match_the_official_figures(name, img_size):
    with torch.device("meta"):
        model = create_model(name, img_size=img_size)
    assert count_flops(model) / 1e9 == pytest.approx(OFFICIAL[(name, img_size)][1], rel=0.015)


def test_flops_count_windowed_attention_the_papers_way():
    # Local queries x 9 w^2 neighbourhood keys + local x global + global x all, for q.k and for p.v.
    from torch.utils.flop_counter import FlopCounterMode

    from vilscale.kernels.chunked import vil_attention_chunked

    height = width = 56
    window, num_global, dim = 7, 1, 48
    tokens = num_global + height * width
    q = torch.zeros(1, 1, tokens, dim, device="meta")
    with FlopCounterMode(display=False) as counter:
        vil_attention_chunked(q, q, q, map_hw=(height, width), num_global=num_global, window=window)
    local = height * width
    macs = local * 9 * window**2 * dim + local * num_global * dim + num_global * tokens * dim
    assert counter.get_total_flops() // 2 == 2 * macs
    assert 2 * macs < tokens * tokens * dim  # far below dense attention


def test_vil_nano_is_small_and_fits_32px_digits():
    model = create_model("vil_nano", num_classes=10)
    params = sum(p.numel() for p in model.parameters())
    assert 100_000 <= params <= 500_000
    assert model.config.img_size == (32, 32)
    for window in (2, 4):
        out = create_model("vil_nano", num_classes=10, window=window)(torch.randn(2, 3, 32, 32))
        assert out.shape == (2, 10)


def test_s1_stages_use_vil_attention_and_s0_full_attention():
    model = create_model("vil_tiny", img_size=64)
    kinds = [type(stage.blocks[0].attn) for stage in model.stages]
    assert kinds == [ViLAttention, ViLAttention, FullAttention, FullAttention]
    backbone = create_model("vil_tiny", img_size=224, backbone=True)
    assert all(isinstance(stage.blocks[0].attn, ViLAttention) for stage in backbone.stages)


def test_drop_path_follows_the_official_linear_schedule():
    model = create_model("vil_tiny", img_size=64, drop_path_rate=0.3)
    rates = [block.drop_path.rate for stage in model.stages for block in stage.blocks]
    assert len(rates) == 12
    assert rates == pytest.approx(torch.linspace(0, 0.3, 12).tolist())


def test_layernorm_eps_and_mlp_ratio():
    model = create_model("vil_nano")
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all(m.eps == 1e-6 for m in norms)
    block = model.stages[0].blocks[0]
    assert block.mlp.fc1.out_features == 4 * block.mlp.fc1.in_features


@pytest.mark.parametrize("pos_embed", ["ape", "rpe"])
@pytest.mark.parametrize("window_mode", ["chunk", "exact"])
def test_any_resolution_forward_and_intermediates(pos_embed, window_mode):
    model = create_model("vil_nano", pos_embed=pos_embed, window_mode=window_mode, num_classes=5).eval()
    with torch.no_grad():
        for height, width in [(32, 32), (45, 37), (70, 24)]:
            image = torch.randn(1, 3, height, width)
            maps = model.forward_intermediates(image)
            expected, h, w = [], height, width
            for stage, dim in zip(model.config.stages, model.feature_dims):
                h, w = h // stage.patch_size, w // stage.patch_size
                expected.append((1, dim, h, w))
            assert [tuple(m.shape) for m in maps] == expected
            logits = model(image)
            assert logits.shape == (1, 5) and torch.isfinite(logits).all()
            torch.testing.assert_close(model.forward_head(model.forward_features(image)), logits)


def test_ape_is_interpolated_to_a_new_grid():
    model = create_model("vil_nano", num_classes=5).eval()
    embed = model.stages[0].pos_embed
    tokens = torch.zeros(1, 1 + 16 * 12, 32)
    out = embed(tokens, (16, 12))
    local = out[0, 1:].reshape(16, 12, 32)
    rows, cols = local[..., :16], local[..., 16:]
    assert torch.equal(rows[:, 0], rows[:, 7]) and torch.equal(cols[0], cols[9])  # each half depends on one axis
    # Linear interpolation with align_corners=False, against the same computed in float64. torch computes the
    # source coordinate in float32 (up to 8 here: a few ulps off), and that error is scaled by the difference
    # of two neighbours (at most twice the table's largest value): 8 eps x max|table| bounds it. A wrong
    # convention (align_corners=True, nearest) is off by about 1e-2, 10^5 times more.
    for got, table in ((rows[:, 0], embed.row_embed[0]), (cols[0], embed.col_embed[0])):
        expected = _linear_resize_float64(table.detach(), got.shape[0])
        atol = 8 * torch.finfo(torch.float32).eps * table.abs().max().item()
        torch.testing.assert_close(got.double(), expected, rtol=0, atol=atol)
        assert torch.equal(got[0], table[0]) and torch.equal(got[-1], table[-1])  # the ends are clamped, not blended


def _linear_resize_float64(table: torch.Tensor, length: int) -> torch.Tensor:
    """(n, c) -> (length, c): output i samples the table at (i + 0.5) * n / length - 0.5, clamped to the ends."""
    n = table.shape[0]
    source = ((torch.arange(length, dtype=torch.float64) + 0.5) * n / length - 0.5).clamp(0, n - 1)
    low = source.floor().long()
    high = (low + 1).clamp(max=n - 1)
    weight = (source - low)[:, None]
    return (1 - weight) * table.double()[low] + weight * table.double()[high]


def test_backbone_at_a_non_square_size_returns_four_maps_and_no_head():
    model = create_model("vil_tiny", backbone=True, img_size=224).eval()
    assert isinstance(model.head, torch.nn.Identity)
    with torch.no_grad():
        maps = model(torch.randn(1, 3, 96, 160))
    assert [tuple(m.shape) for m in maps] == [(1, 48, 24, 40), (1, 96, 12, 20), (1, 192, 6, 10), (1, 384, 3, 5)]
    assert all(torch.isfinite(m).all() for m in maps)


def test_attention_backends_agree_inside_the_model():
    torch.manual_seed(0)
    model = create_model("vil_nano", pos_embed="rpe", num_classes=4).eval()
    image = torch.randn(2, 3, 40, 36)
    with torch.no_grad():
        model.set_attn_backend("reference")
        reference = model(image)
        model.set_attn_backend("chunked")
        chunked = model(image)
    torch.testing.assert_close(chunked, reference, rtol=1e-4, atol=1e-5)


def test_no_weight_decay_lists_the_official_exclusions():
    model = create_model("vil_nano", pos_embed="rpe")
    names = dict(model.named_parameters())
    skip = model.no_weight_decay()
    assert skip <= set(names)
    assert "stages.0.global_tokens" in skip and "head.bias" in skip and "norm.weight" in skip
    assert "stages.0.patch_embed.norm.weight" in skip and "stages.1.blocks.0.norm1.bias" in skip
    assert "stages.0.blocks.0.attn.rel_bias_local" in skip and "stages.0.blocks.0.attn.rel_bias_g2g" in skip
    assert "head.weight" not in skip and "stages.0.blocks.0.attn.qkv.weight" not in skip
    assert "stages.0.blocks.0.attn.qkv.bias" not in skip  # the official recipe decays these biases
    ape = create_model("vil_nano").no_weight_decay()
    assert {"stages.0.pos_embed.row_embed", "stages.0.pos_embed.col_embed", "stages.0.pos_embed.global_embed"} <= ape


def test_unknown_model_lists_the_valid_names():
    with pytest.raises(ValueError, match="vil_small") as error:
        create_model("vil_huge")
    assert "vil_huge" in str(error.value)


def test_window_larger_than_the_map_is_refused_naming_the_window():
    with pytest.raises(ValueError, match="window=9"):
        create_model("vil_nano", window=9)


def test_heads_not_dividing_the_width_are_refused_naming_the_heads():
    with pytest.raises(ValueError, match="heads=5"):
        create_model("vil_nano", heads=(5, 2, 4))


def test_image_smaller_than_the_patch_is_refused():
    with pytest.raises(ValueError, match="img_size"):
        create_model("vil_nano", img_size=3)
    model = create_model("vil_nano")
    with pytest.raises(ValueError, match="3x3 pixels"):
        model(torch.randn(1, 3, 3, 3))


def test_unknown_override_and_bad_options_are_refused():
    with pytest.raises(ValueError, match="frobnicate"):
        create_model("vil_nano", frobnicate=1)
    with pytest.raises(ValueError, match="pos_embed"):
        create_model("vil_nano", pos_embed="sinusoidal")
    with pytest.raises(ValueError, match="window_mode"):
        create_model("vil_nano", window_mode="shifted")
    with pytest.raises(ValueError, match="one value per stage"):
        create_model("vil_nano", depths=(1, 1))


def test_global_token_overrides_many_and_none():
    for num_global in [(0, 0, 0), (3, 2, 1)]:
        model = create_model("vil_nano", num_global=num_global, pos_embed="rpe", num_classes=3)
        out = model(torch.randn(1, 3, 32, 32))
        out.sum().backward()
        assert torch.isfinite(out).all()


class _NeighbourSpy:
    """Records the ``neighbour`` each ViL attention call passes to the kernels."""

    def __init__(self, monkeypatch):
        import vilscale.model.attention as attention

        self.calls: list[int | None] = []
        real = attention.vil_attention

        def spy(*args, **kwargs):
            self.calls.append(kwargs["neighbour"])
            return real(*args, **kwargs)

        monkeypatch.setattr(attention, "vil_attention", spy)

    def take(self) -> list[int | None]:
        calls, self.calls = self.calls, []
        return calls


def test_random_shift_draws_one_neighbour_per_layer_and_call_from_torch_rng(monkeypatch):
    import random

    from vilscale.kernels.reference import neighbour_of_official_mode

    spy = _NeighbourSpy(monkeypatch)
    model = create_model("vil_nano", pos_embed="rpe", shift_mode="random", drop_path_rate=0.0, num_classes=3)
    assert model.shift_mode == "random" and model.config.shift_mode == "random"
    image = torch.randn(2, 3, 32, 32)
    outputs = []
    for python_seed in (1, 2):  # the draws come from torch's generator, not Python's
        random.seed(python_seed)
        torch.manual_seed(0)
        outputs.append(model.train()(image))
        drawn = spy.take()
        torch.manual_seed(0)
        expected = [neighbour_of_official_mode(int(torch.randint(1, 9, ()))) for _ in drawn]
        assert drawn == expected and len(drawn) == 2  # one draw per ViL attention layer (2 in vil_nano)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)
    seen = set()
    for _ in range(60):
        model(image)
        seen.update(spy.take())
    assert seen == {0, 1, 2, 3, 5, 6, 7, 8}  # every neighbour, never "own only", never all nine
    with torch.no_grad():
        model.eval()(image)
    assert spy.take() == [None, None]  # evaluation runs full attention


def test_random_shift_training_output_is_the_reference_with_the_drawn_neighbour(monkeypatch):
    spy = _NeighbourSpy(monkeypatch)
    torch.manual_seed(0)
    model = create_model("vil_nano", pos_embed="rpe", shift_mode="random", drop_path_rate=0.0, num_classes=3)
    image = torch.randn(2, 3, 40, 36)
    results = {}
    for backend in ("reference", "chunked"):
        model.set_attn_backend(backend)
        torch.manual_seed(5)
        logits = model.train()(image)
        logits.square().sum().backward()
        results[backend] = (logits, {n: p.grad.clone() for n, p in model.named_parameters()}, spy.take())
        model.zero_grad()
    (ref_logits, ref_grads, ref_drawn), (logits, grads, drawn) = results["reference"], results["chunked"]
    assert drawn == ref_drawn and all(n is not None and n != 4 for n in drawn)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-3, atol=1e-5, msg=name)
    full = create_model("vil_nano", pos_embed="rpe", drop_path_rate=0.0, num_classes=3).train()
    full.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert not torch.allclose(full(image), logits)  # one neighbour is not all nine
        torch.testing.assert_close(full.eval()(image), model.eval()(image), rtol=0, atol=0)


def test_own_chunk_mode_holds_in_training_and_evaluation_and_set_shift_mode_switches(monkeypatch):
    spy = _NeighbourSpy(monkeypatch)
    model = create_model("vil_nano", shift_mode="own", num_classes=3)
    image = torch.randn(1, 3, 32, 32)
    model.train()(image)
    with torch.no_grad():
        model.eval()(image)
    assert spy.take() == [4, 4, 4, 4]  # as the official mode -1: own chunk in evaluation too
    model.set_shift_mode("random")
    model.train()(image)
    assert all(n not in (None, 4) for n in spy.take())
    model.set_shift_mode("full")  # the official switch to full attention late in training
    assert model.shift_mode == "full" and model.config.shift_mode == "full"
    model.train()(image)
    assert spy.take() == [None, None]
    with pytest.raises(ValueError, match="shift_mode='sometimes'"):
        model.set_shift_mode("sometimes")


def test_shift_modes_need_chunk_windows():
    with pytest.raises(ValueError, match="shift_mode='random' needs window_mode='chunk'"):
        create_model("vil_nano", window_mode="exact", shift_mode="random")
    model = create_model("vil_nano", window_mode="exact")
    with pytest.raises(ValueError, match="window_mode='exact' has no chunks"):
        model.set_shift_mode("own")
    assert model.shift_mode == "full"


def test_random_shift_under_activation_checkpointing_replays_the_same_neighbour():
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    model = create_model("vil_nano", pos_embed="rpe", shift_mode="random", drop_path_rate=0.2, num_classes=3)
    block = model.stages[0].blocks[0]
    tokens = torch.randn(2, 1 + 64, 32)
    grads = []
    for checkpointed in (False, True):
        x = tokens.clone().requires_grad_()
        torch.manual_seed(3)
        out = checkpoint(block, x, (8, 8), use_reentrant=False) if checkpointed else block(x, (8, 8))
        out.square().sum().backward()
        grads.append((out.detach(), x.grad, block.attn.qkv.weight.grad.clone()))
        block.zero_grad()
    for plain, recomputed in zip(*grads):
        torch.testing.assert_close(recomputed, plain, rtol=0, atol=0)


def test_flops_in_training_count_the_shift_mode():
    with torch.device("meta"):
        model = create_model("vil_small", shift_mode="random", pos_embed="rpe")
    full = count_flops(model)
    assert count_flops(model, training=True) < full
    # Per ViL layer: every padded local query loses 7 w^2 keys in q.k and in p.v.
    saved = 0
    for stage, (height, width) in zip(model.config.stages, model.config.stage_maps()):
        if stage.vil_attention:
            padded = -(-height // stage.window) * stage.window * -(-width // stage.window) * stage.window
            saved += stage.depth * 2 * padded * 7 * stage.window ** 2 * stage.dim
    assert full - count_flops(model, training=True) == saved
    model.set_shift_mode("own")
    assert full - count_flops(model) == saved * 8 // 7  # w^2 keys instead of 9 w^2, in evaluation too


@pytest.mark.parametrize("num_global", [0, 2])
def test_full_attention_matches_its_definition_forward_and_gradients(num_global):
    torch.manual_seed(0)
    attn = FullAttention(24, 3, num_global=num_global, map_hw=(4, 5), rpe=True)
    with torch.no_grad():
        for parameter in attn.parameters():
            parameter.normal_(0, 0.5)
    x = torch.randn(2, num_global + 6 * 3, 24)  # a 6x3 map: offsets beyond the 4x5 table are clamped
    grad = torch.randn(x.shape)

    def definition(x):
        qkv = attn.qkv(x).reshape(2, x.shape[1], 3, 3, 8).permute(2, 0, 3, 1, 4)
        scores = qkv[0] @ qkv[1].transpose(-1, -2) * 8 ** -0.5 + attn.relative_bias((6, 3))
        return attn.proj((scores.softmax(-1) @ qkv[2]).transpose(1, 2).reshape(x.shape))

    results = []
    for fn in (definition, lambda x: attn(x, (6, 3))):
        inputs = x.clone().requires_grad_()
        out = fn(inputs)
        out.backward(grad)
        results.append([out, inputs.grad] + [p.grad.clone() for p in attn.parameters()])
        attn.zero_grad()
    names = ["out", "x"] + [name for name, _ in attn.named_parameters()]
    for name, want, have in zip(names, *results):
        torch.testing.assert_close(have, want, rtol=1e-5, atol=1e-5 * want.abs().max().item(), msg=name)
