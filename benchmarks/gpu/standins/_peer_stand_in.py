"""What the stand-ins share: the nearest centroid in PyTorch, arguments checked as the
real kernels' wrappers check them."""
import torch

STAND_IN = True


def check(x, centroids, x_sq, out, c_sq):
    assert x.dim() == 3 and centroids.dim() == 3, "x (B, N, D) and centroids (B, K, D)"
    assert centroids.dtype == x.dtype, "centroids dtype mismatch"
    b, n, d = x.shape
    k = centroids.shape[1]
    assert centroids.shape == (b, k, d), "centroids shape mismatch"
    if x_sq is not None:
        assert x_sq.shape == (b, n) and x_sq.dtype == torch.float32, "x_sq (B, N) float32"
    if out is not None:
        assert out.shape == (b, n) and out.dtype == torch.int32, "out (B, N) int32"
    if c_sq is not None:
        assert c_sq.shape == (b, k) and c_sq.dtype == torch.float32, "c_sq (B, K) float32"


def assign(x, centroids, out, c_sq):
    """argmin_k ||c_k||^2 - 2 x.c_k in fp32 (the first minimum), into ``out``."""
    b, n, _ = x.shape
    if out is None:
        out = torch.empty((b, n), dtype=torch.int32, device=x.device)
    if c_sq is None:
        c_sq = centroids.float().pow(2).sum(-1)
    score = c_sq[:, None, :] - 2 * torch.bmm(x.float(), centroids.float().transpose(1, 2))
    out.copy_(score.argmin(-1).to(torch.int32))
    return out
