"""``--optim fadam_8bit`` in the Hugging Face Trainer: the name parses, optim_args reach FAdam8bit, a run trains."""

from __future__ import annotations

import pytest
import torch


transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import HfArgumentParser, Trainer, TrainingArguments  # noqa: E402

import hf_fadam.integrations.transformers as hft  # noqa: E402
from hf_fadam import FAdam8bit  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def registered():
    assert hft.register() is True
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class _Classifier(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4))

    def forward(self, x, labels=None):
        logits = self.body(x)
        loss = torch.nn.functional.cross_entropy(logits, labels)
        return {"loss": loss, "logits": logits}


def _dataset(n=128):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 32, generator=gen)
    y = (x @ torch.randn(32, 4, generator=gen)).argmax(1)
    return [{"x": x[i], "labels": y[i]} for i in range(n)]


def _args(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path), optim="fadam_8bit", learning_rate=2e-2, per_device_train_batch_size=16,
        max_steps=40, logging_steps=8, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    base.update(kw)
    return TrainingArguments(**base)


def test_cli_parses_fadam_8bit():
    (args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", "/tmp/x", "--optim", "fadam_8bit", "--optim_args", "block_size=64,min_8bit_size=0"]
    )
    assert hft.fadam_variant(args.optim) == ("fadam_8bit", True, False)


def test_kwargs_carry_fadam_and_8bit_optim_args(tmp_path):
    args = _args(tmp_path, weight_decay=0.2, optim_args="block_size=64,min_8bit_size=100,clip=0.5,fused=false")
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, None)
    assert cls is FAdam8bit
    assert kwargs["block_size"] == 64 and kwargs["min_8bit_size"] == 100
    assert kwargs["clip"] == 0.5 and kwargs["fused"] is False and kwargs["weight_decay"] == 0.2


@pytest.mark.parametrize(
    ("optim_args", "message"),
    [
        ("block_size=big", "optim_args key 'block_size' needs an integer; got 'big'"),
        ("blok_size=64", "Did you mean 'block_size'"),
        ("state_dtype=bf16", "'state_dtype' does not apply to --optim fadam_8bit"),
    ],
)
def test_bad_optim_args_set_after_construction_name_the_key(tmp_path, optim_args, message):
    args = _args(tmp_path)
    args.optim_args = optim_args  # past the TrainingArguments-time check: the Trainer's build still names the key
    with pytest.raises(ValueError, match=message):
        Trainer.get_optimizer_cls_and_kwargs(args, None)


def test_trainer_run_uses_fadam8bit_and_the_loss_falls(tmp_path):
    torch.manual_seed(0)
    args = _args(tmp_path, optim_args="block_size=64,min_8bit_size=100")
    trainer = Trainer(model=_Classifier(), args=args, train_dataset=_dataset())
    trainer.train()
    opt = trainer.optimizer
    while hasattr(opt, "optimizer"):
        opt = opt.optimizer
    assert isinstance(opt, FAdam8bit)
    assert all(g["block_size"] == 64 and g["min_8bit_size"] == 100 for g in opt.param_groups)
    w = trainer.model.body[0].weight
    assert opt.state[w]["exp_avg"].dtype == torch.int8 and opt.state[w]["fisher_sqrt"].dtype == torch.uint8
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize(
    ("optim_args", "message"),
    [
        ("block_size=48", "Invalid block_size: 48"),
        ("min_8bit_size=-1", "Invalid min_8bit_size: -1"),
        ("state_dtype=bf16", "'state_dtype' does not apply to --optim fadam_8bit"),
        ("clip=-1", "Invalid clip: -1.0"),
        ("blocksize=64", "blocksize"),
    ],
)
def test_bad_optim_args_fail_when_training_arguments_are_built(tmp_path, optim_args, message):
    # before the model is loaded and the data tokenized, as for --optim fadam
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        _args(tmp_path, optim_args=optim_args)
    with pytest.raises(ValueError, match="blocksize"):
        HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(
            ["--output_dir", str(tmp_path), "--optim", "fadam_8bit", "--optim_args", "blocksize=64"]
        )
