"""The ``teacher`` argument: any student distils from a frozen teacher given as a checkpoint path or a module."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import assert_close_rounding, quiet_trainer_kwargs, weight_depth

import dynprune as dp


def _teacher_checkpoint(tmp_path: Path, steps: int = 3) -> tuple[dp.GatedClassifier, Path]:
    """A dense ResNet-20 trained a few steps on digits, and its Lightning checkpoint."""
    L.seed_everything(0)
    dense = dp.GatedClassifier("resnet20", gate=None, input_size=8, width_mult=0.5, lr=0.05)
    trainer = L.Trainer(max_steps=steps, limit_val_batches=0, **quiet_trainer_kwargs())
    trainer.fit(dense, dp.DigitsDataModule(batch_size=32))
    path = tmp_path / "teacher.ckpt"
    trainer.save_checkpoint(path)
    return dense, path


def _student(kind: str, **kwargs: object) -> dp.GatedClassifier:
    """A static student (seeded): a thin ResNet-20 from scratch, or a statically pruned (channels removed) one."""
    torch.manual_seed(1)
    if kind == "thin":
        return dp.GatedClassifier("resnet20", gate=None, input_size=8, width_mult=0.25, **kwargs)
    model = dp.backbones.create("resnet20", input_size=8, width_mult=0.5)
    pruned = dp.static.remove_channels(dp.static.prune_model(model, "l1_structured", 0.5))
    return dp.GatedClassifier(pruned, gate=None, input_size=8, **kwargs)


def _grads(module: dp.GatedClassifier, data: torch.utils.data.TensorDataset) -> torch.Tensor:
    """The student's gradient (all parameters, flattened) of its first training step on ``data`` (one batch)."""
    grads: list[torch.Tensor] = []

    class Spy(L.Callback):
        def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            grads.append(torch.cat([p.grad.flatten() for p in pl_module.model.parameters()]))

    L.Trainer(max_steps=1, limit_val_batches=0, callbacks=[Spy()], **quiet_trainer_kwargs()).fit(
        module, torch.utils.data.DataLoader(data, batch_size=len(data)))
    return grads[0]


@pytest.mark.parametrize("kind", ["thin", "static"])
def test_a_static_student_distils_from_a_teacher_given_as_a_path_or_a_module(kind: str, tmp_path: Path) -> None:
    dense, path = _teacher_checkpoint(tmp_path)
    data = torch.utils.data.TensorDataset(torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,)))
    grads = {}
    for name, teacher in (("path", str(path)), ("module", dense), ("other", dp.GatedClassifier(
            "resnet20", gate=None, input_size=8, width_mult=0.5))):
        student = _student(kind, teacher=teacher, distill=1.0)
        assert student.distiller.teacher is not None and not student.distiller.teacher.training
        assert not any(p.requires_grad for p in student.distiller.teacher.parameters())
        assert not any("teacher" in k for k in student.state_dict())
        grads[name] = _grads(student, data)
    assert_close_rounding(grads["path"], grads["module"], depth=2 * weight_depth(dense))  # the same teacher
    assert not torch.allclose(grads["path"], grads["other"], rtol=1e-3, atol=0)  # another teacher, another gradient
    student = _student(kind, teacher=str(path), distill=1.0, lr=0.01)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=0, **quiet_trainer_kwargs())
    trainer.fit(student, dp.DigitsDataModule(batch_size=32))
    assert trainer.callback_metrics["train/distill"] > 0
    assert all(torch.equal(dense.model.state_dict()[k], v) for k, v in student.distiller.teacher.state_dict().items())


def test_resume_distils_from_the_teacher_of_the_original_run(tmp_path: Path) -> None:
    """The teacher's weights travel in the checkpoint: overwriting the teacher file does not change a resumed run."""
    dense, path = _teacher_checkpoint(tmp_path)
    original = {k: v.clone() for k, v in dense.model.state_dict().items()}
    ckpt = tmp_path / "student.ckpt"
    trainer = L.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=0, **quiet_trainer_kwargs())
    trainer.fit(_student("thin", teacher=str(path), distill=1.0), dp.DigitsDataModule(batch_size=32))
    trainer.save_checkpoint(ckpt)
    _teacher_checkpoint(tmp_path, steps=6)  # the teacher file now holds other weights
    resumed = _student("thin", teacher=str(path), distill=1.0)
    assert not all(torch.equal(original[k], v) for k, v in resumed.distiller.teacher.state_dict().items())
    L.Trainer(max_epochs=2, limit_train_batches=2, limit_val_batches=0, **quiet_trainer_kwargs()).fit(
        resumed, dp.DigitsDataModule(batch_size=32), ckpt_path=ckpt)
    assert all(torch.equal(original[k], v.cpu()) for k, v in resumed.distiller.teacher.state_dict().items())


def test_teacher_errors(tmp_path: Path) -> None:
    """distill needs a teacher (init_from is not one); the teacher must fit the student's inputs and classes."""
    dense, path = _teacher_checkpoint(tmp_path, steps=1)
    with pytest.raises(ValueError, match="distill > 0 needs a teacher"):
        dp.GatedClassifier("resnet20", gate="sigmoid", input_size=8, width_mult=0.5, init_from=str(path), distill=1.0)
    with pytest.raises(ValueError, match="teacher outputs shape \\(10,\\), the student 3 classes"):
        dp.GatedClassifier("resnet20", gate=None, input_size=8, num_classes=3, teacher=dense, distill=1.0)
    bare = tmp_path / "bare.ckpt"
    torch.save({"state_dict": dense.state_dict()}, bare)
    with pytest.raises(ValueError, match="hyperparameters name no backbone"):
        dp.GatedClassifier("resnet20", gate=None, input_size=8, teacher=str(bare), distill=1.0)
    with pytest.raises(ValueError, match="not found"):
        dp.GatedClassifier("resnet20", gate=None, input_size=8, teacher=str(tmp_path / "none.ckpt"), distill=1.0)
