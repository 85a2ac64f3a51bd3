"""Stand-in of flashlib.primitives.kmeans.triton.assign (flashlib 0.4.0): same signature
of euclid_assign_triton (it ranks ||c||^2 - 2 x.c, so it takes no x_sq)."""
from typing import Optional

import torch

from _peer_stand_in import STAND_IN, assign, check  # noqa: F401


def euclid_assign_triton(
    x: torch.Tensor,
    centroids: torch.Tensor,
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
    check(x, centroids, None, out, c_sq)
    return assign(x, centroids, out, c_sq)
