"""Optional GPU checks (skipped without CUDA): gated training, exact zeros and FLOPs accounting on the GPU."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from conftest import quiet_trainer_kwargs

import dynprune as dp

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_gated_training_and_flops_on_gpu_match_cpu(tmp_path) -> None:
    L.seed_everything(0)
    dm = dp.DigitsDataModule(batch_size=64)
    module = dp.GatedClassifier("resnet20", gate="sigmoid", input_size=8, width_mult=0.5, lam=1.0,
                                gate_kwargs={"init_bias": 0.5})
    cb = dp.FlopsCallback(dirpath=str(tmp_path), plot=False, verbose=False)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=5, callbacks=[cb],
                        **quiet_trainer_kwargs(accelerator="gpu"))
    trainer.fit(module, dm)
    trainer.test(module, dm, verbose=False)
    assert trainer.strategy.root_device.type == "cuda"  # Lightning moves the module back to the CPU afterwards
    gpu_ratio = cb.reports["test"]["summary"]["flops_mean_ratio"]
    assert gpu_ratio < 1.0
    cpu = copy.deepcopy(module).cpu().eval()
    with torch.no_grad():
        ratios = torch.cat([cpu.profile.ratio((cpu(x), cpu.masks())[1]) for x, _ in dm.test_dataloader()])
    assert ratios.mean().item() == pytest.approx(gpu_ratio, abs=0.01)  # only masks at sigma ~ 0.5 may differ


def test_masked_channels_are_exactly_zero_on_gpu() -> None:
    model = dp.gate_model(dp.backbones.create("vgg11", width_mult=0.25), gate="l1", init_bias=0.0).cuda().eval()
    name = dp.gating_info(model).gated[0]
    norm = model.get_submodule(model.dynprune.layers[name].norm)
    seen = {}
    norm.register_forward_hook(lambda m, i, o: seen.__setitem__("out", o.detach().clone()))
    with torch.no_grad():
        model(torch.randn(8, 1, 28, 28, device="cuda"))
    mask = dp.collect_masks(model)[name]
    assert (mask == 0).any() and (seen["out"][mask == 0] == 0).all()
