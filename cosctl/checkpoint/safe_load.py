"""Loading checkpoint files without running pickled code (docs/design.md §6).

A checkpoint is read back from a store that other people and programs can write to; `torch.load` with
`weights_only=False` (what DeepSpeed's own loaders, its universal conversion and its universal load
pass) runs whatever a pickle's `__reduce__` names. Every resume path therefore loads with
`weights_only=True`, allowing tensors, plain containers and the few DeepSpeed types a ZeRO state holds:

    load_weights_only(path)       one file (DeepSpeed's checkpoint engine `load`, our own reads)
    with weights_only_loads():    every `torch.load` inside, whatever it asks for (DeepSpeed's
                                  `ds_to_universal` and its ZeRO-3 universal load call `torch.load`
                                  directly, in this process: the conversion runs with one worker)

A file that holds anything else is refused with a `CheckpointError` naming it; nothing is executed.
Manifests already vouch for the bytes (every file is re-hashed before it is loaded); this guards
against what those bytes would do.
"""

from __future__ import annotations

import contextlib
import pickle
from collections.abc import Iterator

import torch

from ..common.errors import CheckpointError


def _allowed_globals() -> list:
    """DeepSpeed types its ZeRO states pickle (stage enum, loss scalers, ZeRO-1/2 partition
    bookkeeping); everything else beyond tensors and containers is refused."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


_torch_load = torch.load  # the real one, also while `weights_only_loads` has replaced torch.load


def load_weights_only(path, map_location=None, **kwargs):
    """`torch.load(path)` with `weights_only=True` (whatever `kwargs` ask) and DeepSpeed's few types
    allowed; a file holding anything else raises a one-line CheckpointError naming it."""
    kwargs.pop("weights_only", None)
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            return _torch_load(path, map_location=map_location, weights_only=True, **kwargs)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path}: refused to load: it holds pickled objects other than tensors ({_why(err)})"
        ) from None


def _why(err: Exception) -> str:
    """The line of torch's weights-only error that names what was refused (it is many lines long)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    named = [line for line in lines if "Unsupported" in line or "WeightsUnpickler error" in line]
    return (named or lines or [type(err).__name__])[0].removeprefix("WeightsUnpickler error: ")[:200]


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Within this block every `torch.load` in the process (DeepSpeed's included) loads weights only.
    Not re-entrant across threads: used around a resume, before any data-loading worker starts."""
    previous = torch.load
    torch.load = load_weights_only
    try:
        yield
    finally:
        torch.load = previous
