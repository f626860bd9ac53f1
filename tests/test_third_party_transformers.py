"""transformers' GPT2LMHeadModel (Conv1D layers, fused q/k/v) and DeiTForImageClassification through gate_model at
the neuron and head granularities: forced open is the ungated model, forced decisions are the model with those
units or heads zeroed, the reported FLOPs are what FlopCounterMode counts on a reduced or compiled run, and
compile_for_inference gives the masked outputs; what cannot be gated is refused with its reason."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

import dynprune as dp
from dynprune.granularity.neuron import calibrate_thresholds

transformers = pytest.importorskip("transformers")


def close(actual: Tensor, expected: Tensor, rtol: float = 1e-5) -> None:
    """Equal up to ``rtol`` relative to the largest expected magnitude (any machine, any thread count)."""
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * float(expected.detach().abs().max()))


class Logits(nn.Module):
    """A transformers model as a plain tensor -> logits module (what compile_for_inference runs)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x).logits


def gpt2() -> Logits:
    config = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=64, n_layer=2, n_head=4,
                                     bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    return Logits(transformers.GPT2LMHeadModel(config)).eval()


def deit() -> Logits:
    config = transformers.DeiTConfig(image_size=28, patch_size=4, num_channels=1, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64, num_labels=10)
    torch.manual_seed(0)
    return Logits(transformers.DeiTForImageClassification(config)).eval()


def compile_with(model: nn.Module, masks: dict[str, Tensor]) -> nn.Module:
    """compile_for_inference(model) (its probe runs the gates' own decisions), then both force ``masks``."""
    for g in dp.gates_of(model).values():
        g.force(None)
    compiled = dp.runtime.compile_for_inference(model)
    for name, g in [*dp.gates_of(model).items(), *compiled.site_gates.items()]:
        g.force(masks[name])
    return compiled


def zeroed(model: nn.Module, masks: dict[str, Tensor], pre: bool) -> nn.Module:
    """A copy of the ungated ``model`` whose layers {name: mask (N, [T,] C)} multiply their output (or, ``pre``,
    their input) by the mask: units or heads zeroed by hand."""
    plain = copy.deepcopy(model)
    for name, mask in masks.items():
        layer = plain.get_submodule(name)
        if pre:
            layer.register_forward_pre_hook(lambda _m, args, mask=mask: (args[0] * mask.unsqueeze(-2),))
        else:
            layer.register_forward_hook(lambda _m, _args, out, mask=mask: out * mask)
    return plain


def test_gpt2_conv1d_mlps_take_per_token_neuron_gates_equal_to_zeroed_units_and_compile() -> None:
    model, ids = gpt2(), torch.randint(0, 50, (2, 16))
    reference = model(ids)
    plain = copy.deepcopy(model)
    dp.gate_model(model, gate="sigmoid", granularity="neuron", example=ids[:1])
    assert list(model.dynprune.sites) == [f"model.transformer.h.{i}.mlp.c_fc" for i in (0, 1)]
    gates = dp.gates_of(model)
    for g in gates.values():
        g.force(torch.ones(256))
    close(model(ids), reference)
    gen = torch.Generator().manual_seed(0)
    masks = {n: (torch.rand(2, 16, 256, generator=gen) < 0.4).float() for n in gates}
    for name, g in gates.items():
        g.force(masks[name])
    masked = model(ids)
    close(masked, zeroed(plain, masks, pre=False)(ids))
    assert (masked - reference).abs().max() > 1e-3 * reference.abs().max()
    compiled = compile_with(model, masks)
    close(compiled(ids), masked)


def test_gpt2_neuron_flops_are_what_flop_counter_mode_counts_on_a_thinned_mlp_and_the_compiled_model() -> None:
    model, ids = gpt2(), torch.randint(0, 50, (1, 16))
    dp.gate_model(model, gate="sigmoid", granularity="neuron", example=ids)
    gen = torch.Generator().manual_seed(1)
    masks = {n: (torch.rand(1, 256, generator=gen) < 0.3).float() for n in model.dynprune.sites}
    per_layer = model.dynprune.flops.per_layer(masks)
    h = torch.randn(1, 16, 64)
    for site, mask in masks.items():
        c_fc, c_proj = model.get_submodule(site), model.get_submodule(site.replace("c_fc", "c_proj"))
        kept = mask[0].bool()
        with FlopCounterMode(display=False) as counter:  # Conv1D weights are (in, out): keep c_fc's columns
            hidden = torch.nn.functional.gelu(h @ c_fc.weight[:, kept] + c_fc.bias[kept], approximate="tanh")
            hidden @ c_proj.weight[kept] + c_proj.bias
        reported = float(per_layer[site] + per_layer[site.replace("c_fc", "c_proj")])
        assert reported == pytest.approx(counter.get_total_flops(), rel=1e-9)
        assert reported < 0.5 * 2 * (2 * 16 * 64 * 256)
    # the same units for every token: the compiled model runs exactly them (its union), plus the gates
    compiled, info = compile_with(model, masks), dp.gating_info(model)
    with FlopCounterMode(display=False) as counter:
        compiled(ids)
    expected = info.flops.effective(masks).item() + info.flops.gate_flops
    assert counter.get_total_flops() == pytest.approx(expected, rel=1e-9)


def test_gpt2_threshold_calibration_reads_the_conv1d_weight_transposed() -> None:
    """At full rank (gate width 2D) the calibrated gate is c_fc's own pre-activation minus the threshold."""
    model, ids = gpt2(), torch.randint(0, 50, (4, 16))
    dp.gate_model(model, gate="sigmoid", granularity="neuron", example=ids[:1], min_hidden=128)
    thresholds = calibrate_thresholds(model, [ids], sparsity=0.6)
    for name, tau in thresholds.items():
        c_fc, gate = model.get_submodule(name), dp.gates_of(model)[name]
        h = torch.randn(3, 64)
        with torch.no_grad():
            close(gate.logits(h) + tau, h @ c_fc.weight + c_fc.bias, rtol=1e-4)


def test_gpt2_refuses_head_gates_on_fused_qkv_and_token_gates_without_a_keep_mask() -> None:
    ids = torch.randint(0, 50, (1, 16))
    with pytest.raises(ValueError, match=r"'model.transformer.h.0.attn' at granularity 'head'.*one fused D -> 3D "
                                         r"layer 'model.transformer.h.0.attn.c_attn'.*causal"):
        dp.gate_model(gpt2(), gate="sigmoid", granularity="head", where=["model.transformer.h.0.attn"], example=ids)
    with pytest.raises(ValueError, match="'model.transformer.h.0' at granularity 'token': its forward takes no `keep`"):
        dp.gate_model(gpt2(), gate="sigmoid", granularity="token", where=["model.transformer.h.0"], example=ids)


def test_gpt2_channel_gates_mask_conv1d_layers_and_compile_refuses_them_by_name() -> None:
    model, ids = gpt2(), torch.randint(0, 50, (2, 16))
    reference = model(ids)
    dp.gate_model(model, gate="sigmoid", granularity="channel", example=ids[:1])
    assert "model.transformer.h.0.mlp.c_fc" in model.dynprune.sites
    assert "residual" in model.dynprune.skipped["model.transformer.h.0.mlp.c_proj"]
    for g in dp.gates_of(model).values():
        g.force(torch.ones(g.fc2.out_features))
    close(model(ids), reference)
    for g in dp.gates_of(model).values():
        g.force(None)
    with pytest.raises(ValueError, match=r"cannot thin the channels of 'model.transformer.h.0.mlp.c_fc'.*not Conv1D"):
        dp.runtime.compile_for_inference(model)


def test_deit_head_gates_equal_zeroed_heads_and_compile_to_the_counted_flops() -> None:
    model, x = deit(), torch.randn(2, 1, 28, 28)
    reference = model(x)
    plain = copy.deepcopy(model)
    dp.gate_model(model, gate="sigmoid", granularity="head", input_shape=(1, 28, 28))
    assert list(model.dynprune.sites) == [f"model.deit.layers.{i}.attention" for i in (0, 1)]
    for g in dp.gates_of(model).values():
        g.force(torch.ones(4))
    close(model(x), reference)
    heads = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    for g in dp.gates_of(model).values():
        g.force(heads)
    masked = model(x[:1])
    assert (masked - reference[:1]).abs().max() > 1e-3 * reference.abs().max()
    channels = heads.repeat_interleave(8, dim=-1)
    close(masked, zeroed(plain, {f"{s}.o_proj": channels for s in model.dynprune.sites}, pre=True)(x[:1]))
    compiled = compile_with(model, dict.fromkeys(model.dynprune.sites, heads))
    close(compiled(x[:1]), masked)
    info = dp.gating_info(model)
    with FlopCounterMode(display=False) as counter:
        compiled(x[:1])
    expected = info.flops.effective(dict.fromkeys(model.dynprune.sites, heads)).item() + info.flops.gate_flops
    assert counter.get_total_flops() == pytest.approx(expected, rel=1e-9)


def test_deit_neuron_gates_equal_zeroed_units_and_compile() -> None:
    model, x = deit(), torch.randn(2, 1, 28, 28)
    reference = model(x)
    plain = copy.deepcopy(model)
    dp.gate_model(model, gate="sigmoid", granularity="neuron", input_shape=(1, 28, 28))
    assert list(model.dynprune.sites) == [f"model.deit.layers.{i}.mlp.fc1" for i in (0, 1)]
    for g in dp.gates_of(model).values():
        g.force(torch.ones(64))
    close(model(x), reference)
    gen = torch.Generator().manual_seed(0)
    masks = {n: (torch.rand(2, 51, 64, generator=gen) < 0.5).float() for n in model.dynprune.sites}
    for name, g in dp.gates_of(model).items():
        g.force(masks[name])
    masked = model(x)
    assert (masked - reference).abs().max() > 1e-3 * reference.abs().max()
    close(masked, zeroed(plain, masks, pre=False)(x))
    compiled = compile_with(model, masks)
    close(compiled(x), masked)
