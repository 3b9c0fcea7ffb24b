"""FSDP1 detection: FAdam refuses FSDP1's flat parameters unless the user opts in (``allow_flat_shards=True``).

FSDP1 (``torch.distributed.fsdp.FullyShardedDataParallel``) concatenates a module's parameters into one
``FlatParameter`` and keeps only this process's slice of it. The optimizer then sees either that flat slice
(``use_orig_params=False``) or each original parameter as a 1-D view of its part of the slice, possibly empty
(``use_orig_params=True``). FAdam's three RMS values would be taken per shard instead of per whole tensor as the
paper defines them, and the update would depend on how FSDP1 cut the parameters.

torch marks both kinds of tensor: ``FlatParamHandle`` sets the attribute ``_fsdp_flattened``
(``torch.distributed.fsdp._common_utils.FSDP_FLATTENED``) on every ``FlatParameter`` and on every original
parameter it flattened, and that attribute stays on the original ``nn.Parameter`` objects that
``use_orig_params=True`` hands the optimizer. FSDP2 (``fully_shard``) and DeepSpeed do not set it.

Nothing here imports FSDP: if torch's FSDP1 module was never imported in this process, no tensor can have been
flattened by it, so the check is one ``sys.modules`` lookup.
"""

from __future__ import annotations

import sys
from typing import Any

from torch import Tensor


__all__ = ["check_allow_flat_shards", "is_fsdp1_flat", "refuse_fsdp1_flat"]

_COMMON = "torch.distributed.fsdp._common_utils"  # FSDP_FLATTENED, _is_fsdp_flattened
_FLAT_PARAM = "torch.distributed.fsdp._flat_param"  # FlatParameter


def is_fsdp1_flat(tensor: Tensor) -> bool:
    """Whether ``tensor`` is an FSDP1 ``FlatParameter`` or a parameter that FSDP1 flattened (a view of one)."""
    common = sys.modules.get(_COMMON)
    if common is None:  # FSDP1 was never imported: nothing in this process was flattened by it
        return False
    is_flattened = getattr(common, "_is_fsdp_flattened", None)
    if is_flattened is not None:
        if is_flattened(tensor):
            return True
    elif getattr(tensor, getattr(common, "FSDP_FLATTENED", "_fsdp_flattened"), False):
        return True
    flat_param = getattr(sys.modules.get(_FLAT_PARAM), "FlatParameter", None)
    return flat_param is not None and isinstance(tensor, flat_param)


def check_allow_flat_shards(value: Any) -> bool:
    """Validate the ``allow_flat_shards`` argument of the optimizers."""
    if not isinstance(value, bool):
        raise ValueError(f"Invalid allow_flat_shards: {value!r}; it must be True or False")
    return value


def refuse_fsdp1_flat(optimizer: Any, param: Tensor) -> None:
    """Raise ``RuntimeError`` if ``param`` comes from FSDP1 and ``optimizer`` was not built with allow_flat_shards."""
    if getattr(optimizer, "allow_flat_shards", False) or not is_fsdp1_flat(param):
        return
    name = type(optimizer).__name__
    raise RuntimeError(
        f"{name} refuses FSDP1 (FullyShardedDataParallel) parameters: FSDP1 hands the optimizer flat parameters or "
        f"1-D views of this process's shard (this one has shape {tuple(param.shape)}), so {name} would take its RMS "
        f"values (adaptive epsilon, both clips) per shard instead of per whole tensor as the paper defines them, and "
        f"the update would depend on how FSDP1 cuts the parameters. Use FSDP2 (torch.distributed.fsdp.fully_shard), "
        f"which {name} handles exactly, or pass allow_flat_shards=True to {name}(...) to accept per-shard RMS."
    )
