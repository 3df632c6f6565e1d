"""Official-checkpoint loading, checked without the official code: our weights written under the
official key names and layouts (``vilscale_to_official``) must load back to the same model, and the
adaptations (table orientation, resolution, window, full -> ViL attention, heads) behave as documented."""

from __future__ import annotations

import argparse

import pytest
import torch

from vilscale.model import cli as convert_cli
from vilscale.model import create_model, load_official, read_official, vilscale_to_official


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    yield


def _randomised(model):
    torch.manual_seed(1)
    with torch.no_grad():  # LayerNorms, biases and tables start constant; make every weight matter
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return model.eval()


@pytest.mark.parametrize("pos_embed,window_mode", [("ape", "chunk"), ("rpe", "chunk"), ("rpe", "exact")])
def test_round_trip_through_the_official_container_gives_the_same_model(tmp_path, pos_embed, window_mode):
    model = _randomised(create_model("vil_nano", pos_embed=pos_embed, window_mode=window_mode, num_classes=10))
    official = {"module." + key: value for key, value in vilscale_to_official(model).items()}
    path = tmp_path / "model_best.pth"
    torch.save({"net": official, "epoch": 300, "best_acc": 0.5}, path)
    loaded = load_official(path, "vil_nano", pos_embed=pos_embed, window_mode=window_mode, num_classes=10).eval()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0, msg=key)
    image = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(image), model(image), rtol=0, atol=0)


def test_official_layout_has_the_released_key_names_and_shapes():
    model = create_model("vil_tiny", pos_embed="rpe", img_size=224)
    official = vilscale_to_official(model)
    # ViL stage: query + kv, and shared-weight copies under *_global, as in the released checkpoints.
    for name in ("query", "kv", "proj", "query_global", "kv_global", "proj_global"):
        assert f"layer1.1.attn.{name}.weight" in official
    assert official["layer1.1.attn.kv.weight"].shape == (96, 48)
    torch.testing.assert_close(official["layer2.1.attn.query_global.weight"], official["layer2.1.attn.query.weight"])
    # full-attention stage: one qkv
    assert official["layer3.1.attn.qkv.weight"].shape == (3 * 192, 192)
    assert official["layer1.1.attn.local_relative_position_bias_table"].shape == (27 * 27, 1)
    assert official["layer3.1.attn.local_relative_position_bias_table"].shape == (27 * 27, 3)  # (2*14-1)^2
    assert official["layer1.1.attn.g2l_relative_position_bias"].shape == (2, 1, 1)
    assert official["layer1.0.norm_embed.weight"].shape == (48,)
    assert official["layer1.2.mlp.fc1.weight"].shape == (192, 48)
    ape = vilscale_to_official(create_model("vil_tiny", img_size=224))
    assert ape["layer1.0.x_pos_embed"].shape == (1, 56, 24) and ape["layer1.0.cls_pos_embed"].shape == (1, 1, 48)


def test_local_table_orientation_follows_the_official_index():
    # Official: entry for (query, key) at ((qy-ky) + 2w-1) * (4w-1) + (qx-kx) + 2w-1, stored (entries, heads).
    window, heads = 2, 2
    model = create_model("vil_nano", pos_embed="rpe")
    official = vilscale_to_official(model)
    key = "layer1.1.attn.local_relative_position_bias_table"
    side = 4 * window - 1
    official[key] = torch.arange(side * side * heads, dtype=torch.float32).reshape(side * side, heads)
    ours = load_official(official, "vil_nano", pos_embed="rpe").stages[0].blocks[0].attn.rel_bias_local
    for dy in range(-(2 * window - 1), 2 * window):
        for dx in range(-(2 * window - 1), 2 * window):  # dy, dx = key - query
            our_index = (dy + 2 * window - 1) * side + dx + 2 * window - 1
            official_index = (-dy + 2 * window - 1) * side + (-dx) + 2 * window - 1
            for head in range(heads):
                assert ours[head, our_index] == official[key][official_index, head]


def test_g2l_and_l2g_come_from_the_two_rows_of_the_official_tensor():
    official = vilscale_to_official(create_model("vil_nano", pos_embed="rpe"))
    key = "layer2.1.attn.g2l_relative_position_bias"
    official[key] = torch.tensor([[[1.0], [2.0]], [[3.0], [4.0]]])  # (2, heads, G)
    attn = load_official(official, "vil_nano", pos_embed="rpe").stages[1].blocks[0].attn
    assert attn.rel_bias_g2l.flatten().tolist() == [1.0, 2.0]
    assert attn.rel_bias_l2g.flatten().tolist() == [3.0, 4.0]


def test_containers_and_prefixes_are_unwrapped():
    state = vilscale_to_official(create_model("vil_nano"))
    for wrapped in (state, {"net": state}, {"model": {"module." + k: v for k, v in state.items()}},
                    {"state_dict": {"module.module." + k: v for k, v in state.items()}}):
        assert set(read_official(wrapped)) == set(state)


def test_separate_global_weights_are_refused():
    official = vilscale_to_official(create_model("vil_nano"))
    official["layer1.1.attn.query_global.weight"] = official["layer1.1.attn.query_global.weight"] + 1
    with pytest.raises(ValueError, match="SHARE_W"):
        load_official(official, "vil_nano")


def test_a_checkpoint_of_another_variant_is_refused_with_a_hint():
    official = vilscale_to_official(create_model("vil_tiny", img_size=64))
    with pytest.raises(ValueError, match="model name"):
        load_official(official, "vil_nano")


def test_resolution_change_interpolates_the_position_embeddings():
    source = _randomised(create_model("vil_nano", num_classes=10))
    official = vilscale_to_official(source)
    ramp = torch.linspace(-1, 1, 8)[None, :, None].expand(1, 8, 16).clone()
    official["layer1.0.x_pos_embed"] = ramp
    model = load_official(official, "vil_nano", img_size=64, num_classes=10)
    rows = model.stages[0].pos_embed.row_embed.detach()
    assert rows.shape == (1, 16, 16)
    assert torch.all(rows[0, 1:, 0] >= rows[0, :-1, 0])  # still a ramp, at twice the resolution
    assert rows[0, 0, 0].item() == pytest.approx(-1.0) and rows[0, -1, 0].item() == pytest.approx(1.0)
    assert torch.isfinite(model(torch.randn(1, 3, 64, 64))).all()


def test_window_change_resizes_the_relative_tables():
    official = vilscale_to_official(create_model("vil_nano", pos_embed="rpe", window=2))
    official["layer1.1.attn.local_relative_position_bias_table"] = torch.full((49, 2), 0.25)
    model = load_official(official, "vil_nano", pos_embed="rpe", window=4)
    table = model.stages[0].blocks[0].attn.rel_bias_local
    assert table.shape == (2, 15 * 15)
    torch.testing.assert_close(table, torch.full_like(table, 0.25))


def test_full_attention_stage_loads_into_a_vil_stage_for_the_backbone():
    source = _randomised(create_model("vil_nano", pos_embed="rpe", num_classes=10))
    official = vilscale_to_official(source)
    backbone = load_official(official, "vil_nano", pos_embed="rpe", backbone=True, window=(2, 2, 2))
    attn = backbone.stages[2].blocks[0].attn
    assert type(attn).__name__ == "ViLAttention"
    torch.testing.assert_close(attn.qkv.weight, official["layer3.1.attn.qkv.weight"])
    assert attn.rel_bias_local.shape == (4, 7 * 7)  # (2*2-1)^2 full table -> (4w-1)^2
    maps = backbone(torch.randn(1, 3, 32, 48))
    assert [tuple(m.shape[-2:]) for m in maps] == [(8, 12), (4, 6), (2, 3)]


def test_large_heads_are_truncated_or_remapped():
    source = create_model("vil_nano", num_classes=20)
    official = vilscale_to_official(source)
    truncated = load_official(official, "vil_nano", num_classes=10)
    torch.testing.assert_close(truncated.head.weight, official["head.weight"][:10])
    class_map = [19, 0, 7]
    remapped = load_official(official, "vil_nano", num_classes=3, class_map=class_map)
    torch.testing.assert_close(remapped.head.bias, official["head.bias"][class_map])
    with pytest.raises(ValueError, match="fewer than num_classes"):
        load_official(official, "vil_nano", num_classes=30)
    no_head = load_official(official, "vil_nano", num_classes=0)
    assert no_head(torch.randn(1, 3, 32, 32)).shape == (1, 128)


def test_convert_command_writes_loadable_safetensors(tmp_path, capsys):
    from safetensors.torch import load_file

    source = _randomised(create_model("vil_nano", pos_embed="rpe", num_classes=10))
    checkpoint = tmp_path / "official.pth"
    torch.save({"net": vilscale_to_official(source)}, checkpoint)
    parser = argparse.ArgumentParser()
    convert_cli.add_parser(parser)
    output = tmp_path / "vil_nano.safetensors"
    args = parser.parse_args([str(checkpoint), str(output), "--model", "vil_nano", "--pos-embed", "rpe",
                              "--num-classes", "10"])
    assert convert_cli.run(args) == 0
    assert "vil_nano" in capsys.readouterr().out
    model = create_model("vil_nano", pos_embed="rpe", num_classes=10).eval()
    model.load_state_dict(load_file(output))
    image = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(image), source(image))
    bad = parser.parse_args([str(checkpoint), str(tmp_path / "x.safetensors"), "--model", "vil_nano"])
    assert convert_cli.run(bad) == 2  # ape model, rpe checkpoint
    assert "vilscale convert" in capsys.readouterr().err
