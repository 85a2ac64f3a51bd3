"""Which GPU backends have passed the GPU acceptance run, and on which architectures.

``backend="auto"`` picks a GPU backend on a CUDA device only when that device's
architecture is listed here. Each entry is added from committed results of
``python -m simvq_kernels.bench --preset gpu`` under benchmarks/results/ (the file is
named beside it); until a backend has passed there, "auto" runs 'chunked' on CUDA
tensors and ``backend="cuda"`` / ``backend="triton"`` must be asked for explicitly.
"""
from __future__ import annotations

import torch

# backend name -> architectures ("sm_90", "sm_80", ...) where the acceptance run passed,
# with the results file that shows it.
GPU_VALIDATED: dict[str, tuple[str, ...]] = {
    "cuda": (),    # no GPU run yet
    "triton": (),  # no GPU run yet
}
RESULTS: dict[str, str] = {}


def arch_of(device: torch.device) -> str:
    """"sm_90" etc. for a CUDA device, or "unknown" where no GPU can be queried."""
    try:
        major, minor = torch.cuda.get_device_capability(device)
    except (RuntimeError, AssertionError, ValueError):  # no driver / no such device
        return "unknown"
    return f"sm_{major}{minor}"


def validated_on(name: str, device: torch.device) -> bool:
    """True if backend ``name`` passed the GPU acceptance run on ``device``'s arch.
    Asks the device only when some architecture is recorded for ``name``."""
    if device.type != "cuda":
        return True
    archs = GPU_VALIDATED.get(name, ())
    return bool(archs) and arch_of(device) in archs


def status(name: str) -> str:
    archs = GPU_VALIDATED.get(name, ())
    if not archs:
        return "not yet validated on a GPU: 'auto' does not pick it; ask for it by name"
    return "validated on " + ", ".join(archs) + " (picked by 'auto' there)"
