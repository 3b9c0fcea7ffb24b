r"""``FAdam8bit``: FAdam with its two states stored in 8 bits, blockwise quantized (about 2 bytes per parameter)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from ._fsdp1 import refuse_fsdp1_flat
from ._math import group_hyperparameters
from ._multi_tensor import _is_dtensor
from ._quant import num_blocks, quantize_blockwise
from ._quant_step import _triton_backend_on_cpu, fadam8bit, resolve_implementation_8bit
from ._rounding import AUTO_16BIT_8BIT, resolve_param_rounding
from ._state_checks import check_8bit_state, check_fp_state
from ._state_checks import check_block_size as _check_block_size
from ._state_checks import check_min_8bit_size as _check_min_size
from .optimizer import FAdam, _loaded_step, _require_state_keys


__all__ = ["FAdam8bit"]

_FP32_STATE = torch.empty(0)  # stands for FAdam8bit's state in a check of what is stored in 16 bits


class FAdam8bit(FAdam):
    r"""FAdam (arXiv:2405.12807) with blockwise 8-bit state: m and sqrt(f) in one byte each per parameter.

    The update is :class:`hf_fadam.FAdam`'s, computed in fp32: each step dequantizes the two states, runs FAdam's
    exact math (per-tensor RMS values over the whole tensor, adaptive ε, both clips, Fisher-preconditioned weight
    decay), and requantizes them with new per-block scales. θ itself is updated from the fp32 values, so only the
    *history* carried from one step to the next is rounded.

    Storage (see :mod:`hf_fadam._quant` for the maps and why they were chosen): each tensor is cut into blocks of
    ``block_size`` elements in its flat order; per block one float32 scale per state, per element

    * ``exp_avg``: an ``int8`` code of m: sign + a 3-exponent-bit, 4-mantissa-bit minifloat of ``|m| / scale``
      (relative rounding error ≤ 3.1 % over 7 binades below the block's absmax);
    * ``fisher_sqrt``: a ``uint8`` code of s = sqrt(f): a 4+4-bit minifloat of ``s / scale`` (≤ 3.1 % relative
      error on s, i.e. on FAdam's denominator D = sqrt(f) + ε̂, over 15 binades of s = 30 of f).

    That is ``2 + 8 / block_size`` bytes per parameter (2.03 at the default 256) against FAdam's 8 (fp32 state).
    Tensors with fewer than ``min_8bit_size`` elements (biases, norms: a negligible share of the parameters, but the
    most sensitive ones) keep fp32 ``exp_avg`` and ``fisher`` exactly as :class:`FAdam` does.

    Args:
        params, lr, betas, eps, weight_decay, clip, p, maximize, foreach, fused: as :class:`hf_fadam.FAdam`.
            ``fused=True`` runs the C kernel on CPU and the Triton kernel on CUDA, and unscales AMP gradients inside
            the step; by default the fused kernel is used where available, else the foreach reference.
        block_size (int, default 256): elements per quantization block, a power of two in [32, 4096]. Smaller
            blocks follow the local magnitude more closely and cost 8 / block_size bytes per parameter of scales.
        min_8bit_size (int, default 4096): tensors with fewer elements keep fp32 state.
        gradient_release (bool, default False): as :class:`hf_fadam.FAdam`: step each parameter inside backward as
            soon as its gradient is accumulated, and free the gradient (:mod:`hf_fadam._release`).
        allow_flat_shards (bool, default False): as :class:`hf_fadam.FAdam`: accept FSDP1 flat parameters or shard
            views (per-shard RMS); without it they raise ``RuntimeError``.

    State per parameter: ``step`` (0-d float32); for quantized tensors ``exp_avg`` (int8, the param's shape),
    ``exp_avg_scale`` (float32, ``(num_blocks,)``), ``fisher_sqrt`` (uint8) and ``fisher_sqrt_scale`` (float32);
    otherwise ``exp_avg`` and ``fisher`` (float32). ``state_dict()``/``load_state_dict`` keep the codes and scales
    as they are (bit-exact resume); a state dict of :class:`FAdam` loads too (its fp32 state is quantized).

    DDP: the state is replicated and every rank steps identically. DTensor parameters (FSDP2, HSDP, TP): each rank
    steps its local shard with its own blocks (cut in the shard's flat order), and every RMS is over the whole
    logical tensor through the sharded path's all-reduce (two per step and sharding layout). The state is DTensors,
    so ``torch.distributed.checkpoint`` (DCP, ``get_state_dict``/``set_state_dict``) and a per-rank
    ``torch.save(optimizer.state_dict())`` save and restore every rank's part: the codes (and the fp32 state of
    small tensors) are placed like the param; each scale tensor has the logical shape (the param's sharded dims,
    ``ceil(rest / block_size)``), sharded like the param (or, where ``rest`` is under half a block, one even part
    per rank), of which a rank uses the first ``num_blocks(shard)`` slots; ``shard_layout`` (int64) records
    ``block_size`` and the sharding the blocks were cut for. Resuming with the same shards (the same mesh sizes and
    placements; HSDP replicas may differ) is bit-exact. Blocks cut for other shards cannot be resharded exactly, so
    a load into another world size or sharding is refused with a ``ValueError`` that says how to go through
    :class:`FAdam`'s fp32 state instead (docs/8bit.md); a per-rank save of earlier versions (plain local tensors)
    still loads at its own world size.
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
        block_size: int = 256,
        min_8bit_size: int = 4096,
        param_rounding: str = "auto",
        gradient_release: bool = False,
        allow_flat_shards: bool = False,
    ) -> None:
        _check_block_size(block_size)
        _check_min_size(min_8bit_size)
        self._init_8bit = dict(block_size=block_size, min_8bit_size=min_8bit_size)
        super().__init__(
            params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, clip=clip, p=p, maximize=maximize,
            foreach=foreach, fused=fused, param_rounding=param_rounding, gradient_release=gradient_release,
            allow_flat_shards=allow_flat_shards,
        )  # fmt: skip
        self.defaults.update(self._init_8bit)
        for group in self.param_groups:
            for key, value in self._init_8bit.items():
                group.setdefault(key, value)
            _check_8bit_settings(group)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        extra = getattr(self, "_init_8bit", None) or {}
        for key, value in extra.items():
            param_group.setdefault(key, value)
        _check_8bit_settings(param_group)
        super().add_param_group(param_group)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("block_size", 256)
            group.setdefault("min_8bit_size", 4096)

    def _quantized(self, param: Tensor, group: dict[str, Any]) -> bool:
        return param.numel() >= group["min_8bit_size"]

    def _init_group_8bit(
        self, group: dict[str, Any], lists: dict[str, list], stream0: int, indices: tuple[int, ...] | None = None
    ) -> None:
        params = group["params"]
        for j in range(len(params)) if indices is None else indices:
            param = params[j]
            grad = param.grad
            if grad is None:
                continue
            if grad.is_sparse:
                raise RuntimeError("FAdam8bit does not support sparse gradients; use a dense gradient layout")
            layout = None
            local = param
            if _is_dtensor(param):
                # FSDP2/TP: step the local shard (its own quantization blocks), with the RMS of the whole logical
                # tensor: logical numel, and the sharded path's all-reduce as the reduce hook.
                from . import _sharded

                # (8-bit state: no 16-bit store of its own; a 16-bit param's stochastic rounding is refused)
                _sharded.refuse_random_stores([param], [_FP32_STATE], _rounding_8bit(group))
                if grad.placements != param.placements:
                    grad = _sharded._grad_like_param(grad, param)
                layout = (param.device_mesh, _sharded.sharded_dims(param))
                local, grad = param.to_local(), grad.to_local()
            state = self.state[param]
            if len(state) == 0:
                refuse_fsdp1_flat(self, param)  # wrapped by FSDP1 after this optimizer was built
                dev = local.device
                state["step"] = torch.zeros((), dtype=torch.float32, device=dev)
                if self._quantized(param, group):  # decided on the logical size: the same on every rank
                    nb = num_blocks(local.numel(), group["block_size"])
                    state["exp_avg"] = torch.zeros(local.shape, dtype=torch.int8, device=dev)
                    state["exp_avg_scale"] = torch.zeros(nb, dtype=torch.float32, device=dev)
                    state["fisher_sqrt"] = torch.zeros(local.shape, dtype=torch.uint8, device=dev)
                    state["fisher_sqrt_scale"] = torch.zeros(nb, dtype=torch.float32, device=dev)
                else:
                    state["exp_avg"] = torch.zeros(local.shape, dtype=torch.float32, device=dev)
                    state["fisher"] = torch.zeros(local.shape, dtype=torch.float32, device=dev)
                if layout is not None:  # kept as DTensors, which torch.distributed.checkpoint saves per shard
                    state.update(_sharded.sharded_8bit_state(param, state, group["block_size"]))
            quant = "fisher_sqrt" in state
            if layout is None:
                m, f = state["exp_avg"], state["fisher_sqrt" if quant else "fisher"]
                m_scale, f_scale = (state["exp_avg_scale"], state["fisher_sqrt_scale"]) if quant else (None, None)
            else:  # this rank's codes and its blocks' scales (views of the DTensors' local tensors)
                m, f, m_scale, f_scale = _sharded.local_8bit_state(param, state, group["block_size"], stream0 + j)
            lists["layouts"].append(layout)
            lists["numels"].append(param.numel())
            lists["params"].append(local)
            lists["grads"].append(grad)
            lists["exp_avgs"].append(m)
            lists["fishers"].append(f)
            lists["exp_avg_scales"].append(m_scale)
            lists["fisher_scales"].append(f_scale)
            lists["state_steps"].append(state["step"])
            lists["streams"].append(stream0 + j)
            kahan = resolve_param_rounding(_rounding_8bit(group), local.dtype) == "kahan"
            if kahan and "param_comp" not in state:  # what rounding θ to its 16-bit dtype dropped, added back
                state["param_comp"] = _like_param(torch.zeros_like(local), param)
            comp = state["param_comp"] if kahan else None
            lists["comps"].append(getattr(comp, "_local_tensor", comp))

    def _step_group(
        self,
        group: dict[str, Any],
        stream0: int,
        grad_scale: Tensor | None,
        found_inf: Tensor | None,
        indices: tuple[int, ...] | None = None,
    ) -> None:
        """Step the parameters of ``group`` that have a gradient (only those at ``indices`` if given)."""
        names = ("params", "grads", "exp_avgs", "fishers", "exp_avg_scales", "fisher_scales", "state_steps")
        lists: dict[str, list] = {name: [] for name in (*names, "layouts", "numels", "streams", "comps")}
        self._init_group_8bit(group, lists, stream0, indices)
        # One call per sharding layout (the plain tensors first), in param order: the same on every rank.
        calls: dict[Any, list[int]] = {}
        for i, layout in enumerate(lists["layouts"]):
            calls.setdefault(None if layout is None else (id(layout[0]), layout[1]), []).append(i)
        for key, index in calls.items():
            reduce = numels = None
            if key is not None:
                from ._sharded import make_reduce

                mesh, dims = lists["layouts"][index[0]]
                reduce = make_reduce(mesh, dims)
                numels = [lists["numels"][i] for i in index]
            comps = [lists["comps"][i] for i in index]
            self._step_lists(group, [[lists[name][i] for i in index] for name in names], grad_scale,
                             found_inf, numels, reduce,
                             [lists["streams"][i] for i in index],
                             comps if any(c is not None for c in comps) else None)  # fmt: skip

    def _step_lists(
        self,
        group: dict[str, Any],
        tensor_lists: list[list],
        grad_scale: Tensor | None,
        found_inf: Tensor | None,
        numels: list[int] | None,
        reduce: Callable[[Tensor], object] | None,
        streams: list[int],
        param_comps: list[Tensor | None] | None = None,
    ) -> None:
        fadam8bit(
            *tensor_lists,
            numels=numels,
            reduce=reduce,
            streams=streams,
            block_size=group["block_size"],
            foreach=group["foreach"],
            fused=group["fused"],
            grad_scale=grad_scale,
            found_inf=found_inf,
            **group_hyperparameters(group),
            param_rounding=_rounding_8bit(group),
            param_comps=param_comps,
        )

    def _group_rounding(self, group: dict[str, Any]) -> str:
        return _rounding_8bit(group)

    def describe_implementation(self) -> str:
        """The implementation ``step`` runs, e.g. ``"fused (C kernel, cpu), 8-bit state (block_size 256)"``."""
        answers: dict[int, str] = {}
        for index, group in enumerate(self.param_groups):
            params = [p.to_local() if _is_dtensor(p) else p for p in group["params"] if isinstance(p, Tensor)]
            if not params:
                continue
            impl = resolve_implementation_8bit(params, group["foreach"], group["fused"])
            if impl == "fused":
                devices = sorted({p.device.type for p in params})
                kernel = "Triton" if "cuda" in devices or _triton_backend_on_cpu() else "C kernel"
                impl = f"fused ({kernel}, {', '.join(devices)})"
            elif impl == "forloop":
                impl = "for-loop reference"
            answers[index] = f"{impl}, 8-bit state (block_size {group['block_size']})"
        if len(set(answers.values())) <= 1:
            return next(iter(answers.values()), "no parameters")
        return "; ".join(f"group {i}: {answer}" for i, answer in answers.items())

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load state keeping every tensor's dtype: codes stay int8/uint8, scales and fp32 state float32; check it.

        The tensors are copied onto the parameter's device. A state from :class:`FAdam` (fp32 ``exp_avg`` and
        ``fisher``) is quantized for the tensors that this optimizer keeps in 8 bits, with this optimizer's
        ``block_size`` and ``min_8bit_size`` (a FAdam8bit state dict brings its own, as torch restores every
        hyperparameter). Nothing reaches the kernels unchecked: every code and scale tensor must have the dtype and
        element count its parameter and ``block_size`` need (``ValueError`` naming the entry otherwise; a
        block_size that does not match the saved scales is one). ``step`` comes back as a float32 tensor, also from
        an older checkpoint that saved a Python number. Under FSDP2/TP the 8-bit state (DTensors, from DCP or a
        per-rank save) must have been cut for the same shards (its ``shard_layout``; a load for another world size or
        sharding raises ``ValueError``), a per-rank save of earlier versions (plain local tensors) is each rank's own
        shard, and a FAdam state dict's DTensor state must be placed like its parameter (it is quantized per local
        shard).

        torch's hook contract holds as for :meth:`FAdam.load_state_dict`: pre-hooks see (and may edit) the whole
        ``state_dict`` before it is loaded; post-hooks run once ``self.state`` holds the loaded state.
        """
        super().load_state_dict(state_dict)

    def _loaded_group(self, saved: dict[str, Any], current: dict[str, Any]) -> dict[str, Any]:
        # A group saved without the 8-bit settings (a FAdam state dict) keeps this optimizer's (the base merge).
        group = super()._loaded_group(saved, current)
        _check_8bit_settings(group)
        return group

    def _loaded_state(self, param: Tensor, group: dict[str, Any], saved: dict[str, Any], key: Any) -> dict[str, Any]:
        who = "FAdam8bit.load_state_dict"
        shard = param.to_local() if _is_dtensor(param) else param  # a DTensor param keeps its local shard's state
        dev = shard.device
        state = dict(saved)
        if "step" in state:
            state["step"] = _loaded_step(who, state["step"], dev, key)
        if "fisher_sqrt" in state:
            _require_state_keys(who, state, key, _QUANT_KEYS)
            from ._sharded import loaded_8bit_local

            # DTensor state (DCP, a per-rank save): this rank's codes and scales, if cut for the same shards
            state.update(loaded_8bit_local(who, key, param, state, group["block_size"]))
            for name in _QUANT_KEYS[1:]:
                t = state[name]
                if isinstance(t, Tensor):
                    state[name] = t.to(device=dev, memory_format=torch.contiguous_format, copy=True)
            check_8bit_state(who, key, shard, state["exp_avg"], state["fisher_sqrt"], state["exp_avg_scale"],
                             state["fisher_sqrt_scale"], group["block_size"])  # fmt: skip
        elif "fisher" in state:
            _require_state_keys(who, state, key, ("step", "exp_avg", "fisher"))
            for name in ("exp_avg", "fisher"):  # a DTensor state (FAdam's) is checked against the DTensor param
                check_fp_state(who, name, key, state[name], param if _is_dtensor(state[name]) else shard)
            m = _local_state(state["exp_avg"], param, "exp_avg").to(device=dev, dtype=torch.float32, copy=True)
            f = _local_state(state["fisher"], param, "fisher").to(device=dev, dtype=torch.float32, copy=True)
            if self._quantized(param, group):
                bs = group["block_size"]
                del state["fisher"]
                state["exp_avg"], state["exp_avg_scale"] = quantize_blockwise(m, bs, signed=True)
                state["fisher_sqrt"], state["fisher_sqrt_scale"] = quantize_blockwise(f.sqrt(), bs, signed=False)
            else:
                state["exp_avg"], state["fisher"] = m.contiguous(), f.contiguous()
            check_8bit_state(who, key, shard, state["exp_avg"], state.get("fisher_sqrt", state.get("fisher")),
                             state.get("exp_avg_scale"), state.get("fisher_sqrt_scale"), group["block_size"])  # fmt: skip
        else:
            _require_state_keys(who, state, key, ("step", "exp_avg", "fisher_sqrt"))
        if _is_dtensor(param) and "exp_avg" in state:  # checked local tensors -> DTensors (and shard_layout)
            from ._sharded import sharded_8bit_state

            state = sharded_8bit_state(param, state, group["block_size"])
        if "param_comp" in state:  # the Kahan residual: the param's dtype and shape (a DTensor param: a DTensor)
            comp = state["param_comp"]
            check_fp_state(who, "param_comp", key, comp, param if _is_dtensor(comp) else shard)
            comp = _local_state(comp, param, "param_comp").to(dtype=shard.dtype, device=dev, copy=True)
            state["param_comp"] = _like_param(comp, param)
        return state


def _like_param(local: Tensor, param: Tensor) -> Tensor:
    """``local`` as a DTensor placed like ``param`` (its local shard), so that DCP saves every rank's; else itself."""
    if not _is_dtensor(param):
        return local
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local, param.device_mesh, param.placements, run_check=False, shape=param.shape,
                              stride=param.stride())  # fmt: skip


def _rounding_8bit(group: dict[str, Any]) -> str:
    """The group's ``param_rounding`` with FAdam8bit's meaning of ``"auto"`` (:data:`AUTO_16BIT_8BIT`)."""
    mode = group["param_rounding"]
    return AUTO_16BIT_8BIT if mode == "auto" else mode


_QUANT_KEYS = ("step", "exp_avg", "exp_avg_scale", "fisher_sqrt", "fisher_sqrt_scale")
_EIGHT_BIT_KEYS = ("block_size", "min_8bit_size")


def _local_state(t: Tensor, param: Tensor, name: str) -> Tensor:
    """A saved fp32 state tensor as FAdam8bit keeps it: the local shard when ``param`` is a DTensor.

    :class:`FAdam`'s sharded state is DTensors placed like their param; FAdam8bit's is their local shard, so a
    DTensor state must be placed like the param (otherwise its local shard is some other part of the tensor).
    """
    if not _is_dtensor(t):
        return t
    from ._sharded import _placed_like

    if not _is_dtensor(param) or not _placed_like(t, param._spec):
        placed = f"{tuple(param.placements)} on {param.device_mesh}" if _is_dtensor(param) else "a plain tensor"
        raise ValueError(
            f"FAdam8bit.load_state_dict: state {name!r} is a DTensor with placements {tuple(t.placements)} on "
            f"{t.device_mesh}, but its parameter is {placed}"
        )
    return t.to_local()


def _check_8bit_settings(group: dict[str, Any]) -> None:
    """Validate a param group's ``block_size`` and ``min_8bit_size``, where it has them."""
    if "block_size" in group:
        _check_block_size(group["block_size"])
    if "min_8bit_size" in group:
        _check_min_size(group["min_8bit_size"])
