"""The trainer callbacks (issue 30, item 7): a real Lightning Trainer and a real transformers
Trainer prune a tiny model with a method, stop at a checkpoint, resume from it, and end with the
same masks and weights as the uninterrupted run, bitwise; the result exports."""

from __future__ import annotations

import os

import pytest
import spruce
import torch
import torch.nn as nn
import torch.nn.functional as F
from spruce.api.callbacks import OptimizerSteps, SparseRun

pl = pytest.importorskip("lightning.pytorch")
transformers = pytest.importorskip("transformers")

EXAMPLE = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, pixel_values):
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.bn(self.conv(pixel_values))), 1).flatten(1))


def data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(64, 1, 8, 8, generator=gen), torch.randint(0, 4, (64,), generator=gen)


def same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def masks(sparse) -> list[torch.Tensor]:
    return [layer.masked.mask.clone() for layer in sparse.layers]


def updated_before(sparse, step: int) -> bool:
    """Did a mask update before ``step`` change a mask (so a resume must restore the masks)?"""
    return any(record["step"] <= step and min(record["iou_grow"].values(), default=1.0) < 1.0
               for record in sparse.metrics)


def exports(result: nn.Module, folder) -> None:
    artifact = spruce.build(result.eval(), EXAMPLE, target="onnxruntime", out=os.path.join(folder, "model.onnx"))
    assert os.path.isfile(artifact.path)


# ---- Lightning ---------------------------------------------------------------------------------

def lightning_fit(folder, ckpt_path=None):
    from spruce.api.lightning import SparseLightningCallback

    class Lit(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = Net()

        def training_step(self, batch, batch_idx):
            inputs, labels = batch
            return F.cross_entropy(self.model(inputs), labels)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    torch.manual_seed(0)
    callback = SparseLightningCallback(EXAMPLE, spruce.RigLConfig(), sparsity=0.8)
    trainer = pl.Trainer(max_epochs=3, accumulate_grad_batches=2, accelerator="cpu", logger=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=folder,
                         callbacks=[callback, pl.callbacks.ModelCheckpoint(folder, save_top_k=-1)])
    trainer.fit(Lit(), torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*data()), batch_size=8),
                ckpt_path=ckpt_path)
    return callback


def test_lightning_callback_resumes_bitwise_and_exports(tmp_path):
    whole = lightning_fit(tmp_path)
    assert whole.sparse.step_count == 12  # 3 epochs x 8 batches / 2 accumulated: optimizer steps only
    assert whole.sparse.total_steps == 12  # scheduled over the trainer's stepping batches
    assert updated_before(whole.sparse, 4)
    resumed = lightning_fit(tmp_path / "again", ckpt_path=tmp_path / "epoch=0-step=4.ckpt")
    assert resumed.sparse.step_count == 12
    assert all(torch.equal(a, b) for a, b in zip(masks(whole.sparse), masks(resumed.sparse)))
    assert whole.sparse.metrics == resumed.sparse.metrics
    assert whole.sparse.loss_guard.state_dict() == resumed.sparse.loss_guard.state_dict()
    assert same_state(whole.result, resumed.result)
    exports(resumed.result, tmp_path)


# ---- transformers Trainer ------------------------------------------------------------------------

class Pairs(torch.utils.data.Dataset):
    def __init__(self):
        self.inputs, self.labels = data()

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return {"pixel_values": self.inputs[index], "labels": self.labels[index]}


def hf_train(folder, resume: str | None = None, max_steps: int = 12, hook_loss: bool = True, logging_steps: int = 500):
    from spruce.api.hf_trainer import SparseTrainerCallback

    torch.manual_seed(0)
    callback = SparseTrainerCallback(Net(), EXAMPLE, spruce.SETConfig(), sparsity=0.8)
    args = transformers.TrainingArguments(
        str(folder), max_steps=max_steps, save_steps=6, per_device_train_batch_size=8, gradient_accumulation_steps=2,
        learning_rate=0.05, use_cpu=True, report_to=[], remove_unused_columns=False, disable_tqdm=True, seed=0,
        logging_steps=logging_steps)

    def cross_entropy(outputs, labels, **_):
        return F.cross_entropy(outputs, labels)

    trainer = transformers.Trainer(model=callback.model, args=args, train_dataset=Pairs(), callbacks=[callback],
                                   compute_loss_func=callback.loss_func(cross_entropy) if hook_loss else cross_entropy)
    trainer.train(resume_from_checkpoint=resume)
    return callback


def test_hf_trainer_callback_resumes_bitwise_and_exports(tmp_path):
    whole = hf_train(tmp_path)
    assert whole.sparse.step_count == 12 and whole.sparse.total_steps == 12
    assert whole.sparse.loss_guard.seen == 12  # the wrapped compute_loss_func fed the guard every step
    assert updated_before(whole.sparse, 6)
    checkpoint = tmp_path / "checkpoint-6"
    assert (checkpoint / "spruce-sparse.pt").is_file()
    resumed = hf_train(tmp_path, resume=str(checkpoint))
    assert all(torch.equal(a, b) for a, b in zip(masks(whole.sparse), masks(resumed.sparse)))
    assert whole.sparse.metrics == resumed.sparse.metrics
    assert whole.sparse.loss_guard.state_dict() == resumed.sparse.loss_guard.state_dict()
    assert same_state(whole.result, resumed.result)
    exports(resumed.result, tmp_path)
    (checkpoint / "spruce-sparse.pt").unlink()
    with pytest.raises(FileNotFoundError, match="spruce-sparse.pt"):
        hf_train(tmp_path, resume=str(checkpoint))


def test_hf_trainer_logged_loss_feeds_the_loss_guard(tmp_path):
    # no loss in the model's outputs and no wrapped loss function: the Trainer's logged loss (every 3
    # steps, the mean of those steps) is given to the guard once per step it covers
    callback = hf_train(tmp_path, max_steps=6, hook_loss=False, logging_steps=3)
    guard = callback.sparse.loss_guard
    assert guard.seen == 6
    assert guard.first[0] == guard.first[2] and guard.first[3] == guard.first[5] and guard.first[0] != guard.first[3]


def test_a_loss_in_the_model_outputs_is_kept_for_the_guard():
    from spruce.api.hf_trainer import SparseSlot

    class WithLoss(nn.Module):
        def forward(self, x):
            return {"loss": x.mean(), "logits": x}

    slot = SparseSlot(WithLoss())
    slot.train()
    slot(torch.ones(2, 3))
    slot(torch.zeros(2, 3))  # two micro-batches of one optimizer step: their mean
    assert float(slot.pop_loss()) == 0.5 and slot.pop_loss() is None
    slot.eval()
    slot(torch.ones(2, 3))  # evaluation losses are not training losses
    assert slot.pop_loss() is None


# ---- which optimizer steps count -----------------------------------------------------------------

def test_a_step_the_grad_scaler_skips_does_not_count():
    layer = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    steps = OptimizerSteps(optimizer)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 4)
    scaler.scale(layer(torch.ones(1, 3)).sum()).backward()
    scaler.step(optimizer)
    scaler.update()
    assert steps.pop() == 1
    optimizer.zero_grad()
    scaler.scale(layer(torch.full((1, 3), float("inf"))).sum()).backward()  # inf gradients: skipped
    scaler.step(optimizer)
    scaler.update()
    assert steps.pop() == 0


def test_the_trainer_owns_the_run_length():
    with pytest.raises(ValueError, match="total_steps"):
        SparseRun("rigl", EXAMPLE, {"total_steps": 10})
    with pytest.raises(ValueError, match="max_steps or max_epochs"):
        SparseRun("rigl", EXAMPLE, {}).start(Net(), float("inf"))
