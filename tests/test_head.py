"""The head granularity (dynprune.granularity.head) and its runtime (dynprune.runtime.heads): per-input decisions
over attention heads; a head that is off is the head removed from the output projection; FLOPs follow the kept
heads; the compiled model runs only the kept heads (FlopCounterMode counts the reported FLOPs)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_close_rounding, weight_depth
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

import dynprune as dp
from dynprune.backbones import create, create_language_model
from dynprune.backbones.vit import KVCache
from dynprune.granularity.base import report_sections
from dynprune.runtime import compile_for_inference
from dynprune.runtime.heads import HeadAttention

TINY = {"width_mult": 0.25, "depth_mult": 0.34}  # dim 24 = 3 heads of 8, depth 3, 50 tokens


def vit(attention: str = "explicit") -> nn.Module:
    torch.manual_seed(0)
    return create("vit", num_classes=10, in_chans=1, input_size=28, attention=attention, **TINY).eval()


def head_vit() -> nn.Module:
    model = dp.gate_model(vit(), gate="sigmoid", granularity="head")
    with torch.no_grad():
        for gate in dp.gates_of(model).values():
            gate.fc2.bias.normal_(0, 1.0)  # decisions differ between inputs
    return model


def force(models: list[nn.Module], decisions: Tensor | None) -> None:
    for model in models:
        for gate in (model.site_gates if hasattr(model, "site_gates") else dp.gates_of(model)).values():
            gate.force(decisions)


def test_sites_are_attention_modules_and_multihead_attention_is_refused_with_the_reason() -> None:
    model = head_vit()
    assert list(model.dynprune.sites) == [f"blocks.{i}.attn" for i in range(3)]
    assert {s.units for s in model.dynprune.sites.values()} == {3}
    with pytest.raises(ValueError, match=r"cannot gate 'blocks.0.attn' at granularity 'head'.*nn.MultiheadAttention "
                                         r"packs q/k/v.*from_multihead"):
        dp.gate_model(vit("torch"), gate="sigmoid", granularity="head", where=["blocks.0.attn"])
    with pytest.raises(ValueError, match="nothing to gate at granularity 'head'"):
        dp.gate_model(vit("torch"), gate="sigmoid", granularity="head")


def test_forced_open_is_the_ungated_model_and_a_closed_head_is_that_head_removed() -> None:
    dense, x = vit(), torch.randn(3, 1, 28, 28)
    model = dp.gate_model(copy.deepcopy(dense), gate="sigmoid", granularity="head")
    force([model], torch.ones(3))
    assert_close_rounding(model(x), dense(x), depth=weight_depth(dense))
    force([model], torch.tensor([1.0, 0.0, 1.0]))
    with torch.no_grad():
        for block in dense.blocks:
            block.attn.proj.weight[:, 8:16] = 0  # head 1's columns of the output projection
    assert_close_rounding(model(x), dense(x), depth=weight_depth(dense))


def test_flops_follow_the_kept_heads() -> None:
    model = head_vit()
    profile = dp.gating_info(model).flops
    dense_flops = dp.count_flops(vit(), (1, 28, 28))[1]
    per_block = sum(dense_flops[f"blocks.0.attn.{r}"] for r in ("q", "k", "v", "proj"))
    core = dense_flops["blocks.0.attn"] - per_block  # QK^T and AV
    assert core == 2 * 2 * 50 * 50 * 24
    decisions = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    effective = profile.effective(dict.fromkeys(model.dynprune.sites, decisions))
    saved = 3 * (per_block + core) * torch.tensor([0.0, 1 / 3, 1.0], dtype=effective.dtype)
    torch.testing.assert_close(effective, profile.dense_total - saved, rtol=1e-9, atol=0)


def test_compiled_runs_only_the_kept_heads_and_flop_counter_counts_the_reported_flops() -> None:
    model = head_vit()
    compiled = compile_for_inference(model)
    assert isinstance(compiled.net.blocks[0].attn, HeadAttention)
    info = dp.gating_info(model)
    depth = weight_depth(model)
    for batch in (1, 4):
        x = torch.randn(batch, 1, 28, 28)
        assert_close_rounding(compiled(x), model(x), depth=depth)
        mixed = (torch.rand(batch, 3, generator=torch.Generator().manual_seed(batch)) < 0.5).float()
        mixed[0] = 1.0
        if batch > 1:
            mixed[-1] = 0.0
        force([model, compiled], mixed)
        assert_close_rounding(compiled(x), model(x), depth=depth)
        force([model, compiled], None)
    x = torch.randn(1, 1, 28, 28)
    for decisions in (None, torch.tensor([[1.0, 0.0, 1.0]]), torch.tensor([[0.0, 0.0, 1.0]]), torch.zeros(1, 3)):
        force([model, compiled], decisions)
        assert_close_rounding(compiled(x), model(x), depth=depth)
        expected = info.flops.effective(dp.collect_masks(model)).item() + info.flops.gate_flops
        with FlopCounterMode(display=False) as counter:
            compiled(x)
        assert counter.get_total_flops() == pytest.approx(expected, rel=1e-9)
    assert expected < 0.8 * info.flops.dense_total  # every head off: no attention at all


def test_causal_attention_is_refused_and_a_compiled_head_site_refuses_a_kv_cache() -> None:
    """A per-input head decision pools every token: on the causal GPT each position would see later ones."""
    ids = torch.randint(0, 11, (1, 16))
    gpt = create_language_model("char_gpt", 11, 16, dim=32, depth=2, heads=4).eval()
    with pytest.raises(ValueError, match="cannot gate 'blocks.0.attn' at granularity 'head': its attention is causal"):
        dp.gate_model(gpt, gate="sigmoid", granularity="head", where=["blocks.0.attn"], example=ids)
    compiled = compile_for_inference(head_vit())
    attn = compiled.net.blocks[0].attn
    cache = KVCache.empty(1, 3, 50, 8, torch.zeros(1))
    with pytest.raises(ValueError, match="decoding with a KV cache is not supported"):
        attn(torch.randn(1, 50, 24), None, cache)


def test_the_report_section_counts_inputs_by_kept_heads() -> None:
    model = head_vit()
    decisions = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    sections = report_sections(model.dynprune.sites, dict.fromkeys(model.dynprune.sites, decisions))
    assert sections["Attention heads"]["blocks.0.attn"] == {"0 heads": 0.0, "1 heads": 0.5, "2 heads": 0.25,
                                                            "3 heads": 0.25}
