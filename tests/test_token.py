"""Token granularity and its runtime: per-token keep decisions at ViT blocks (CLS always kept, multiplied through
depth), dropped tokens masked out of attention, FLOPs equal to FlopCounterMode's count of the physically
token-reduced model, the keep-ratio training term, and a compiled model that removes the dropped tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import assert_close_rounding, weight_depth
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

import dynprune as dp
from dynprune.backbones import create
from dynprune.backbones.vit import Block, attention_allowed
from dynprune.cli import cli_main
from dynprune.granularity import create_granularity
from dynprune.granularity.token import keep_ratio_for
from dynprune.runtime import compile_for_inference
from dynprune.runtime.dispatch import Bucket, Plan
from dynprune.runtime.tokens import TokenStages

ROOT = Path(__file__).parent.parent
TINY = {"width_mult": 0.25, "depth_mult": 0.67}  # dim 24 (3 heads of 8), depth 5, 49 + 1 tokens


def tiny_vit(attention: str = "explicit", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create("vit", num_classes=10, in_chans=1, input_size=28, attention=attention, **TINY).eval()


def token_vit(attention: str = "explicit", where: list[str] | None = None, gate: str = "sigmoid",
              **options: object) -> nn.Module:
    return dp.gate_model(tiny_vit(attention), gate, granularity={"token": options}, where=where)


def random_keeps(model: nn.Module, batch: int, seed: int, p: float = 0.6) -> dict[str, Tensor]:
    """Random per-token decisions (N, T, 1) for every token site, CLS included (the granularity keeps it anyway)."""
    gen = torch.Generator().manual_seed(seed)
    return {n: (torch.rand(batch, 50, 1, generator=gen) < p).float() for n in dp.gating_info(model).sites}


def force(models: list[nn.Module], decisions: dict[str, Tensor | None]) -> None:
    for model in models:
        gates = model.site_gates if hasattr(model, "site_gates") else dp.gates_of(model)
        for name, d in decisions.items():
            gates[name].force(d)


def reduced_forward(model: nn.Module, x: Tensor, keeps: list[Tensor]) -> Tensor:
    """The physically token-reduced ViT on one input (1, C, S, S): before each site's block, only the tokens its
    cumulative keep (T,) marks go on; the gates do not run (the ungated model's blocks on fewer tokens)."""
    sites = list(dp.gating_info(model).sites)
    with dp.gates_disabled(model):
        tokens, index = model.tokens(x), torch.arange(50)
        for i, block in enumerate(model.blocks):
            name = f"blocks.{i}"
            if name in sites:
                kept = keeps[sites.index(name)][index].bool()
                tokens, index = tokens[:, kept], index[kept]
            tokens = block(tokens)
        return model.head(model.norm(tokens)[:, 0])


def test_sites_default_to_dynamicvits_depths_and_refuse_what_cannot_drop_tokens() -> None:
    model = dp.gate_model(create("vit", num_classes=10, in_chans=1, input_size=28, width_mult=0.25), "sigmoid",
                          granularity="token")
    assert list(model.dynprune.sites) == ["blocks.1", "blocks.3", "blocks.4"]  # 1/4, 1/2, 3/4 of depth 6
    assert [s.target for s in model.dynprune.sites.values()] == pytest.approx([0.7, 0.49, 0.343], rel=1e-12)
    with pytest.raises(ValueError, match="cannot gate 'blocks.0.attn' at granularity 'token': it contains no residual"):
        token_vit(where=["blocks.0.attn"])
    with pytest.raises(ValueError, match="gate .policy. cannot decide at granularity .token."):
        token_vit(gate="policy")
    with pytest.raises(ValueError, match=r"keep_ratios \[0.5\] has 1 entries; 'blocks.2' is token site 2"):
        token_vit(where=["blocks.1", "blocks.2"], keep_ratios=[0.5])
    for option, value, message in [("keep_ratios", [0.5, 0.7], "non-increasing"), ("keep_ratio", 0.0, r"\(0, 1\]"),
                                   ("ratio_scope", "token", "choose one of: input, batch"),
                                   ("batch_runtime", "fast", "choose one of: pad, group, loop"),
                                   ("cls_tokens", -1, "cls_tokens must be an int >= 0")]:
        with pytest.raises(ValueError, match=message):
            create_granularity("token", **{option: value})


def test_hf_vit_layers_take_no_keep_mask_so_token_gates_refuse_them() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(image_size=28, patch_size=4, num_channels=1, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=64, num_labels=10)
    model = transformers.ViTForImageClassification(config).eval()
    with pytest.raises(ValueError, match=r"'vit\.layers\.0' at granularity 'token': its forward takes no .keep. mask"):
        dp.gate_model(model, "sigmoid", granularity="token", where=["vit.layers.0"], input_shape=(1, 28, 28))


def test_the_cls_token_is_kept_and_decisions_multiply_through_depth() -> None:
    model = token_vit(where=["blocks.1", "blocks.3"])
    forced = random_keeps(model, 3, seed=0)
    force([model], forced)
    model(torch.randn(3, 1, 28, 28))
    first, second = (m[..., 0] for m in dp.collect_masks(model).values())
    assert torch.equal(first[:, 0], torch.ones(3)) and torch.equal(second[:, 0], torch.ones(3))
    assert torch.equal(first[:, 1:], forced["blocks.1"][:, 1:, 0])
    assert torch.equal(second[:, 1:], forced["blocks.1"][:, 1:, 0] * forced["blocks.3"][:, 1:, 0])
    site = model.dynprune.sites["blocks.1"]
    assert site.chain.span("blocks.1") == ["blocks.1", "blocks.2"]
    assert site.chain.span("blocks.3") == ["blocks.3", "blocks.4"]
    assert site.effective(dp.collect_masks(model)["blocks.1"]).shape == (3, 50)  # the report's units are tokens


@pytest.mark.parametrize("attention", ["explicit", "torch"])
def test_masked_outputs_and_flops_are_those_of_the_token_reduced_model(attention: str) -> None:
    """Per input: the masked model's logits are the physically token-reduced model's, and the reported effective
    FLOPs (linear in kept tokens for q/k/v/proj/fc1/fc2, quadratic for attention) are FlopCounterMode's count of it."""
    model = token_vit(attention, where=["blocks.1", "blocks.3"])
    forced = random_keeps(model, 3, seed=1)
    force([model], forced)
    x = torch.randn(3, 1, 28, 28)
    out = model(x)
    masks = dp.collect_masks(model)
    flops = model.dynprune.flops.effective(masks)
    for i in range(3):
        keeps = [m[i, :, 0] for m in masks.values()]
        assert_close_rounding(out[i:i + 1], reduced_forward(model, x[i:i + 1], keeps), depth=weight_depth(model))
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            reduced_forward(model, x[i:i + 1], keeps)
        assert float(flops[i]) == pytest.approx(counter.get_total_flops(), rel=1e-9)
    assert len(set(flops.tolist())) == 3 and float(flops.max()) < 0.8 * model.dynprune.flops.dense_total


def test_dropped_tokens_are_masked_out_of_attention_in_training_not_zeroed() -> None:
    """A soft (l1) training pass: moving a token dropped at the first site changes nothing the CLS token sees, and
    the gates' parameters get gradients through the keep masks."""
    model = token_vit(where=["blocks.1"], gate="l1").train()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        model(x)
    keep = dp.collect_masks(model)["blocks.1"][..., 0]
    assert ((keep > 0) & (keep < 1)).any()  # soft decisions while training
    model(x).square().sum().backward()
    gate = dp.gates_of(model)["blocks.1"]
    assert gate.fc2.weight.grad is not None and gate.fc2.weight.grad.abs().sum() > 0
    model.eval()
    forced = torch.ones(1, 50, 1)
    forced[0, 7] = 0.0
    force([model], {"blocks.1": forced})
    moved = model.blocks[0].register_forward_hook(lambda m, i, o: o + 5.0 * (torch.arange(50) == 7)[None, :, None])
    shifted = model(x)
    moved.remove()
    assert_close_rounding(shifted, model(x), depth=weight_depth(model))


@pytest.mark.parametrize("attention", ["explicit", "torch"])
def test_a_bool_keep_mask_masks_the_same_keys_as_the_float_one(attention: str) -> None:
    """The runtime passes bool masks (masked before the softmax; or attention_allowed's (N, 1, T, T) of them, made
    once for several blocks); training passes floats (DynamicViT's policy)."""
    torch.manual_seed(0)
    block = Block(24, 3, 4.0, attention).eval()
    x = torch.randn(3, 9, 24)
    keep = torch.rand(3, 9) < 0.5
    keep[:, 0] = True
    assert_close_rounding(block(x, keep=keep), block(x, keep=keep.float()), depth=6)
    assert torch.equal(block(x, keep=attention_allowed(keep)), block(x, keep=keep))
    assert not torch.allclose(block(x, keep=keep), block(x))
    with pytest.raises(ValueError, match="keep mask has shape"):
        block(x, keep=attention_allowed(keep).float())


def test_the_ratio_loss_pulls_each_sites_kept_fraction_to_its_target() -> None:
    module = dp.GatedClassifier("vit", gate="sigmoid", lam=0.0, optimizer="adam", lr=1e-3,
                                granularity={"token": {"keep_ratios": [0.6, 0.3], "ratio_scope": "batch"}},
                                where=["blocks.1", "blocks.3"], **TINY)
    model = module.model
    forced = random_keeps(model, 4, seed=2)
    force([model], forced)
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    module.train()
    model(x)
    masks = dp.collect_masks(model)
    expected = 2.0 * ((masks["blocks.1"][:, 1:].mean() - 0.6) ** 2 + (masks["blocks.3"][:, 1:].mean() - 0.3) ** 2) / 2
    assert float(module.terms(x, y)["token_ratio"]) == pytest.approx(float(expected), rel=1e-6)
    force([model], dict.fromkeys(masks))
    model(x)
    module.terms(x, y)["token_ratio"].backward()
    assert all(g.fc2.bias.grad is not None and g.fc2.bias.grad.item() > 0 for g in dp.gates_of(model).values())


@pytest.mark.parametrize("runtime", ["pad", "group", "loop"])
@pytest.mark.parametrize("attention", ["explicit", "torch"])
def test_the_compiled_model_removes_dropped_tokens(attention: str, runtime: str) -> None:
    model = token_vit(attention, where=["blocks.1", "blocks.3"], batch_runtime=runtime)
    with torch.no_grad():
        for gate in dp.gates_of(model).values():
            gate.fc2.bias.normal_(0, 1.0, generator=torch.Generator().manual_seed(3))
    compiled = compile_for_inference(model)
    assert isinstance(compiled.net.blocks[1], TokenStages)
    assert [type(b) for b in compiled.net.blocks[2:]] == [nn.Identity] * 3  # run inside the stages
    x = torch.randn(20, 1, 28, 28)  # more than a group (GROUP = 16 inputs)
    assert_close_rounding(compiled(x), model(x), depth=weight_depth(model))
    forced = random_keeps(model, 20, seed=4)
    forced["blocks.1"][1] = 0.0  # one input keeps the CLS token alone, so counts differ
    force([model, compiled], forced)
    assert_close_rounding(compiled(x), model(x), depth=weight_depth(model))
    kept = dp.collect_masks(model)["blocks.3"][:, :, 0].sum(1)
    assert kept[1] == 1 and len(set(kept.tolist())) > 2


class MeanPoolViT(nn.Module):
    """The tiny ViT read out by the mean of its final tokens (every token reaches the logits)."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.vit = vit
        self.input_shape = vit.input_shape

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.vit.tokens(x)
        for block in self.vit.blocks:
            tokens = block(tokens)
        return self.vit.head(self.vit.norm(tokens).mean(dim=1))


def mixed_gates(model: nn.Module) -> None:
    """Gate biases spread so the gates' own decisions drop different tokens per input."""
    with torch.no_grad():
        for gate in dp.gates_of(model).values():
            gate.fc2.bias.normal_(0, 1.0, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("readout", ["cls", "mean"])
def test_both_compiled_paths_give_the_masked_models_output(readout: str) -> None:
    """Thin (tokens removed) and masked (full sequence, keep mask) paths, own and forced mixed decisions, batch 1
    and 6; a mean-pooling readout is detected at compile time and takes the masked path on both."""
    vit = tiny_vit()
    model = dp.gate_model(MeanPoolViT(vit) if readout == "mean" else vit, "sigmoid", granularity="token",
                          where=[f"{'vit.' if readout == 'mean' else ''}blocks.{i}" for i in (1, 3)])
    mixed_gates(model)
    compiled = compile_for_inference(model, dispatch=())
    stages = next(m for m in compiled.net.modules() if isinstance(m, TokenStages))
    assert stages.reads_all is (readout == "mean")
    x = torch.randn(6, 1, 28, 28)
    forced = random_keeps(model, 6, seed=5)
    forced[next(iter(forced))][1] = 0.0  # one input keeps the CLS token alone
    for path in ("thin", "masked"):
        compiled.pin(path)
        for n in (1, 6):
            for decisions in (dict.fromkeys(forced), {k: v[:n] for k, v in forced.items()}):
                force([model, compiled], decisions)
                assert_close_rounding(compiled(x[:n]), model(x[:n]), depth=weight_depth(model))
    assert stages.masked  # the last call took the masked path


def test_the_dispatch_plan_routes_each_batch_size_to_its_path() -> None:
    model = token_vit(where=["blocks.1", "blocks.3"])
    mixed_gates(model)
    compiled = compile_for_inference(model, dispatch=())
    stages = compiled.net.blocks[1]
    compiled.plan = Plan({1: Bucket(1, thin_ms=2.0, masked_ms=1.0), 8: Bucket(8, thin_ms=1.0, masked_ms=2.0)})
    x = torch.randn(8, 1, 28, 28)
    for batch, masked in ((1, True), (8, False), (2, True), (6, False)):
        assert_close_rounding(compiled(x[:batch]), model(x[:batch]), depth=weight_depth(model))
        assert stages.masked is masked


def test_flopcountermode_over_the_compiled_model_counts_the_kept_tokens_and_the_gates_on_them() -> None:
    """Batch 1, own decisions: the compiled count is the reported effective FLOPs plus the reported gate FLOPs,
    each gate's FLOPs per token times the tokens it reads (all of them at the first site, the ones kept so far at
    the next)."""
    model = token_vit(where=["blocks.1", "blocks.3"])
    with torch.no_grad():
        for i, gate in enumerate(dp.gates_of(model).values()):
            gate.fc2.bias.fill_(0.0)
            gate.fc2.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(i))
    compiled = compile_for_inference(model)
    x = torch.randn(1, 1, 28, 28)
    assert_close_rounding(compiled(x), model(x), depth=weight_depth(model))
    masks = dp.collect_masks(model)
    per_token = model.dynprune.flops.gate_flops / (2 * 50)
    read = 50 + masks["blocks.1"].sum()
    assert 1 < float(masks["blocks.3"].sum()) < float(masks["blocks.1"].sum()) < 50
    with FlopCounterMode(display=False) as counter:
        compiled(x)
    expected = model.dynprune.flops.effective(masks) + per_token * read
    assert counter.get_total_flops() == pytest.approx(float(expected), rel=1e-9)
    assert float(model.dynprune.flops.gates(masks)) == pytest.approx(float(per_token * read), rel=1e-9)


@pytest.mark.slow
def test_the_shipped_config_trains_end_to_end(tmp_path: Path) -> None:
    cli = cli_main(["fit", "--config", str(ROOT / "configs" / "fmnist_vit_token.yaml"), "--model.width_mult=0.25",
                    "--model.depth_mult=0.34", "--model.dense_epochs=0", "--data.init_args.train_subset=48",
                    "--data.init_args.val_size=16", "--data.init_args.test_subset=16", "--data.init_args.batch_size=16",
                    "--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.logger=false",
                    f"--trainer.default_root_dir={tmp_path}", "--test_after_fit=false"])
    assert cli.trainer.state.finished and "train/token_ratio" in cli.trainer.callback_metrics
    assert list(cli.model.model.dynprune.sites) == ["blocks.1", "blocks.2"]


@pytest.mark.parametrize("ratio", [2.0, 3.0])
def test_keep_ratio_for_matches_a_flops_reduction(ratio: float) -> None:
    model = dp.gate_model(create("vit", num_classes=10, in_chans=1, input_size=28, width_mult=0.25), "sigmoid",
                          granularity="token")
    rho = keep_ratio_for(model, ratio)
    info = model.dynprune
    masks = {}
    for s, name in enumerate(info.sites, start=1):  # the schedule's kept tokens, CLS first
        masks[name] = (torch.arange(50) < 1 + round(rho ** s * 49)).float().view(1, 50, 1)
    flops = float(info.flops.effective(masks) + info.flops.gates(masks)) / info.flops.dense_total
    assert float(info.flops.gates(masks)) < info.flops.gate_flops  # later gates read the kept tokens only
    assert flops == pytest.approx(1 / ratio, rel=0.03) and 0 < rho < 1
    with pytest.raises(ValueError, match="no keep_ratio brings the FLOPs within 3% of 1/50"):
        keep_ratio_for(model, 50.0)
