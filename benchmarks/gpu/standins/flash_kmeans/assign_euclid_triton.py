"""Stand-in of flash_kmeans.assign_euclid_triton (flash-kmeans 0.3.1): same signature."""
from typing import Optional

import torch

from _peer_stand_in import STAND_IN, assign, check  # noqa: F401


def euclid_assign_triton(
    x: torch.Tensor,
    centroids: torch.Tensor,
    x_sq: torch.Tensor,
    out: torch.Tensor = None,
    c_sq: torch.Tensor = None,
    *,
    BLOCK_N: int = 128,
    BLOCK_K: int = 128,
    num_warps: Optional[int] = None,
    num_stages: Optional[int] = None,
    config: Optional[dict] = None,
    use_heuristic: bool = True,
) -> torch.Tensor:
    check(x, centroids, x_sq, out, c_sq)
    return assign(x, centroids, out, c_sq)
