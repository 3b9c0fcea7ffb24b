"""FSDP1 in an own training loop: FAdam and FAdam8bit refuse FSDP1's flat parameters unless ``allow_flat_shards``.

FSDP1 hands the optimizer flat parameters (``use_orig_params=False``) or 1-D views of a process's shard
(``use_orig_params=True``); FAdam would take its RMS values per shard. torch marks both with ``_fsdp_flattened``
(``hf_fadam/_fsdp1.py``). Tested:

* ``tests/distributed/fsdp1_checks.py``: one spawn of 2 gloo processes on CPU with real FSDP1, both
  ``use_orig_params`` settings, both classes: refused with the named error, params unchanged; refused at the first
  step where FSDP1 wrapped the parameters after the optimizer was built; with ``allow_flat_shards=True`` 3 steps
  run and differ from one process (per-shard RMS).
* In-process, with parameters marked as torch's FSDP1 marks them: the same refusals, the opt-in's validation and
  lifetime (not in param groups or state dicts; kept through deepcopy and pickle), ``import hf_fadam`` importing no
  FSDP, and the Trainer passing ``--optim_args allow_flat_shards=true`` on to the optimizer.
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from hf_fadam import FAdam, FAdam8bit
from hf_fadam._fsdp1 import is_fsdp1_flat


REPO_ROOT = Path(__file__).resolve().parents[1]
WORKER = REPO_ROOT / "tests" / "distributed" / "fsdp1_checks.py"
WORLD_SIZE = 2
RUN_TIMEOUT_S = 420  # a hang is the only thing this catches (the run takes about 30 s on 2 busy cores)
CLASSES = {"FAdam": FAdam, "FAdam8bit": FAdam8bit}

needs_gloo = pytest.mark.skipif(
    sys.platform == "win32" or not (dist.is_available() and dist.is_gloo_available()),
    reason="gloo process groups over 127.0.0.1 (tested on Linux)",
)


def _mark_fsdp1(param: torch.Tensor) -> torch.Tensor:
    """Mark ``param`` as FSDP1's ``FlatParamHandle`` marks flat parameters and the parameters it flattened."""
    from torch.distributed.fsdp._common_utils import _set_fsdp_flattened

    _set_fsdp_flattened(param)
    return param


def _assert_refusal(message: str, name: str) -> None:
    for part in (f"{name} refuses FSDP1", "per shard", "per whole tensor", "fully_shard", "allow_flat_shards=True"):
        assert part in message, f"{part!r} not in {message!r}"


# ---------------------------------------------------------------------------------------------------------------
# Real FSDP1, 2 processes (one spawn for every check)
# ---------------------------------------------------------------------------------------------------------------

DIST_CHECKS = [
    f"{kind}[{cls},use_orig_params={uop}]"
    for cls in CLASSES
    for uop in (False, True)
    for kind in ("refused", "allowed")
] + [f"refused_late[{cls}]" for cls in CLASSES]

_RUN: dict[str, object] = {}


def _spawn_results(tmp_path_factory) -> tuple[dict[str, list[dict]], str]:
    if "run" not in _RUN:
        pytest.importorskip("torch.distributed.fsdp", reason="FSDP1 is not available")
        out = tmp_path_factory.mktemp("fsdp1_checks")
        env = dict(os.environ, OMP_NUM_THREADS="1")
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
        try:
            proc = subprocess.run(
                [sys.executable, str(WORKER), str(out)], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                timeout=RUN_TIMEOUT_S, check=False,
            )  # fmt: skip
            output = proc.stdout + proc.stderr
            failed = None if proc.returncode in (0, 1) else f"exit status {proc.returncode}:\n{output[-6000:]}"
        except subprocess.TimeoutExpired:
            output, failed = "", f"did not finish in {RUN_TIMEOUT_S} s"
        results: dict[str, list[dict]] = {}
        for rank in range(WORLD_SIZE):
            path = out / f"results_rank{rank}.json"
            for name, res in (json.loads(path.read_text()) if path.exists() else {}).items():
                results.setdefault(name, []).append({"rank": rank, **res})
        _RUN["run"] = (results, output, failed)
    results, output, failed = _RUN["run"]
    if failed:
        pytest.fail(f"tests/distributed/fsdp1_checks.py {failed}")
    return results, output


@pytest.mark.parametrize("name", DIST_CHECKS)
@needs_gloo
def test_fsdp1_two_processes(tmp_path_factory, name):
    results, output = _spawn_results(tmp_path_factory)
    per_rank = results.get(name, [])
    if len(per_rank) != WORLD_SIZE:
        pytest.fail(f"{name} ran on {len(per_rank)} of {WORLD_SIZE} ranks; worker output:\n{output[-6000:]}")
    failures = [f"rank {r['rank']}: {r['error']}\n{r['traceback']}" for r in per_rank if not r["ok"]]
    assert not failures, "\n".join(failures)


# ---------------------------------------------------------------------------------------------------------------
# In-process
# ---------------------------------------------------------------------------------------------------------------


def test_detection():
    plain = torch.nn.Parameter(torch.zeros(3))
    assert not is_fsdp1_flat(plain)
    assert is_fsdp1_flat(_mark_fsdp1(torch.nn.Parameter(torch.zeros(3))))


def test_import_hf_fadam_imports_no_fsdp():
    """``import hf_fadam`` imports no FSDP (seconds of imports): the check only looks FSDP1's module up in
    ``sys.modules``. (torch's own ``Optimizer.__init__`` imports it, through torch._dynamo, for any optimizer.)"""
    code = "import sys, hf_fadam\nbad = [m for m in sys.modules if m.startswith('torch.distributed.fsdp')]\n"
    code += "assert not bad, bad"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (str(REPO_ROOT), os.environ.get("PYTHONPATH")))))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("name", CLASSES)
def test_refused_when_built(name):
    cls = CLASSES[name]
    flat = _mark_fsdp1(torch.nn.Parameter(torch.randn(10)))
    with pytest.raises(RuntimeError) as info:
        cls([flat], foreach=True)
    _assert_refusal(str(info.value), name)
    opt = cls([torch.nn.Parameter(torch.randn(4))], foreach=True)
    with pytest.raises(RuntimeError, match=f"{name} refuses FSDP1"):
        opt.add_param_group({"params": [flat]})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("name", CLASSES)
def test_refused_at_first_step_when_wrapped_later(name):
    """FSDP1 with use_orig_params=True keeps the Parameter objects: an optimizer built earlier refuses at step 1,
    before any param or state changes."""
    cls = CLASSES[name]
    params = [torch.nn.Parameter(torch.randn(6)), torch.nn.Parameter(torch.randn(5))]
    extra = {"min_8bit_size": 0} if name == "FAdam8bit" else {}
    opt = cls([{"params": [params[0]]}, {"params": [params[1]]}], foreach=True, **extra)
    for p in params:
        _mark_fsdp1(p)
        p.grad = torch.randn_like(p)
    before = [p.detach().clone() for p in params]
    with pytest.raises(RuntimeError) as info:
        opt.step()
    _assert_refusal(str(info.value), name)
    assert all(torch.equal(b, p) for b, p in zip(before, params))
    assert all(len(s) == 0 for s in opt.state.values())


@pytest.mark.parametrize("name", CLASSES)
def test_allow_flat_shards(name):
    """The opt-in steps; it belongs to the optimizer object: not in param groups or state dicts (loading one does
    not change it), kept through deepcopy and pickle."""
    cls = CLASSES[name]
    param = _mark_fsdp1(torch.nn.Parameter(torch.randn(8)))
    opt = cls([param], foreach=True, allow_flat_shards=True)
    assert opt.allow_flat_shards is True
    before = param.detach().clone()
    param.grad = torch.randn_like(param)
    opt.step()
    assert not torch.equal(before, param) and bool(torch.isfinite(param).all())
    assert "allow_flat_shards" not in opt.param_groups[0] and "allow_flat_shards" not in opt.defaults
    saved = opt.state_dict()
    assert "allow_flat_shards" not in saved["param_groups"][0]
    assert copy.deepcopy(opt).allow_flat_shards is True
    assert pickle.loads(pickle.dumps(opt)).allow_flat_shards is True
    other = cls([torch.nn.Parameter(torch.randn(8))], foreach=True)
    other.load_state_dict(saved)
    assert other.allow_flat_shards is False


@pytest.mark.parametrize("name", CLASSES)
@pytest.mark.parametrize("value", ["true", 1, None])
def test_allow_flat_shards_must_be_a_bool(name, value):
    with pytest.raises(ValueError, match=rf"Invalid allow_flat_shards: {value!r}; it must be True or False"):
        CLASSES[name]([torch.nn.Parameter(torch.randn(3))], allow_flat_shards=value)


@pytest.mark.parametrize("optim_args", [None, "allow_flat_shards=true"])
def test_trainer_passes_the_opt_in_on(tmp_path, optim_args):
    """The Trainer's guard sees no FSDP1 in the arguments or modules here, so FAdam's own check is what refuses;
    ``--optim_args allow_flat_shards=true`` reaches FAdam, which then accepts the flat parameters."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from hf_fadam.integrations.transformers import register

    register()
    from transformers import Trainer, TrainingArguments

    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    for p in model.parameters():
        _mark_fsdp1(p)
    args = TrainingArguments(
        output_dir=str(tmp_path), optim="fadam", use_cpu=True, report_to="none", optim_args=optim_args
    )
    trainer = Trainer(model=model, args=args)
    if optim_args is None:
        with pytest.raises(RuntimeError) as info:
            trainer.create_optimizer()
        _assert_refusal(str(info.value), "FAdam")
    else:
        optimizer = trainer.create_optimizer()
        optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper, where there is one
        assert type(optimizer).__name__ == "FAdam" and optimizer.allow_flat_shards is True
