r"""``FAdam``: the optimizer class. It validates hyperparameters, holds state and calls :func:`hf_fadam.fadam`."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer

from . import _release
from ._flat import flat_fadam_group, get_layout, has_layouts, install_engine_hooks, loaded_step
from ._fsdp1 import check_allow_flat_shards, refuse_fsdp1_flat
from ._math import group_hyperparameters, resolve_state_dtype
from ._rounding import check_param_rounding, resolve_param_rounding
from ._state_checks import check_fp_state
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
            float16/bfloat16 params, the param dtype otherwise. It is kept through ``load_state_dict``. 16-bit state
            is stored with stochastic rounding (unbiased: the Fisher EMA keeps moving), see :mod:`hf_fadam._rounding`.
        param_rounding (str, default ``"auto"``): how a bfloat16/float16 param stores its new value (the math runs in
            float32): ``"nearest"`` (plain PyTorch: updates below half an ulp are lost), ``"stochastic"`` (unbiased
            stochastic rounding, no memory), ``"kahan"`` (a 16-bit compensation buffer ``param_comp`` in the state
            keeps what rounding dropped; 2 bytes per parameter), or ``"auto"``: stochastic for 16-bit params, and
            nothing to round for float32/float64 ones. See :mod:`hf_fadam._rounding` and docs/precision.md.
        gradient_release (bool, default False): step each parameter inside backward, as soon as autograd has
            accumulated its gradient, and set its ``.grad`` to None (``Tensor.register_post_accumulate_grad_hook``):
            the same result as ``step()`` after backward, bit for bit, without all gradients alive at once.
            ``step()`` then steps only what still has a gradient. Refused for DTensor/FSDP1 parameters and in a
            process group of several processes (DDP). A setting of this optimizer object, like
            ``allow_flat_shards``; see :mod:`hf_fadam._release`.
        allow_flat_shards (bool, default False): accept FSDP1 (``FullyShardedDataParallel``) parameters, i.e. flat
            parameters or 1-D views of a process's shard, and take every RMS per shard. Without it such a parameter
            raises ``RuntimeError`` (in the constructor, or at its first step if FSDP1 wrapped it later); FSDP2
            (``fully_shard``) is exact. A setting of this optimizer object: not in its param groups or state dict.

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
          every RMS is still per whole tensor. FSDP1's flat shards are not mapped: refused unless
          ``allow_flat_shards=True``.
        - Not supported, and refused with an error that says so: a tensor ``lr`` (``ValueError``; pass a float,
          schedulers set ``group["lr"]``), complex parameters (``ValueError``; optimize ``torch.view_as_real(p)``),
          sparse gradients (``RuntimeError``; use dense embeddings), and torch's ``capturable``/``differentiable``
          options (not arguments of this class). The same holds for :class:`hf_fadam.FAdam8bit`.
        - ``load_state_dict`` checks what it loads (hyperparameters as the constructor does, each state tensor
          against its parameter's shape) and keeps torch's hook contract; see its docstring.

    State per parameter: ``step`` (0-d float32 tensor on the parameter's device), ``exp_avg`` (m), ``fisher`` (f),
    and ``param_comp`` (the param's dtype and shape) for a 16-bit param stored with ``param_rounding="kahan"``.
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
        param_rounding: str = "auto",
        gradient_release: bool = False,
        allow_flat_shards: bool = False,
    ) -> None:
        if not isinstance(gradient_release, bool):
            raise ValueError(f"Invalid gradient_release: {gradient_release!r}; it must be True or False")
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
            param_rounding=param_rounding,
        )
        self._validate_group(defaults)
        defaults["state_dtype"] = _parse_state_dtype(state_dtype)
        defaults["betas"] = tuple(float(b) for b in betas)
        # Not a group hyperparameter: loading a state dict must not turn the FSDP1 refusal on or off.
        self.allow_flat_shards = check_allow_flat_shards(allow_flat_shards)
        super().__init__(params, defaults)
        # An engine already imported that hands FAdam flat partitions (DeepSpeed ZeRO) describes them to FAdam.
        install_engine_hooks()
        # GradScaler hands grad_scale/found_inf to optimizers that unscale inside the step: the fused kernels do.
        if fused:
            self._step_supports_amp_scaling = True
        self.gradient_release = gradient_release
        if gradient_release:
            _release.check_distributed(self)
            _release.attach(self)

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
        check_param_rounding(group["param_rounding"])

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        for key, value in self.defaults.items():
            param_group.setdefault(key, value)
        self._validate_group(param_group)
        param_group["state_dtype"] = _parse_state_dtype(param_group["state_dtype"])
        param_group["betas"] = tuple(float(b) for b in param_group["betas"])
        params = param_group["params"]
        if isinstance(params, Tensor):
            params = [params]
        elif not isinstance(params, set):  # (the base class refuses a set: its order is not defined)
            params = list(params)  # a generator (``{"params": model.parameters()}``) is read once, here
        param_group["params"] = params
        for param in params:
            if not isinstance(param, Tensor):
                continue  # the base class reports non-tensors
            if torch.is_complex(param):
                raise ValueError(f"FAdam does not support complex parameters; got one of dtype {param.dtype}")
            if not param.is_floating_point():
                raise ValueError(f"FAdam optimizes floating-point parameters only; got one of dtype {param.dtype}")
            refuse_fsdp1_flat(self, param)  # FSDP1 flat parameters / shard views, unless allow_flat_shards
        super().add_param_group(param_group)
        if getattr(self, "gradient_release", False):
            _release.attach(self)

    def __getstate__(self) -> dict[str, Any]:
        # torch pickles defaults, state and param_groups only; keep the FSDP1 opt-in through pickle and deepcopy.
        return {
            **super().__getstate__(),
            "allow_flat_shards": getattr(self, "allow_flat_shards", False),
            "gradient_release": getattr(self, "gradient_release", False),
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("gradient_release", False)
        if self.gradient_release:  # a copy releases its own (copied) parameters
            _release.attach(self)
        for group in self.param_groups:
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("fused", None)
            group.setdefault("state_dtype", None)
            group.setdefault("param_rounding", "nearest")  # (an object pickled before the option existed)

    def _init_group(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        exp_avgs: list[Tensor],
        fishers: list[Tensor],
        state_steps: list[Tensor],
        comps: list[Tensor | None],
        streams: list[int],
        stream0: int = 0,
        indices: tuple[int, ...] | None = None,
    ) -> None:
        params_ = group["params"]
        for j in range(len(params_)) if indices is None else indices:
            param = params_[j]
            grad = param.grad
            if grad is None:
                continue
            if grad.is_sparse:
                raise RuntimeError("FAdam does not support sparse gradients; use a dense gradient layout")
            state = self.state[param]
            if len(state) == 0:
                refuse_fsdp1_flat(self, param)  # wrapped by FSDP1 after this optimizer was built
                if torch.is_complex(grad):  # (autograd gives a grad the param's dtype; checked once, not per step)
                    raise RuntimeError(f"FAdam does not support complex gradients; got one of dtype {grad.dtype}")
                state_dtype = resolve_state_dtype(param.dtype, group["state_dtype"])
                state["step"] = torch.zeros((), dtype=torch.float32, device=param.device)
                state["exp_avg"] = torch.zeros_like(param, dtype=state_dtype, memory_format=torch.preserve_format)
                state["fisher"] = torch.zeros_like(param, dtype=state_dtype, memory_format=torch.preserve_format)
            kahan = resolve_param_rounding(group["param_rounding"], param.dtype) == "kahan"
            if kahan and "param_comp" not in state:  # what rounding θ to its 16-bit dtype dropped, added back
                state["param_comp"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            params.append(param)
            grads.append(grad)
            exp_avgs.append(state["exp_avg"])
            fishers.append(state["fisher"])
            state_steps.append(state["step"])
            comps.append(state["param_comp"] if kahan else None)
            streams.append(stream0 + j)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        if getattr(self, "gradient_release", False):
            _release.attach(self)  # parameters unfrozen since: released from their next backward on
            self._release_checked = False
        stream0 = 0  # a parameter's position over all groups: its stream of random bits (stochastic rounding)
        for group in self.param_groups:
            self._step_group(group, stream0, grad_scale, found_inf)
            stream0 += len(group["params"])
        return loss

    @torch.no_grad()
    def _step_param(self, param: Tensor) -> None:
        """Step one parameter with its group's hyperparameters (gradient release; see :mod:`hf_fadam._release`)."""
        where = self.__dict__.get("_param_index", {}).get(param)
        groups = self.param_groups
        if where is None or where[0] >= len(groups) or groups[where[0]]["params"][where[1]] is not param:
            index, stream0 = {}, 0
            for gi, group in enumerate(self.param_groups):
                for j, p in enumerate(group["params"]):
                    index[p] = (gi, j, stream0)
                stream0 += len(group["params"])
            self._param_index = index
            where = index[param]
        if not self.__dict__.get("_release_checked", False):  # once per backward: step() clears it
            _release.check_distributed(self)
            self._release_checked = True
        gi, j, stream0 = where
        self._step_group(self.param_groups[gi], stream0, None, None, (j,))

    def _step_group(
        self,
        group: dict[str, Any],
        stream0: int,
        grad_scale: Tensor | None,
        found_inf: Tensor | None,
        indices: tuple[int, ...] | None = None,
    ) -> None:
        """Step the parameters of ``group`` that have a gradient (only those at ``indices`` if given);
        ``stream0`` is the position of the group's first parameter over all groups."""
        if has_layouts() and any(get_layout(param) is not None for param in group["params"]):
            if getattr(self, "gradient_release", False):
                raise RuntimeError(
                    f"{type(self).__name__}(gradient_release=True) refuses flat partitions (DeepSpeed ZeRO): the "
                    f"engine reduces and partitions gradients after backward; use gradient_release=False"
                )
            # Flat partitions of an engine (DeepSpeed ZeRO), described by its integration: per fragment.
            for param in group["params"]:
                layout = get_layout(param)
                if layout is None:
                    raise RuntimeError("FAdam: a param group mixes flat partitions and ordinary parameters")
                flat_fadam_group(self.state, group, param, layout, grad_scale=grad_scale, found_inf=found_inf)
            return
        params: list[Tensor] = []
        grads: list[Tensor] = []
        exp_avgs: list[Tensor] = []
        fishers: list[Tensor] = []
        state_steps: list[Tensor] = []
        comps: list[Tensor | None] = []
        streams: list[int] = []
        self._init_group(group, params, grads, exp_avgs, fishers, state_steps, comps, streams, stream0, indices)
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
            **group_hyperparameters(group),
            param_rounding=group["param_rounding"],
            param_comps=comps if any(c is not None for c in comps) else None,
            streams=streams,
        )

    def param_rounding_of(self, group: dict[str, Any], dtype: torch.dtype) -> str:
        """How this optimizer stores params of ``dtype`` in ``group``: ``"nearest"``, ``"stochastic"`` or ``"kahan"``
        (``"auto"`` resolved as this class means it; float32/float64 params always ``"nearest"``)."""
        return resolve_param_rounding(self._group_rounding(group), dtype)

    def _group_rounding(self, group: dict[str, Any]) -> str:
        return group["param_rounding"]

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
        """Load state as torch's ``Optimizer.load_state_dict`` does, but keep each state tensor's dtype, and check it.

        torch's base class casts every floating-point state tensor to its parameter's dtype, which would round
        float32 state of bfloat16 params through bfloat16. Here ``exp_avg``/``fisher`` come back in the group's state
        dtype (float32 for bf16 params by default) and ``step`` as a float32 tensor on the parameter's device (also
        from an older checkpoint that saved it as a Python number), so a resumed run continues exactly. The tensors
        are copied, so the optimizer never shares state with the dict it was loaded from.

        Nothing is loaded unchecked: each group's hyperparameters are validated as in the constructor, and each state
        tensor must have its parameter's shape (``ValueError`` naming the entry otherwise). A :class:`FAdam8bit`
        state dict loads too: its 8-bit ``exp_avg``/``fisher_sqrt`` codes are dequantized (m, and f = s²) with the
        ``block_size`` they were saved with, and its 8-bit settings are dropped from the groups.

        The load runs inside torch's hook contract: hooks added with ``register_load_state_dict_pre_hook`` run first
        and their edits of ``state_dict`` (including ``"state"``) are what is loaded; hooks added with
        ``register_load_state_dict_post_hook`` run after ``self.state`` holds the loaded, checked state. To do that,
        two hooks of FAdam's own are added for the duration of the call: a pre-hook that runs after every other
        pre-hook, checks and converts the state and hands its tensors to the base class in an opaque box (so it does
        not cast them), and a post-hook that runs before every other post-hook and unboxes them.
        """
        pre = self.register_load_state_dict_pre_hook(_prepare_loaded_state)  # appended: runs after the user's
        post = self.register_load_state_dict_post_hook(_unbox_state_tensors, prepend=True)  # runs first
        try:
            super().load_state_dict(state_dict)
        finally:
            pre.remove()
            post.remove()

    # The two per-class steps of the load (FAdam8bit overrides both): a saved group as it will be loaded, and one
    # parameter's saved state as it will be kept. Both raise ValueError before anything of the optimizer changes.

    def _loaded_group(self, saved: dict[str, Any], current: dict[str, Any]) -> dict[str, Any]:
        """The saved group checked as the constructor checks one; keys it lacks (an older save) keep the current."""
        group = {**{k: v for k, v in current.items() if k != "params"}, **saved}
        type(self)._validate_group(group)
        group["state_dtype"] = _parse_state_dtype(group["state_dtype"])
        group["betas"] = tuple(float(b) for b in group["betas"])
        return group

    def _loaded_state(self, param: Tensor, group: dict[str, Any], saved: dict[str, Any], key: Any) -> dict[str, Any]:
        """One parameter's saved state as FAdam keeps it: ``step`` a float32 tensor, ``exp_avg``/``fisher`` copies in
        the group's state dtype on the parameter's device, checked against the parameter's shape."""
        who = f"{type(self).__name__}.load_state_dict"
        state = dict(saved)
        if "fisher_sqrt" in state:
            state = _dequantized_8bit_state(who, state, param, group, key)
        _require_state_keys(who, state, key, ("step", "exp_avg", "fisher"))
        if "step" in state:
            layout = get_layout(param)  # a flat partition (DeepSpeed ZeRO): one step per parameter of its group
            if layout is not None:
                state["step"] = loaded_step(who, state["step"], layout, param.device, key)
            else:
                state["step"] = _loaded_step(who, state["step"], param.device, key)
        state_dtype = resolve_state_dtype(param.dtype, group["state_dtype"])
        for name in ("exp_avg", "fisher"):
            if name in state:
                check_fp_state(who, name, key, state[name], param)
                state[name] = state[name].to(dtype=state_dtype, device=param.device, copy=True)
        if "param_comp" in state:  # the Kahan residual: the param's own dtype
            check_fp_state(who, "param_comp", key, state["param_comp"], param)
            state["param_comp"] = state["param_comp"].to(dtype=param.dtype, device=param.device, copy=True)
        return state


_8BIT_ONLY_KEYS = ("block_size", "min_8bit_size")


def _require_state_keys(who: str, state: dict[str, Any], key: Any, names: tuple[str, ...]) -> None:
    """A parameter's state is empty (not stepped yet) or complete: a partial one would fail inside the next step."""
    missing = [name for name in names if name not in state]
    if state and missing:
        raise ValueError(
            f"{who}: the state of parameter {key} has {sorted(state)} but lacks {missing}; a saved state holds all "
            f"of {list(names)} (a truncated or foreign checkpoint?)"
        )


def _loaded_step(who: str, step: Any, device: torch.device, key: Any) -> Tensor:
    """``step`` as FAdam keeps it: a 0-d float32 tensor on ``device``; older checkpoints saved a Python number."""
    if isinstance(step, Tensor) and step.numel() == 1 and not step.is_complex():
        value = step.detach().to(device="cpu", dtype=torch.float64).reshape(())
    elif _is_real(step):
        value = torch.tensor(float(step), dtype=torch.float64)
    else:
        raise ValueError(f"{who}: state 'step' of parameter {key} is {step!r}; it must be a number or a 1-element tensor")
    t = float(value)
    if not (t >= 0 and t == int(t)):
        raise ValueError(f"{who}: state 'step' of parameter {key} is {t}; it must be a whole number >= 0")
    return value.to(device=device, dtype=torch.float32)


def _dequantized_8bit_state(who: str, state: dict[str, Any], param: Tensor, group: dict[str, Any], key: Any):
    """A FAdam8bit state (8-bit codes and scales of m and sqrt(f)) as FAdam's fp32 ``exp_avg`` and ``fisher``."""
    from ._multi_tensor import _is_dtensor
    from ._quant import dequantize_blockwise
    from ._state_checks import check_8bit_state

    _require_state_keys(who, state, key, ("step", "exp_avg", "exp_avg_scale", "fisher_sqrt", "fisher_sqrt_scale"))
    block_size = group.get("block_size")
    if block_size is None:
        raise ValueError(
            f"{who}: parameter {key} has 8-bit state (FAdam8bit) but its saved group has no 'block_size' to decode it"
        )
    from ._state_checks import check_block_size as _check_block_size

    _check_block_size(block_size)
    shard = param.to_local() if _is_dtensor(param) else param  # FAdam8bit's blocks are cut per local shard
    codes = {name: state.pop(name) for name in ("exp_avg", "exp_avg_scale", "fisher_sqrt", "fisher_sqrt_scale")}
    from ._sharded import LAYOUT_KEY, loaded_8bit_local

    # FAdam8bit's DTensor state: this rank's codes and scales, if they were cut for this param's shards
    codes = loaded_8bit_local(who, key, param, {**codes, LAYOUT_KEY: state.pop(LAYOUT_KEY, None)}, block_size)
    codes = {name: t.to(device=shard.device) if isinstance(t, Tensor) else t for name, t in codes.items()}
    check_8bit_state(who, key, shard, codes["exp_avg"], codes["fisher_sqrt"], codes["exp_avg_scale"],
                     codes["fisher_sqrt_scale"], block_size)  # fmt: skip
    m = dequantize_blockwise(codes["exp_avg"], codes["exp_avg_scale"], block_size).reshape(shard.shape)
    s = dequantize_blockwise(codes["fisher_sqrt"], codes["fisher_sqrt_scale"], block_size).reshape(shard.shape)
    f = s * s
    if shard is not param:
        from torch.distributed.tensor import DTensor

        def like_param(t: Tensor) -> Tensor:
            return DTensor.from_local(t, param.device_mesh, param.placements, run_check=False, shape=param.shape,
                                      stride=param.stride())  # fmt: skip

        m, f = like_param(m), like_param(f)
    return {**state, "exp_avg": m, "fisher": f}


class _Boxed:
    """A state tensor passed through ``Optimizer.load_state_dict`` untouched (its per-value cast skips non-tensors)."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: Tensor) -> None:
        self.tensor = tensor


def _prepare_loaded_state(optimizer: Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
    """Pre-hook: a new state dict (the caller's is not modified) with checked groups and checked, converted, boxed
    per-parameter state. A state dict whose groups do not match the optimizer's is passed on as it is: the base class
    refuses it with its own message."""
    saved_groups = state_dict["param_groups"]
    current = optimizer.param_groups
    if len(saved_groups) != len(current) or any(len(s["params"]) != len(c["params"]) for s, c in zip(saved_groups, current)):
        return state_dict
    groups = [optimizer._loaded_group(s, c) for s, c in zip(saved_groups, current)]
    where = {key: (param, g) for s, c, g in zip(saved_groups, current, groups) for key, param in zip(s["params"], c["params"])}
    state = {}
    for key, value in state_dict["state"].items():
        if key in where and isinstance(value, dict):
            param, group = where[key]
            value = optimizer._loaded_state(param, group, value, key)
            value = {name: _Boxed(v) if isinstance(v, Tensor) else v for name, v in value.items()}
        state[key] = value
    # A FAdam8bit state dict loaded into FAdam: its 8-bit settings (used above to decode its state) mean nothing here.
    groups = [{k: v for k, v in g.items() if k not in _8BIT_ONLY_KEYS or k in c} for g, c in zip(groups, current)]
    return {**state_dict, "param_groups": [{**g, "params": s["params"]} for s, g in zip(saved_groups, groups)],
            "state": state}  # fmt: skip


def _unbox_state_tensors(optimizer: Optimizer) -> None:
    """Post-hook: the checked, converted state tensors out of their boxes."""
    for value in optimizer.state.values():
        if isinstance(value, dict):
            for name, item in value.items():
                if isinstance(item, _Boxed):
                    value[name] = item.tensor


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
