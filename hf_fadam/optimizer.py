r"""``FAdam``: the optimizer class. It validates hyperparameters, holds state and calls :func:`hf_fadam.fadam`."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer

from ._flat import flat_fadam_group, get_layout, has_layouts, install_engine_hooks
from ._math import resolve_state_dtype
from .functional import describe_implementation, fadam


__all__ = ["FAdam"]

_DTYPE_NAMES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float64": torch.float64,
    "fp64": torch.float64,
    "double": torch.float64,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def _parse_state_dtype(state_dtype: torch.dtype | str | None) -> torch.dtype | None:
    if state_dtype is None:
        return None
    if isinstance(state_dtype, str):
        name = state_dtype.removeprefix("torch.")
        if name not in _DTYPE_NAMES:
            raise ValueError(f"Invalid state_dtype: {state_dtype!r}; expected one of {sorted(_DTYPE_NAMES)}")
        return _DTYPE_NAMES[name]
    if not isinstance(state_dtype, torch.dtype) or not state_dtype.is_floating_point:
        raise ValueError(f"Invalid state_dtype: {state_dtype!r}; it must be a floating-point torch.dtype")
    return state_dtype


def _check_number(name: str, value: Any, ok: bool, requirement: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"Invalid {name}: {value!r}; it must be a real number ({requirement})")
    if not ok:
        raise ValueError(f"Invalid {name}: {value!r}; it must satisfy {requirement}")


def _check_flag(name: str, value: Any) -> None:
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"Invalid {name}: {value!r}; it must be True, False or None")


class FAdam(Optimizer):
    r"""FAdam (Fisher Adam): Adam read as natural-gradient descent with the diagonal empirical Fisher.

    From D. Hwang, "FAdam: Adam is a natural gradient optimizer using diagonal empirical Fisher information",
    https://arxiv.org/abs/2405.12807 . Per parameter tensor θ, with ``RMS(x) = sqrt(mean(x²))`` over the whole
    logical tensor (also when it is sharded across processes):

    .. math::
        \begin{aligned}
            & t \leftarrow t + 1, \qquad g \leftarrow \nabla_\theta L \quad (-\nabla_\theta L \text{ if maximize}) \\
            & \hat\beta_2 \leftarrow \beta_2 (1 - \beta_2^{t-1}) / (1 - \beta_2^t)
                \qquad (\hat\beta_2 = 0 \text{ at } t = 1) \\
            & f \leftarrow \hat\beta_2 f + (1 - \hat\beta_2)\, g^2 \qquad \text{(diagonal empirical Fisher)} \\
            & \hat\epsilon \leftarrow \epsilon \min(1, \mathrm{RMS}(g)) \quad (\epsilon \text{ if } \mathrm{RMS}(g) = 0),
                \qquad D \leftarrow f^{p} + \hat\epsilon \\
            & \bar g \leftarrow (g / D) / \max(1, \mathrm{RMS}(g / D) / c) \qquad \text{(clipped natural gradient)} \\
            & m \leftarrow \beta_1 m + (1 - \beta_1)\, \bar g \qquad \text{(no bias correction)} \\
            & w \leftarrow (\theta / D) / \max(1, \mathrm{RMS}(\theta / D) / c)
                \qquad \text{(Fisher-preconditioned weight decay)} \\
            & \theta \leftarrow \theta - \eta\, (m + \lambda w)
        \end{aligned}

    Args:
        params: parameters or param-group dicts to optimize.
        lr (float, default 1e-3): learning rate η (schedulers set ``group["lr"]``).
        betas (tuple[float, float], default (0.9, 0.999)): β1 for the momentum, β2 for the Fisher EMA.
        eps (float, default 1e-8): ε of the adaptive epsilon ε̂ = ε·min(1, RMS(g)).
        weight_decay (float, default 0.1): λ of the Fisher-preconditioned weight decay (0 disables it).
        clip (float, default 1.0): c, the RMS threshold of both clips (natural gradient and weight decay).
        p (float, default 0.5): the Fisher power in D = f^p + ε̂ (½ gives Adam's denominator).
        maximize (bool, default False): maximize the objective instead of minimizing it.
        foreach (bool or None, default None): ``True`` uses the ``torch._foreach_*`` implementation, ``False`` the
            per-tensor reference loop.
        fused (bool or None, default None): ``True`` uses the fused kernels (Triton on CUDA, a compiled C kernel
            on CPU) and lets ``torch.amp.GradScaler`` unscale inside the step. With both flags ``None`` the fused
            path is used where available (not for DTensor parameters, not under ``torch.compile``), else foreach.
        state_dtype (torch.dtype, str or None, default None): dtype of ``exp_avg`` and ``fisher``: float32 for
            float16/bfloat16 params, the param dtype otherwise. It is kept through ``load_state_dict``.

    Notes:
        - Empirical Fisher: ``f`` is built from squared gradients of the training loss. The paper argues this is
          a sound Fisher estimate only when the loss is the negative log-likelihood of a *discrete* distribution
          (cross-entropy, CTC, ...); with regression losses such as MSE, FAdam is still well defined but loses
          that reading.
        - Step 1 with p = ½ gives ḡ ≈ sign(g), so m₁ ≈ 0.1·sign(g): the first updates are about 10x smaller than
          Adam's (an implicit warm-up, since m is not bias-corrected).
        - The weight-decay term usually sits at its clip (|θ|/√f ≫ 1), i.e. λ·w has per-tensor RMS ≈ λ·c.
        - This follows the paper where the public ports differ: the clip divides by ``max(1, RMS/c)`` (the ports'
          ``max(1, RMS)/c`` amplifies for c > 1), the step is counted per tensor, and an all-zero gradient stays
          finite (ε̂ = ε when RMS(g) = 0).
        - Under FSDP2 (DTensor parameters) every RMS is reduced over the shards, so the update does not depend on
          the number of processes. Under DeepSpeed ZeRO 1-3 each group holds one flat partition that cuts across
          tensors; :mod:`hf_fadam.integrations.deepspeed` maps it back to parameters (``hf_fadam._flat``), so
          every RMS is still per whole tensor. FSDP1's flat shards are not mapped.

    State per parameter: ``step`` (0-d float32 tensor on the parameter's device), ``exp_avg`` (m), ``fisher`` (f).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.1,
        clip: float = 1.0,
        p: float = 0.5,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        state_dtype: torch.dtype | str | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            clip=clip,
            p=p,
            maximize=maximize,
            foreach=foreach,
            fused=fused,
            state_dtype=state_dtype,
        )
        self._validate_group(defaults)
        defaults["state_dtype"] = _parse_state_dtype(state_dtype)
        defaults["betas"] = tuple(float(b) for b in betas)
        super().__init__(params, defaults)
        # An engine already imported that hands FAdam flat partitions (DeepSpeed ZeRO) describes them to FAdam.
        install_engine_hooks()
        # GradScaler hands grad_scale/found_inf to optimizers that unscale inside the step: the fused kernels do.
        if fused:
            self._step_supports_amp_scaling = True

    @staticmethod
    def _validate_group(group: dict[str, Any]) -> None:
        if isinstance(group["lr"], Tensor):
            raise ValueError("Invalid lr: a Tensor; FAdam takes lr as a Python float")
        _check_number("lr", group["lr"], group["lr"] >= 0 if _is_real(group["lr"]) else False, "lr >= 0")
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"Invalid betas: {betas!r}; it must be a pair (beta1, beta2)")
        for i, beta in enumerate(betas):
            _check_number(f"beta{i + 1}", beta, _is_real(beta) and 0.0 <= beta < 1.0, f"0 <= beta{i + 1} < 1")
        # eps = 0 would make D = f^p + ε̂ zero wherever f = 0 (a zero gradient, or an element that never had one):
        # 0/0 = NaN. ε̂ = ε is the zero-gradient guard, so ε must be positive.
        _check_number("eps", group["eps"], _is_real(group["eps"]) and group["eps"] > 0, "eps > 0")
        wd = group["weight_decay"]
        _check_number("weight_decay", wd, _is_real(wd) and wd >= 0, "weight_decay >= 0")
        _check_number("clip", group["clip"], _is_real(group["clip"]) and group["clip"] > 0, "clip > 0")
        _check_number("p", group["p"], _is_real(group["p"]) and group["p"] > 0, "p > 0")
        for flag in ("maximize", "foreach", "fused"):
            _check_flag(flag, group[flag])
        if group["maximize"] is None:
            raise ValueError("Invalid maximize: None; it must be True or False")
        if group["foreach"] and group["fused"]:
            raise ValueError("Invalid foreach=True with fused=True: they contradict each other; set at most one")
        _parse_state_dtype(group["state_dtype"])

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        for key, value in self.defaults.items():
            param_group.setdefault(key, value)
        self._validate_group(param_group)
        param_group["state_dtype"] = _parse_state_dtype(param_group["state_dtype"])
        param_group["betas"] = tuple(float(b) for b in param_group["betas"])
        params = param_group["params"]
        for param in [params] if isinstance(params, Tensor) else list(params):
            if not isinstance(param, Tensor):
                continue  # the base class reports non-tensors
            if torch.is_complex(param):
                raise ValueError(f"FAdam does not support complex parameters; got one of dtype {param.dtype}")
            if not param.is_floating_point():
                raise ValueError(f"FAdam optimizes floating-point parameters only; got one of dtype {param.dtype}")
        super().add_param_group(param_group)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("fused", None)
            group.setdefault("state_dtype", None)

    def _init_group(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        exp_avgs: list[Tensor],
        fishers: list[Tensor],
        state_steps: list[Tensor],
    ) -> None:
        for param in group["params"]:
            grad = param.grad
            if grad is None:
                continue
            if grad.is_sparse:
                raise RuntimeError("FAdam does not support sparse gradients; use a dense gradient layout")
            state = self.state[param]
            if len(state) == 0:
                if torch.is_complex(grad):  # (autograd gives a grad the param's dtype; checked once, not per step)
                    raise RuntimeError(f"FAdam does not support complex gradients; got one of dtype {grad.dtype}")
                state_dtype = resolve_state_dtype(param.dtype, group["state_dtype"])
                state["step"] = torch.zeros((), dtype=torch.float32, device=param.device)
                state["exp_avg"] = torch.zeros_like(param, dtype=state_dtype, memory_format=torch.preserve_format)
                state["fisher"] = torch.zeros_like(param, dtype=state_dtype, memory_format=torch.preserve_format)
            params.append(param)
            grads.append(grad)
            exp_avgs.append(state["exp_avg"])
            fishers.append(state["fisher"])
            state_steps.append(state["step"])

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        for group in self.param_groups:
            if has_layouts() and any(get_layout(param) is not None for param in group["params"]):
                # Flat partitions of an engine (DeepSpeed ZeRO), described by its integration: per fragment.
                for param in group["params"]:
                    layout = get_layout(param)
                    if layout is None:
                        raise RuntimeError("FAdam: a param group mixes flat partitions and ordinary parameters")
                    flat_fadam_group(self.state, group, param, layout, grad_scale=grad_scale, found_inf=found_inf)
                continue
            params: list[Tensor] = []
            grads: list[Tensor] = []
            exp_avgs: list[Tensor] = []
            fishers: list[Tensor] = []
            state_steps: list[Tensor] = []
            self._init_group(group, params, grads, exp_avgs, fishers, state_steps)
            beta1, beta2 = group["betas"]
            fadam(
                params,
                grads,
                exp_avgs,
                fishers,
                state_steps,
                foreach=group["foreach"],
                fused=group["fused"],
                grad_scale=grad_scale,
                found_inf=found_inf,
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                clip=group["clip"],
                p=group["p"],
                maximize=group["maximize"],
            )
        return loss

    def describe_implementation(self) -> str:
        """The implementation ``step`` runs, e.g. ``"fused (C kernel, cpu)"``, ``"foreach"`` or ``"for-loop reference"``.

        Resolved per param group from its parameters, their state dtype and the group's ``foreach``/``fused`` flags,
        as :func:`hf_fadam.functional.describe_implementation` does; groups that differ are listed one by one.
        """
        answers: dict[int, str] = {}
        for index, group in enumerate(self.param_groups):
            params = [p for p in group["params"] if isinstance(p, Tensor)]
            if not params:
                continue
            fishers = [
                self.state[p]["fisher"]
                if "fisher" in self.state.get(p, {})
                else torch.empty(0, dtype=resolve_state_dtype(p.dtype, group["state_dtype"]), device=p.device)
                for p in params
            ]
            answers[index] = describe_implementation(params, fishers, group["foreach"], group["fused"])
        if len(set(answers.values())) <= 1:
            return next(iter(answers.values()), "no parameters")
        return "; ".join(f"group {i}: {answer}" for i, answer in answers.items())

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load state as torch's ``Optimizer.load_state_dict`` does, but keep each state tensor's dtype.

        torch's base class casts every floating-point state tensor to its parameter's dtype, which would round
        float32 state of bfloat16 params through bfloat16. Here ``exp_avg``/``fisher`` come back in the group's state
        dtype (float32 for bf16 params by default) and ``step`` as a float32 tensor on the parameter's device, so a
        resumed run continues exactly. The tensors are copied, so the optimizer never shares state with the dict it
        was loaded from.

        The load runs inside torch's hook contract: hooks added with ``register_load_state_dict_pre_hook`` run first
        and their edits of ``state_dict`` (including ``"state"``) are what is loaded; hooks added with
        ``register_load_state_dict_post_hook`` run after ``self.state`` holds the loaded, dtype-restored state. To do
        that, two hooks of FAdam's own are added for the duration of the call: a pre-hook that runs after every other
        pre-hook and hands the tensors of ``"state"`` to the base class in an opaque box (so it does not cast them),
        and a post-hook that runs before every other post-hook and unboxes them with the right dtype and device.
        """
        pre = self.register_load_state_dict_pre_hook(_box_state_tensors)  # appended: runs after the user's
        post = self.register_load_state_dict_post_hook(_unbox_state_tensors, prepend=True)  # runs first
        try:
            super().load_state_dict(state_dict)
        finally:
            pre.remove()
            post.remove()


class _Boxed:
    """A state tensor passed through ``Optimizer.load_state_dict`` untouched (its per-value cast skips non-tensors)."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: Tensor) -> None:
        self.tensor = tensor


def _box_state_tensors(optimizer: Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
    """Pre-hook: a new state dict (the caller's is not modified) whose per-param state tensors are boxed."""
    state = {
        key: {name: _Boxed(v) if isinstance(v, Tensor) else v for name, v in value.items()}
        if isinstance(value, dict)
        else value
        for key, value in state_dict["state"].items()
    }
    return {**state_dict, "state": state}


def _unbox_state_tensors(optimizer: Optimizer) -> None:
    """Post-hook: turn the boxes into copies in the state dtype (``step``: float32) on each parameter's device."""
    param_group = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    for key, value in optimizer.state.items():
        if not isinstance(value, dict):
            continue
        group = param_group.get(id(key)) if isinstance(key, Tensor) else None
        for name, item in value.items():
            if not isinstance(item, _Boxed):
                continue
            if group is None:  # state not assigned to a parameter: kept as it was saved, like the base class does
                value[name] = item.tensor
            elif name == "step":
                value[name] = item.tensor.to(dtype=torch.float32, device=key.device, copy=True)
            else:
                state_dtype = resolve_state_dtype(key.dtype, group["state_dtype"])
                value[name] = item.tensor.to(dtype=state_dtype, device=key.device, copy=True)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
