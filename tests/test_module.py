"""GatedClassifier: the sparsity objective works, REINFORCE has the right sign, args are checked."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import quiet_trainer_kwargs
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dynprune as dp


def _mean_keep(module: dp.GatedClassifier, dm: L.LightningDataModule) -> float:
    module.eval()
    keeps = []
    with torch.no_grad():
        for x, _ in dm.val_dataloader():
            module(x)
            keeps.append(torch.cat([m.mean(dim=1) for m in module.masks().values()]))
    return torch.cat(keeps).mean().item()


@pytest.mark.parametrize("gate", ["sigmoid", "l1"])
def test_lambda_lowers_keep_rate_on_digits(gate: str) -> None:
    keep = {}
    for lam in (0.0, 2.0):
        L.seed_everything(0)
        dm = dp.DigitsDataModule(batch_size=64)
        dm.setup()
        module = dp.GatedClassifier("resnet20", gate=gate, lam=lam, input_size=8, width_mult=0.5, lr=0.05,
                                    gate_kwargs={"init_bias": 1.0})
        L.Trainer(max_steps=250, limit_val_batches=0, **quiet_trainer_kwargs()).fit(module, dm)
        keep[lam] = _mean_keep(module, dm)
    assert keep[2.0] < keep[0.0] - 0.2, keep


class _Toy(nn.Module):
    """The gated layer ``mid`` does not influence the output: turning it off costs no loss."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.mid, self.head = nn.Linear(4, 16), nn.Linear(16, 16), nn.Linear(16, 2)
        self.input_shape = (4,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.stem(x))
        unused = self.mid(h).sum(dim=1, keepdim=True)
        return self.head(h) + 0.0 * unused


def _train_toy(flip_sign: bool) -> float:
    L.seed_everything(0)
    model = dp.gate_model(_Toy(), gate="policy", init_bias=0.0)
    module = dp.GatedClassifier(model, lam=1.0, cost="count", num_classes=2, lr=0.5, gate_lr=0.5)
    if flip_sign:  # the reward of the blog post's erratum: higher cost (and loss) rewarded
        module.reward = lambda task, penalty: task + module.hparams.lam * penalty
    x, y = torch.randn(512, 4), torch.randint(0, 2, (512,))
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)
    L.Trainer(max_epochs=25, limit_val_batches=0, **quiet_trainer_kwargs()).fit(module, loader)
    module.eval()
    with torch.no_grad():
        probs = module.model.mid.gate.logits(F.relu(module.model.stem(x))).sigmoid()
    return probs.mean().item()


def test_reinforce_turns_off_a_useless_gate_and_not_with_flipped_sign() -> None:
    assert _train_toy(flip_sign=False) < 0.1
    assert _train_toy(flip_sign=True) > 0.9


def test_reinforce_baseline_is_a_moving_average() -> None:
    module = dp.GatedClassifier("lenet5", gate="policy", baseline_momentum=0.5)
    assert module._update_baseline(torch.tensor([1.0, 3.0])).item() == 2.0  # first call: initialised
    assert module._update_baseline(torch.tensor([6.0])).item() == 2.0
    assert module.reward_baseline.item() == 4.0 and module.baseline_steps.item() == 2


def test_target_mode_penalises_distance_to_target() -> None:
    module = dp.GatedClassifier("lenet5", gate="sigmoid", target=0.5)
    torch.testing.assert_close(module._penalty(torch.tensor([0.2, 0.9])), torch.tensor([0.3, 0.4]))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"gate": "sigmod"}, "unknown gate 'sigmod'; choose one of: l1, policy, sigmoid"),
     ({"lam": -1.0}, "lam must be >= 0"),
     ({"target": 1.5}, r"target .* must be in \(0, 1\]"),
     ({"cost": "macs"}, "unknown cost 'macs'"),
     ({"backbone": "resnet21"}, "unknown backbone 'resnet21'")],
)
def test_bad_arguments_have_clear_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        dp.GatedClassifier(**{"backbone": "lenet5", **kwargs})


def test_dense_baseline_and_warm_start(tmp_path) -> None:
    dense = dp.GatedClassifier("resnet20", gate=None, input_size=8)
    assert not dense.gated and dense.profile.dense_total > 0
    path = tmp_path / "dense.ckpt"
    torch.save({"state_dict": dense.state_dict()}, path)
    gated = dp.GatedClassifier("resnet20", gate="sigmoid", input_size=8, init_from=str(path),
                               gate_kwargs={"init_bias": 20.0})
    x = torch.randn(2, 1, 8, 8)
    dense.eval(), gated.eval()
    assert torch.allclose(dense(x), gated(x), atol=1e-5)
    with pytest.raises(ValueError, match="does not match the backbone"):
        dp.GatedClassifier("vgg11", gate="sigmoid", input_size=8, init_from=str(path))


def test_bn_recalibration_uses_thresholded_masks() -> None:
    L.seed_everything(0)
    dm = dp.DigitsDataModule(batch_size=64)
    dm.setup()
    module = dp.GatedClassifier("resnet20", gate="l1", input_size=8, width_mult=0.5, gate_kwargs={"init_bias": 0.0})
    batches = [batch for _, batch in zip(range(3), dm.train_dataloader(), strict=False)]

    def bn2_input_means(soft: bool) -> torch.Tensor:
        model = copy.deepcopy(module.model).train()
        for layer in dp.gated_layers(model).values():
            layer.gate.train(soft)
        seen = []
        model.layer1[0].bn2.register_forward_hook(lambda m, i, o: seen.append(i[0].mean(dim=(0, 2, 3))))
        with torch.no_grad():
            for x, _ in batches:
                model(x)
        return torch.stack(seen).mean(dim=0)

    module.recalibrate_norms(batches, 3)
    stats = module.model.layer1[0].bn2.running_mean
    torch.testing.assert_close(stats, bn2_input_means(soft=False))
    assert not torch.allclose(stats, bn2_input_means(soft=True), atol=1e-3)
    assert module.model.layer1[0].bn2.momentum == 0.1 and module.model.training
