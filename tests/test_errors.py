"""Bad input: each argument's error message names the argument and the value."""

import pytest
import torch

from hf_fadam import FAdam


def _param():
    return [torch.nn.Parameter(torch.randn(2))]


BAD_ARGS = [
    ({"lr": -1e-3}, r"Invalid lr: -0\.001"),
    ({"lr": "0.1"}, r"Invalid lr: '0\.1'"),
    ({"lr": torch.tensor(0.1)}, r"Invalid lr: a Tensor"),
    ({"betas": (1.0, 0.999)}, r"Invalid beta1: 1\.0"),
    ({"betas": (0.9, -0.1)}, r"Invalid beta2: -0\.1"),
    ({"betas": (0.9,)}, r"Invalid betas: \(0\.9,\)"),
    ({"eps": -1e-8}, r"Invalid eps: -1e-08"),
    ({"weight_decay": -0.1}, r"Invalid weight_decay: -0\.1"),
    ({"clip": 0.0}, r"Invalid clip: 0\.0"),
    ({"clip": float("nan")}, r"Invalid clip: nan"),
    ({"p": 0}, r"Invalid p: 0"),
    ({"p": True}, r"Invalid p: True"),
    ({"maximize": None}, r"Invalid maximize: None"),
    ({"foreach": "yes"}, r"Invalid foreach: 'yes'"),
    ({"fused": 1}, r"Invalid fused: 1"),
    ({"foreach": True, "fused": True}, r"foreach=True with fused=True"),
    ({"state_dtype": torch.int32}, r"Invalid state_dtype: torch\.int32"),
    ({"state_dtype": "float8"}, r"Invalid state_dtype: 'float8'"),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD_ARGS, ids=[str(k) for k, _ in BAD_ARGS])
def test_bad_hyperparameter(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FAdam(_param(), **kwargs)


def test_bad_value_in_added_param_group():
    opt = FAdam(_param())
    with pytest.raises(ValueError, match=r"Invalid clip: -1"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(2))], "clip": -1})


def test_integer_and_complex_params_rejected():
    with pytest.raises(ValueError, match=r"floating-point parameters only; got one of dtype torch\.int64"):
        FAdam([torch.zeros(2, dtype=torch.long)])
    with pytest.raises(ValueError, match=r"complex parameters; got one of dtype torch\.complex64"):
        FAdam([torch.nn.Parameter(torch.zeros(2, dtype=torch.complex64))])


def test_sparse_gradient_rejected():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = FAdam(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()


def test_fused_on_unsupported_device_type_is_an_error():
    param = torch.nn.Parameter(torch.randn(2, device="meta"))
    opt = FAdam([param], fused=True)
    param.grad = torch.randn(2, device="meta")
    with pytest.raises(RuntimeError, match="not available on device type 'meta'"):
        opt.step()


def test_grad_scale_without_fused_is_an_error():
    param = torch.nn.Parameter(torch.randn(2))
    opt = FAdam([param], foreach=True)
    opt.grad_scale = torch.tensor(2.0)
    param.grad = torch.randn(2)
    with pytest.raises(RuntimeError, match="grad_scale/found_inf"):
        opt.step()


def test_bad_cpu_backend_variable(monkeypatch):
    monkeypatch.setenv("HF_FADAM_CPU_FUSED_BACKEND", "cuda")
    param = torch.nn.Parameter(torch.randn(2))
    opt = FAdam([param], fused=True)
    param.grad = torch.randn(2)
    with pytest.raises(ValueError, match=r"Invalid HF_FADAM_CPU_FUSED_BACKEND='cuda'"):
        opt.step()
