"""ToMe and EViT token-reduction baselines on a tiny ViT (8x8 inputs, patch 2: 16 patches + CLS, 3 blocks)."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

from dynprune.backbones.vit import VisionTransformer
from dynprune.baselines import (
    EViT,
    ToMe,
    apply_evit,
    apply_tome,
    default_locations,
    flops_ratio,
    merge_tokens,
    pick_evit_keep_rate,
    pick_tome_schedule,
    tome_schedule,
)
from dynprune.flops import count_flops

SHAPE = (1, 8, 8)


def tiny_vit(attention: str = "explicit", seed: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    return VisionTransformer(num_classes=3, in_chans=1, input_size=8, patch_size=2, dim=12, depth=3, heads=3,
                             mlp_ratio=2.0, attention=attention).eval()


def images(n: int = 4) -> torch.Tensor:
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(1))


def assert_close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> None:
    assert (a - b).abs().max() <= rel * b.abs().max()


def final_tokens(model: nn.Module, x: torch.Tensor) -> int:
    """Length of the sequence that reaches the final norm."""
    seen = []
    handle = model.vit.norm.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape[1]))
    with torch.no_grad():
        model(x)
    handle.remove()
    return seen[0]


@pytest.mark.parametrize("attention", ["explicit", "torch"])
@pytest.mark.parametrize("build", [lambda m: apply_tome(m, 0), lambda m: apply_evit(m, 1.0)], ids=["tome", "evit"])
def test_no_reduction_equals_the_plain_model(attention: str, build) -> None:
    model, x = tiny_vit(attention), images()
    with torch.no_grad():
        assert_close(build(model)(x), model(x))
    assert count_flops(build(model), SHAPE)[0] == count_flops(model, SHAPE)[0]


@pytest.mark.parametrize("build, tokens", [(lambda m: apply_tome(m, 3), 17 - 3 * 3),
                                           (lambda m: apply_tome(m, [8, 0, 2]), 17 - 10),
                                           (lambda m: apply_evit(m, 0.5, [0, 2]), 1 + 5 + 1),  # 17 -> 10 -> 7
                                           (lambda m: apply_evit(m, 0.5, [1], fuse=False), 1 + 8)],
                         ids=["tome", "tome-schedule", "evit", "evit-nofuse"])
def test_reduction_shortens_the_sequence_and_flops_match_closed_form(build, tokens: int) -> None:
    model = tiny_vit()
    reduced = build(model)
    assert final_tokens(reduced, images()) == tokens == reduced.token_counts()[-1][1]
    flops = count_flops(reduced, SHAPE)[0]
    assert flops == reduced.expected_flops()
    assert count_flops(model, SHAPE)[0] == apply_tome(model, 0).expected_flops() > flops


def test_tome_merges_the_most_similar_pair_by_size_weighted_mean_and_never_cls() -> None:
    x, metric = torch.randn(1, 9, 5), torch.randn(1, 9, 4)
    metric[0, 0] = metric[0, 3]  # CLS is the best match of all, yet must not merge
    metric[0, 4] = metric[0, 7] * 2  # cosine 1: token 4 (in A) merges into token 7 (in B)
    size = torch.tensor([[1.0, 1, 1, 1, 3, 1, 1, 2, 1]])
    merged, new_size = merge_tokens(x, size, metric, 1)
    assert merged.shape == (1, 8, 5)
    assert torch.equal(merged[0, 0], x[0, 0]) and new_size[0, 0] == 1
    # unmerged A tokens 0, 2, 6, 8 in order, then B tokens 1, 3, 5, 7 with 7 holding 4
    assert torch.equal(new_size, torch.tensor([[1.0, 1, 1, 1, 1, 1, 1, 5]]))
    assert_close(merged[0, 7], (3 * x[0, 4] + 2 * x[0, 7]) / 5)
    assert_close(merged[0, :4], x[0, [0, 2, 6, 8]])
    assert_close((merged * new_size[..., None]).sum(1), (x * size[..., None]).sum(1))


def test_tome_is_per_input() -> None:
    model, x = apply_tome(tiny_vit(), 4), images()
    with torch.no_grad():
        assert_close(model(x), torch.cat([model(x[i:i + 1]) for i in range(len(x))]))


def test_evit_keeps_top_cls_attention_and_fuses_the_rest() -> None:
    model = apply_evit(tiny_vit(), 0.5, [0])
    x, size = torch.randn(2, 5, 3), torch.ones(2, 5)
    cls_attn = torch.tensor([[0.4, 0.1, 0.3, 0.05, 0.15], [0.2, 0.5, 0.1, 0.15, 0.05]])
    spread = torch.tensor([0.02, -0.04, 0.04, 0.01, 0.0])  # heads disagree; their mean decides
    weights = torch.rand(2, 2, 5, 5)
    weights[:, 0, 0], weights[:, 1, 0] = cls_attn + spread, cls_attn - spread
    out, new_size = model.reduce(0, x, size, torch.empty(0), weights)
    assert torch.equal(out[:, 0], x[:, 0])
    assert torch.equal(out[0, 1:3], x[0, [2, 4]]) and torch.equal(out[1, 1:3], x[1, [1, 3]])
    assert_close(out[0, 3], (0.1 * x[0, 1] + 0.05 * x[0, 3]) / 0.15)
    assert torch.equal(new_size, torch.tensor([[1.0, 1, 1, 2], [1, 1, 1, 2]]))
    assert torch.equal(model.reduce(1, x, size, torch.empty(0), weights)[0], x)  # not a chosen block


def test_evit_fine_tunes_the_shared_weights() -> None:
    model = tiny_vit()
    evit = apply_evit(model.train(), 0.5)
    evit(images()).sum().backward()
    assert model.blocks[0].mlp.fc1.weight.grad.abs().sum() > 0
    assert model.head.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("target", [1.25, 1.5])
def test_pickers_land_on_the_target_ratio(target: float) -> None:
    model = tiny_vit()
    schedule, ratio = pick_tome_schedule(model, target, tol=0.1)
    assert abs(ratio / target - 1) <= 0.1
    assert ratio == pytest.approx(flops_ratio(model, apply_tome(model, schedule), SHAPE), rel=1e-12)
    rate, ratio = pick_evit_keep_rate(model, target, tol=0.1)
    assert abs(ratio / target - 1) <= 0.1
    assert ratio == pytest.approx(flops_ratio(model, apply_evit(model, rate), SHAPE), rel=1e-12)


def test_tome_schedule_caps_at_what_each_block_can_merge() -> None:
    assert tome_schedule(17, 3, 3) == [3, 3, 3]
    assert tome_schedule(17, 3, 100) == [8, 4, 2]
    assert default_locations(12) == (3, 6, 9) and default_locations(6) == (1, 3, 4)


@pytest.mark.parametrize("build, match", [
    (lambda m: ToMe(m, 9), r"r=9 .* at most 8"),
    (lambda m: ToMe(m, [8, 5, 0]), r"block 1, which holds 9 tokens: at most 4"),
    (lambda m: ToMe(m, -1), r"r\[0\] must be"),
    (lambda m: ToMe(m, [1, 1]), r"r has 2 entries; the model has 3 blocks"),
    (lambda m: EViT(m, 0.0), r"keep_rate must be in \(0, 1\]"),
    (lambda m: EViT(m, 1.5), r"keep_rate must be in \(0, 1\]"),
    (lambda m: EViT(m, 0.5, [3]), r"locations must be in \[0, 2\]"),
    (lambda m: EViT(m, 0.5, [2, 1]), r"locations must be distinct"),
    (lambda m: pick_tome_schedule(m, 40.0), r"target=40 is not reachable"),
    (lambda m: pick_evit_keep_rate(m, 0.5), r"target must be > 1"),
])
def test_bad_arguments_raise(build, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build(tiny_vit())


def test_only_dynprune_vits_are_wrapped() -> None:
    with pytest.raises(TypeError, match="VisionTransformer, got Linear"):
        apply_tome(nn.Linear(2, 2), 1)


@pytest.mark.slow
def test_bench_vit_writes_every_arm_at_matched_flops(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("bench_vit", Path(__file__).parent.parent / "experiments"
                                                  / "bench_vit.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--train-subset", "300", "--val-size", "60", "--test-subset", "100", "--epochs", "1",
                "--ratios", "2", "--rounds", "1", "--out", str(tmp_path)])
    with open(tmp_path / "bench_vit.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["arm"] for r in rows] == ["dense", "ToMe (off the shelf)", "EViT (off the shelf)", "EViT (fine-tuned)",
                                        "thinner ViT (scratch)", "shallower ViT (scratch)", "token gating (learned)"]
    for r in rows[1:-1]:
        assert abs(2 / float(r["flops_ratio"]) - 1) <= 0.03, r
        assert float(r["speedup_b64/flops_ratio"]) == pytest.approx(float(r["speedup_b64"]) / float(r["flops_ratio"]))
        assert 0 <= float(r["test_acc"]) <= 100
    assert rows[0]["device"] and "Command: `python experiments/bench_vit.py" in (tmp_path / "bench_vit.md").read_text()
