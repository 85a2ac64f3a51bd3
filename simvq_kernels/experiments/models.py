"""Small convolutional VQ autoencoders and a plain-VQ baseline quantiser.

Both quantisers share one interface, ``out, indices, loss = q(z)`` on channel-first
latents, one loss and one straight-through estimator (the functions of
:mod:`simvq_kernels.nn` that :class:`simvq_kernels.SimVQ` itself uses), and one
nearest-code search (:func:`simvq_kernels.nearest_code`, which never builds N x K).
The only difference is how the codebook is parameterised:

- :class:`PlainVQ`: a learned ``nn.Embedding(K, d)`` codebook (standard VQ-VAE /
  taming-transformers quantiser). Only the picked codes get a gradient.
- :class:`simvq_kernels.SimVQ`: ``Q = B W^T + b`` over a frozen random basis B.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import nn as sk_nn
from .. import ops

QUANTISERS = ("plain", "simvq")
#: the quantisers a demo can compare (``--quantisers``): the two of the default run, our
#: layer with the rotation trick, and vector-quantize-pytorch's ``SimVQ`` with its
#: defaults (the rotation trick) and with the straight-through estimator
ALL_QUANTISERS = ("plain", "simvq", "simvq_rot", "vqp", "vqp_ste")
LABELS = {"plain": "plain VQ", "simvq": "SimVQ",
          "simvq_rot": "SimVQ + rotation trick",
          "vqp": "vq-pytorch SimVQ (defaults: rotation trick)",
          "vqp_ste": "vq-pytorch SimVQ (straight-through)"}
#: the quantisers that need vector-quantize-pytorch
NEEDS_VQP = ("vqp", "vqp_ste")
PLAIN_INITS = ("uniform", "normal")


def unavailable_reason(kind: str) -> str | None:
    """None if quantiser ``kind`` can be built here, else why not (one line)."""
    if kind not in ALL_QUANTISERS:
        return f"unknown quantiser {kind!r}; choose from {', '.join(ALL_QUANTISERS)}"
    if kind in NEEDS_VQP:
        try:
            import vector_quantize_pytorch  # noqa: F401
        except ImportError as e:
            return (f"quantiser {kind!r} needs vector-quantize-pytorch "
                    f"(pip install vector-quantize-pytorch): {e}")
    return None


class PlainVQ(nn.Module):
    """Standard VQ-VAE quantiser with a learned codebook (``nn.Embedding(K, dim)``).

    Args:
        dim, codebook_size, beta, legacy, channel_first, backend: as in
            :class:`simvq_kernels.SimVQ` (same loss, same straight-through estimator).
        init: ``"uniform"`` (default): U(-1/K, 1/K), the initialisation of
            taming-transformers' ``VectorQuantizer`` (VQGAN, the baseline of the SimVQ
            paper); ``"normal"``: N(0, 1), ``nn.Embedding``'s default.

    No dead-code restarts, no EMA, no l2 normalisation: the plain baseline.
    """

    def __init__(self, dim: int, codebook_size: int, beta: float = 0.25,
                 legacy: bool = False, channel_first: bool = False,
                 init: str = "uniform", backend: str = "auto"):
        super().__init__()
        if init not in PLAIN_INITS:
            raise ValueError(f"`init` must be one of {PLAIN_INITS}, got {init!r}")
        self.dim, self.codebook_size = dim, codebook_size
        self.beta, self.legacy = float(beta), bool(legacy)
        self.channel_first, self.backend, self.init = bool(channel_first), backend, init
        self.embedding = nn.Embedding(codebook_size, dim)
        if init == "uniform":
            nn.init.uniform_(self.embedding.weight, -1.0 / codebook_size, 1.0 / codebook_size)
        else:
            nn.init.normal_(self.embedding.weight)
        self.last_backend: str | None = None

    def extra_repr(self):
        return (f"dim={self.dim}, codebook_size={self.codebook_size}, beta={self.beta}, "
                f"legacy={self.legacy}, channel_first={self.channel_first}, init={self.init!r}")

    @property
    def codebook(self) -> torch.Tensor:
        return self.embedding.weight

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        codes = self.embedding(indices.long())
        return codes.movedim(-1, 1) if self.channel_first else codes

    def forward(self, z: torch.Tensor):
        x = z.movedim(1, -1) if self.channel_first else z
        if x.shape[-1] != self.dim:
            raise ValueError(f"expected {self.dim} channels, got shape {tuple(z.shape)}")
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.dim)
        found = ops.nearest_code_ex(flat.detach(), self.embedding.weight.detach(),
                                    backend=self.backend)
        self.last_backend = found.backend
        zq = F.embedding(found.indices, self.embedding.weight)  # grads to picked codes only
        loss = sk_nn.simvq_loss(flat, zq, self.beta, self.legacy)
        out = sk_nn.straight_through(flat, zq).reshape(*lead, self.dim)
        if self.channel_first:
            out = out.movedim(-1, 1)
        return out, found.indices.reshape(lead), loss


def make_quantiser(kind: str, dim: int, codebook_size: int, *, beta: float = 0.25,
                   plain_init: str = "uniform", backend: str = "auto") -> nn.Module:
    """``"plain"`` -> :class:`PlainVQ`; ``"simvq"`` -> :class:`simvq_kernels.SimVQ`
    (r = d, with bias, as in the official code); ``"simvq_rot"``: the same with
    ``rotation_trick=True``. All channel-first, legacy=False.

    ``"vqp"`` / ``"vqp_ste"``: vector-quantize-pytorch's ``SimVQ`` as a user gets it
    (its defaults: no bias, the rotation trick, its own ``torch.cdist`` search), with only
    the commitment weight set to ``beta`` (its default is 0.25 too); ``"vqp_ste"`` with
    ``rotation_trick=False``. Its frozen basis and projection are drawn like ours (same
    seed, same values). Raises ``ImportError`` when vector-quantize-pytorch is absent
    (:func:`unavailable_reason` says so beforehand)."""
    why = unavailable_reason(kind)
    if why is not None:
        raise (ValueError if kind not in ALL_QUANTISERS else ImportError)(why)
    if kind == "plain":
        return PlainVQ(dim, codebook_size, beta=beta, channel_first=True, init=plain_init,
                       backend=backend)
    if kind in ("simvq", "simvq_rot"):
        return sk_nn.SimVQ(dim, codebook_size, beta=beta, channel_first=True, backend=backend,
                           rotation_trick=kind == "simvq_rot")
    from vector_quantize_pytorch import SimVQ as VqpSimVQ
    return VqpSimVQ(dim, codebook_size, channel_first=True, rotation_trick=kind == "vqp",
                    input_to_quantize_commit_loss_weight=beta)


# ----------------------------------------------------------------- conv blocks

def _conv(nd):
    return nn.Conv1d if nd == 1 else nn.Conv2d


def _convT(nd):
    return nn.ConvTranspose1d if nd == 1 else nn.ConvTranspose2d


class ResBlock(nn.Module):
    """x + conv1x1(relu(conv3x3(relu(x)))), as in the VQ-VAE paper."""

    def __init__(self, ch: int, nd: int = 2):
        super().__init__()
        conv = _conv(nd)
        self.block = nn.Sequential(nn.ReLU(), conv(ch, ch, 3, padding=1), nn.ReLU(),
                                   conv(ch, ch, 1))

    def forward(self, x):
        return x + self.block(x)


class Encoder(nn.Module):
    """Strided convs (each /2), a res block, a 1x1 projection to ``dim`` channels.

    ``nd=2`` for images (B, C, H, W), ``nd=1`` for audio (B, C, T). Downsampling
    factor 2**n_down per spatial axis.
    """

    def __init__(self, in_ch: int, hidden: int, dim: int, n_down: int = 2, nd: int = 2,
                 n_res: int = 1, kernel: int = 4):
        super().__init__()
        conv = _conv(nd)
        layers, ch = [], in_ch
        for i in range(n_down):
            out = hidden // 2 ** (n_down - 1 - i)
            layers += [conv(ch, out, kernel, stride=2, padding=(kernel - 2) // 2), nn.ReLU()]
            ch = out
        layers += [conv(ch, hidden, 3, padding=1)]
        layers += [ResBlock(hidden, nd) for _ in range(n_res)]
        layers += [nn.ReLU(), conv(hidden, dim, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class Decoder(nn.Module):
    """Mirror of :class:`Encoder` with transposed convs."""

    def __init__(self, out_ch: int, hidden: int, dim: int, n_down: int = 2, nd: int = 2,
                 n_res: int = 1, kernel: int = 4):
        super().__init__()
        conv, convT = _conv(nd), _convT(nd)
        layers = [conv(dim, hidden, 3, padding=1)]
        layers += [ResBlock(hidden, nd) for _ in range(n_res)]
        ch = hidden
        for i in range(n_down):
            last = i == n_down - 1
            out = out_ch if last else hidden // 2 ** (i + 1)
            layers += [nn.ReLU(), convT(ch, out, kernel, stride=2, padding=(kernel - 2) // 2)]
            ch = out
        self.net = nn.Sequential(*layers)

    def forward(self, z):
        return self.net(z)


class VQAutoencoder(nn.Module):
    """encoder -> quantiser (channel-first) -> decoder.

    ``forward(x)`` returns ``(x_hat, indices, vq_loss)``; ``encode(x)`` returns the
    indices only.
    """

    def __init__(self, encoder: nn.Module, quantiser: nn.Module, decoder: nn.Module):
        super().__init__()
        self.encoder, self.quantiser, self.decoder = encoder, quantiser, decoder

    def forward(self, x):
        z = self.encoder(x)
        zq, idx, vq_loss = self.quantiser(z)
        return self.decoder(zq), idx, vq_loss

    @torch.no_grad()
    def encode(self, x):
        return self.quantiser(self.encoder(x))[1]


def build_autoencoder(kind: str, codebook_size: int, *, in_ch: int, dim: int, hidden: int,
                      n_down: int, nd: int, seed: int, n_res: int = 1, beta: float = 0.25,
                      plain_init: str = "uniform", backend: str = "auto") -> VQAutoencoder:
    """Encoder and decoder are drawn first from ``seed`` (identical for both
    quantisers), then the quantiser from its own seeded stream."""
    torch.manual_seed(seed)
    enc = Encoder(in_ch, hidden, dim, n_down, nd, n_res)
    dec = Decoder(in_ch, hidden, dim, n_down, nd, n_res)
    torch.manual_seed(seed + 1)
    q = make_quantiser(kind, dim, codebook_size, beta=beta, plain_init=plain_init,
                       backend=backend)
    return VQAutoencoder(enc, q, dec)
