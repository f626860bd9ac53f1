import json

import pytest
import torch

from dynprune.dependence import count_unique_rows, format_dependence, input_dependence, plot_class_flops


def _site(stats, name):
    return next(s for s in stats["sites"] if s["site"] == name)


def test_static_mask_is_reported_static():
    masks = {"conv": torch.tensor([[1.0, 1.0, 0.0, 0.0]]).repeat(8, 1)}
    stats = input_dependence(masks, torch.full((8,), 50.0), None, dense=100.0)
    site = _site(stats, "conv")
    assert (site["dynamic_units"], site["unique_masks"], site["units"]) == (0, 1, 4)
    assert site["keep"] == pytest.approx(0.5) and site["exec_rate"] == 1.0
    assert stats["flops_p10_ratio"] == stats["flops_p90_ratio"] == pytest.approx(0.5)
    assert stats["flops_p90_p10"] == pytest.approx(1.0) and stats["dynamic_frac"] == 0.0
    assert stats["classes"] == [] and stats["class_spread"] is None
    assert "static pruning" in format_dependence(stats)


def test_dynamic_units_unique_masks_and_block_decisions():
    conv = torch.zeros(10, 4)
    conv[:5, 0] = 1  # on for 50% of inputs: dynamic
    conv[:, 1] = 1  # always on: static
    conv[0, 2] = 1  # on for 10%: dynamic at the default 5%-95%
    block = torch.zeros(10, 1)
    block[:3] = 1
    masks = {"conv": conv, "block": block}
    stats = input_dependence(masks, torch.linspace(10, 100, 10), None, dense=100.0)
    site = _site(stats, "conv")
    assert site["dynamic_units"] == 2 and site["dynamic_frac"] == pytest.approx(0.5)
    assert site["unique_masks"] == 3  # [1,1,1,0], [1,1,0,0] x4, [0,1,0,0] x5
    assert site["keep"] == pytest.approx(16 / 40) and site["exec_rate"] == 1.0
    blk = _site(stats, "block")
    assert (blk["keep"], blk["exec_rate"], blk["dynamic_units"], blk["unique_masks"]) == (
        pytest.approx(0.3), pytest.approx(0.3), 1, 2)
    assert stats["dynamic_frac"] == pytest.approx(3 / 5)
    strict = input_dependence(masks, torch.linspace(10, 100, 10), None, dense=100.0, low=0.2, high=0.8)
    assert _site(strict, "conv")["dynamic_units"] == 1
    assert "static pruning" not in format_dependence(stats)


def test_class_dependent_flops():
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    flops = torch.tensor([20.0, 40.0, 60.0, 60.0, 80.0, 100.0])
    masks = {"conv": torch.ones(6, 2)}
    stats = input_dependence(masks, flops, labels, dense=100.0, num_classes=4)
    means = [c["flops_ratio"] for c in stats["classes"]]
    assert means[:3] == pytest.approx([0.3, 0.6, 0.9]) and means[3] is None
    assert [c["inputs"] for c in stats["classes"]] == [2, 2, 2, 0]
    assert stats["class_spread"] == pytest.approx(3.0) and stats["flops_mean_ratio"] == pytest.approx(0.6)
    # linear-interpolated quantiles of [0.2, 0.4, 0.6, 0.6, 0.8, 1.0]
    assert (stats["flops_p10_ratio"], stats["flops_p50_ratio"], stats["flops_p90_ratio"]) == (
        pytest.approx(0.3), pytest.approx(0.6), pytest.approx(0.9))
    assert stats["flops_p90_p10"] == pytest.approx(3.0)
    json.dumps(stats)
    text = format_dependence(stats)
    assert "0.300 / 0.600 / 0.900" in text and "p90/p10 3.00" in text and "2: 0.900" in text and "3: -" in text


def test_unique_rows_across_packed_words():
    gen = torch.Generator().manual_seed(0)
    protos = torch.rand(6, 70, generator=gen) < 0.5
    protos[1] = protos[0]
    protos[1, 69] = ~protos[0, 69]  # differs only in the second 64-bit word
    protos[2] = protos[0]
    protos[2, 63] = ~protos[0, 63]  # differs only in the top bit of the first word
    rows = protos[torch.randint(0, 6, (500,), generator=gen)]
    expected = len({tuple(r.tolist()) for r in rows})
    assert expected == 6 and count_unique_rows(rows) == expected
    assert count_unique_rows(torch.zeros(4, 1, dtype=torch.bool)) == 1
    top = torch.zeros(4, 64, dtype=torch.bool)
    top[1:, 63] = True  # the sign bit of the one packed word
    top[3, 0] = True
    assert count_unique_rows(top) == 3


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match=r"site 'conv' has shape \(3,\)"):
        input_dependence({"conv": torch.ones(3)}, torch.ones(3), None, dense=1.0)
    with pytest.raises(ValueError, match="low=0.9, high=0.1"):
        input_dependence({}, torch.ones(3), None, dense=1.0, low=0.9, high=0.1)
    with pytest.raises(ValueError, match=r"labels span \[0, 5\]"):
        input_dependence({}, torch.ones(3), torch.tensor([0, 1, 5]), dense=1.0, num_classes=3)


def test_plot_class_flops(tmp_path):
    stats = input_dependence({}, torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 1, 2]), dense=4.0)
    out = plot_class_flops(stats, tmp_path / "flops_class.png", class_names=["a", "b", "c"])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["flops_class.png"]
    with pytest.raises(ValueError, match="no per-class"):
        plot_class_flops(input_dependence({}, torch.ones(3), None, dense=1.0), tmp_path / "x.png")
