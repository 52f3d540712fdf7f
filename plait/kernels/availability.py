"""Whether the Triton kernels can run on a device.

On CUDA they compile; on the CPU they run only under Triton's interpreter, which
`TRITON_INTERPRET=1` selects when a kernel is decorated (at import of the kernel modules).
Everywhere else plait keeps the pure-PyTorch reference path.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os

import torch


@functools.cache
def triton_importable() -> bool:
    """Whether `import triton` works here (it is an optional dependency)."""
    try:
        # Imported only to see whether it imports: triton is optional. (By name, so that no
        # unused-import fix can drop it again, as one did to plain `import` lines here.)
        importlib.import_module("triton.language")
    except Exception:  # noqa: BLE001 - a broken install (missing libs, version clash) counts as absent
        return False
    return True


def interpreter_enabled() -> bool:
    """Whether TRITON_INTERPRET asks for the interpreter (read the way triton reads it)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def triton_usable(device: torch.device | str) -> bool:
    """True on CUDA when triton imports, or on the CPU when TRITON_INTERPRET=1 and triton imports.

    Never raises: a bad device string or a broken triton install answers False.
    """
    try:
        kind = torch.device(device).type
        if kind == "cuda":
            return torch.cuda.is_available() and triton_importable()
        if kind == "cpu":
            return interpreter_enabled() and triton_importable()
    except Exception:  # noqa: BLE001 - "never raises" is the contract
        return False
    return False


def kernel_device_types() -> frozenset[str]:
    """Device types on which kernels decorated *now* can run.

    Called once by each kernel module at import, when its @triton.jit decorators run:
    under the interpreter they run on CPU tensors, compiled they need CUDA. Fixing the
    answer at import keeps it consistent with how the kernels were built even if
    TRITON_INTERPRET changes later, and makes the dispatch a constant lookup that
    torch.compile folds away.
    """
    if not triton_importable():
        return frozenset()
    if interpreter_enabled():
        return frozenset({"cpu"})
    return frozenset({"cuda"}) if torch.cuda.is_available() else frozenset()


def num_warps_for(block: int) -> int:
    """Warps for a program that handles `block` elements of one row at a time.

    About 256 elements per warp (8 per thread), capped at 16: enough parallelism to hide
    memory latency on a row of 2048-8192 without leaving most threads idle on a row of 768.
    """
    return max(1, min(16, block // 256))


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def reduction_programs(device: torch.device, rows: int) -> int:
    """How many programs share `rows` when each keeps a partial sum (a weight gradient).

    Two per SM on CUDA fills the GPU while the partial sums stay few ([programs, cols]
    fp32); the interpreter runs programs one after another, so a handful is enough.
    """
    if device.type == "cuda":
        target = 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    else:
        target = 4
    return max(1, min(rows, target))


def on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """Where a kernel launch must happen: Triton launches on the *current* CUDA device, not on
    the device of the tensors it is given, so a rank whose current device differs would fail."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
