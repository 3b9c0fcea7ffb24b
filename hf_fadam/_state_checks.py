r"""What a kernel accepts as optimizer state: one set of checks for every state tensor that can reach a kernel.

State reaches the kernels from three places: the optimizers' lazy initialization, ``load_state_dict`` (a checkpoint,
possibly downloaded from the Hub) and a user's own hands (``optimizer.state[p]["exp_avg"] = ...``,
``optimizer.param_groups[i]["block_size"] = ...``). The C and Triton kernels trust every size and dtype they are
given: a float16 buffer of 8-bit scales, or a scale count made for another ``block_size``, is written past its end
(heap corruption), and a count that happens to fit decodes the state with the wrong scales. So each state tensor is
checked against its parameter here, when it is loaded and before every kernel call, and a mismatch is a
``ValueError`` that names the state entry, what it is and what it must be.

* :func:`check_8bit_state`: FAdam8bit's per-tensor state: int8 codes of m and uint8 codes of sqrt(f) with one
  element per parameter element, float32 contiguous scales with one per block of ``block_size`` (or float32 ``m`` and
  ``f`` for a tensor below ``min_8bit_size``), all on the parameter's device.
* :func:`check_fp_state`: one floating-point state tensor of FAdam (``exp_avg``, ``fisher``): the parameter's shape.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._quant import num_blocks


__all__ = ["MAX_BLOCK", "check_8bit_state", "check_block_size", "check_fp_state", "check_min_8bit_size"]

_CODES = (("exp_avg", torch.int8), ("fisher_sqrt", torch.uint8))
_SCALES = ("exp_avg_scale", "fisher_sqrt_scale")
_FP32 = (("exp_avg", torch.float32), ("fisher", torch.float32))


def _describe(t: object) -> str:
    if not isinstance(t, Tensor):
        return f"a {type(t).__name__}"
    return f"{t.dtype} on {t.device} with {t.numel()} elements"


def check_8bit_state(
    who: str,
    index: int | str,
    param: Tensor,
    exp_avg: Tensor,
    fisher: Tensor,
    exp_avg_scale: Tensor | None,
    fisher_scale: Tensor | None,
    block_size: int,
) -> None:
    """Raise ``ValueError`` unless the state of ``param`` (a plain tensor: a DTensor's local shard) fits it.

    Quantized (``fisher_scale`` given): ``exp_avg`` int8 and ``fisher`` (the codes of sqrt(f)) uint8 with
    ``param.numel()`` elements each; both scales float32, contiguous, ``num_blocks(param.numel(), block_size)``
    elements each. Otherwise ``exp_avg`` and ``fisher`` float32 with ``param.numel()`` elements and no scales. Every
    tensor on ``param``'s device. ``who`` names the caller and ``index`` the tensor in the messages.
    """
    n = param.numel()
    device = param.device
    if fisher_scale is None:
        if exp_avg_scale is not None:
            raise ValueError(
                f"{who}: tensor {index} has an 'exp_avg_scale' but no 'fisher_sqrt_scale'; 8-bit state needs both"
            )
        expected = ((name, t, dtype, n, False) for (name, dtype), t in zip(_FP32, (exp_avg, fisher)))
    else:
        nb = num_blocks(n, block_size)
        expected = (
            *((name, t, dtype, n, False) for (name, dtype), t in zip(_CODES, (exp_avg, fisher))),
            *((name, t, torch.float32, nb, True) for name, t in zip(_SCALES, (exp_avg_scale, fisher_scale))),
        )
    for name, t, dtype, count, contiguous in expected:
        ok = isinstance(t, Tensor) and t.dtype == dtype and t.device == device and (t.is_contiguous() or not contiguous)
        if not ok:
            layout = ", contiguous" if contiguous else ""
            raise ValueError(
                f"{who}: state {name!r} of tensor {index} is {_describe(t)}; it must be {dtype} on {device}{layout} "
                f"with {count} elements (a corrupted or foreign checkpoint?)"
            )
        if t.numel() != count:
            if contiguous:  # a scale count: the blocks were cut with another block_size
                raise ValueError(
                    f"{who}: state {name!r} of tensor {index} has {t.numel()} scales, but block_size={block_size} "
                    f"needs {count} for its {n} elements: the state was quantized with another block_size (a "
                    "checkpoint saved with another one, or param_groups[i]['block_size'] changed after the state "
                    "was created); use the block_size the state was made with."
                )
            raise ValueError(
                f"{who}: state {name!r} of tensor {index} has {t.numel()} elements for a parameter of {n}; it "
                "belongs to another parameter (a checkpoint of another model, or another world size?)"
            )


def check_fp_state(who: str, name: str, index: int | str, state: object, param: Tensor) -> None:
    """Raise ``ValueError`` unless ``state`` is a real floating-point tensor shaped like ``param`` (FAdam's
    ``exp_avg``/``fisher``; for a DTensor param, the logical shapes are compared)."""
    if not isinstance(state, Tensor) or not state.is_floating_point() or state.is_complex():
        raise ValueError(
            f"{who}: state {name!r} of parameter {index} is {_describe(state)}; it must be a floating-point tensor "
            f"of the parameter's shape {tuple(param.shape)}"
        )
    if state.shape != param.shape:
        raise ValueError(
            f"{who}: state {name!r} of parameter {index} has shape {tuple(state.shape)}, but its parameter has shape "
            f"{tuple(param.shape)}; it belongs to another parameter (a checkpoint of another model?)"
        )


#: The largest FAdam8bit block (the kernels' per-block scratch is sized for it).
MAX_BLOCK = 4096


def check_block_size(block_size: object) -> None:
    """FAdam8bit's ``block_size``: a power of two in [32, MAX_BLOCK] (``ValueError`` naming the value otherwise)."""
    ok = isinstance(block_size, int) and not isinstance(block_size, bool)
    if not ok or not 32 <= block_size <= MAX_BLOCK or block_size & (block_size - 1):
        raise ValueError(f"Invalid block_size: {block_size!r}; it must be a power of two in [32, {MAX_BLOCK}]")


def check_min_8bit_size(min_8bit_size: object) -> None:
    """FAdam8bit's ``min_8bit_size``: an integer >= 0."""
    ok = isinstance(min_8bit_size, int) and not isinstance(min_8bit_size, bool)
    if not ok or min_8bit_size < 0:
        raise ValueError(f"Invalid min_8bit_size: {min_8bit_size!r}; it must be an integer >= 0")
