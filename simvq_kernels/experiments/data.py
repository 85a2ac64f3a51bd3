"""Data for the collapse experiments, built without any download.

Images: random crops of the natural images bundled with scikit-image (``skimage.data``),
with a spatially held-out strip of every image for evaluation.

Audio: deterministic synthetic speech-like waveforms (a source-filter synthesiser:
glottal pulse trains with a moving pitch through time-varying formant resonators, with
noise bursts for fricatives and plosives and pauses between words). Nothing is
downloaded and no text-to-speech engine is needed; the same seed gives the same audio
on every machine (numpy's PCG64 stream).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

# ---------------------------------------------------------------------------- images

#: RGB photographs bundled with scikit-image (no pooch download needed).
RGB_IMAGES = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "retina",
              "immunohistochemistry", "stereo_motorcycle")
#: Greyscale photographs and textures bundled with scikit-image (replicated to 3 channels).
GREY_IMAGES = ("camera", "moon", "coins", "clock", "grass", "gravel", "brick", "cell")
DEFAULT_IMAGES = RGB_IMAGES + GREY_IMAGES


def load_skimage_images(names=DEFAULT_IMAGES) -> list[tuple[str, torch.Tensor]]:
    """[(name, float32 tensor (3, H, W) in [0, 1])] from ``skimage.data``.

    ``stereo_motorcycle`` returns a stereo pair; its left view is used.
    """
    try:
        from skimage import data as skdata
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the image experiment needs scikit-image "
                          "(pip install scikit-image)") from e
    out = []
    for name in names:
        img = getattr(skdata, name)()
        if isinstance(img, tuple):
            img = img[0]
        img = np.asarray(img)
        if img.dtype == bool:
            img = img.astype(np.uint8) * 255
        if img.ndim == 2:
            img = np.repeat(img[:, :, None], 3, axis=2)
        img = img[:, :, :3]
        t = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float() / 255.0
        out.append((name, t.contiguous()))
    return out


@dataclass
class CropSource:
    """Crops of size ``crop`` from a set of images, each split into a training part
    (the left ``1 - heldout_frac`` of its columns) and a held-out part (the rest).
    Crops never straddle the split, so held-out crops contain no training pixel.
    Images are drawn uniformly (not by area), crop positions uniformly.
    """

    images: list
    crop: int = 32
    heldout_frac: float = 0.25

    def __post_init__(self):
        self.split = []
        for name, img in self.images:
            _, h, w = img.shape
            cut = int(round(w * (1 - self.heldout_frac)))
            if h < self.crop or cut < self.crop or w - cut < self.crop:
                raise ValueError(f"image {name} ({h}x{w}) is too small for {self.crop}px "
                                 f"crops on both sides of the split")
            self.split.append(cut)

    def _crops(self, gen: torch.Generator, n: int, heldout: bool) -> torch.Tensor:
        c = self.crop
        which = torch.randint(len(self.images), (n,), generator=gen)
        u = torch.rand(n, 2, generator=gen, dtype=torch.float64)
        out = torch.empty(n, 3, c, c)
        for i in range(n):
            k = int(which[i])
            img, cut = self.images[k][1], self.split[k]
            h, w = img.shape[1:]
            x0, x1 = (cut, w - c) if heldout else (0, cut - c)
            top = int(u[i, 0] * (h - c + 1))
            left = x0 + int(u[i, 1] * (x1 - x0 + 1))
            out[i] = img[:, top:top + c, left:left + c]
        return out

    def train_batch(self, gen: torch.Generator, n: int) -> torch.Tensor:
        """(n, 3, crop, crop) random training crops."""
        return self._crops(gen, n, heldout=False)

    def heldout_set(self, n: int, seed: int) -> torch.Tensor:
        """(n, 3, crop, crop) fixed held-out crops (same ``seed`` -> same crops)."""
        gen = torch.Generator().manual_seed(seed)
        return self._crops(gen, n, heldout=True)


# ----------------------------------------------------------------------------- audio

SAMPLE_RATE = 16000
#: the audio demo's utterance length (seconds) and its training / held-out seeds
UTTERANCE_SECONDS = 2.0
AUDIO_TRAIN_SEED = 0
AUDIO_HELDOUT_SEED = 1

# Average adult-male formants F1, F2, F3 (Hz) of American English vowels
# (Peterson & Barney 1952); F4 is set to 3500 Hz.
VOWELS = {"i": (270, 2290, 3010), "I": (390, 1990, 2550), "e": (530, 1840, 2480),
          "ae": (660, 1720, 2410), "a": (730, 1090, 2440), "o": (570, 840, 2410),
          "U": (440, 1020, 2240), "u": (300, 870, 2240), "V": (640, 1190, 2390),
          "3": (490, 1350, 1690)}
NASALS = {"m": (250, 1100, 2200), "n": (250, 1500, 2500), "N": (250, 2000, 2700)}
# fricatives: (noise resonance Hz, bandwidth Hz, level); "h" is aspiration
FRICATIVES = {"s": (5500, 1500, 0.35), "S": (3000, 1200, 0.4), "f": (5000, 4000, 0.12),
              "T": (6500, 3000, 0.1), "h": (1500, 2500, 0.12)}
# plosive bursts: (burst resonance Hz, bandwidth Hz, level)
PLOSIVES = {"p": (900, 1500, 0.5), "t": (4000, 2000, 0.6), "k": (2000, 1200, 0.6),
            "b": (800, 1500, 0.35), "d": (3500, 2000, 0.4), "g": (1800, 1200, 0.4)}


def _smooth(x: np.ndarray, width: int) -> np.ndarray:
    """Moving average along the last axis with a Hann window of ``width`` samples."""
    if width <= 1:
        return x
    win = np.hanning(width + 2)[1:-1]
    win /= win.sum()
    pad = width // 2
    xp = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(pad, width - 1 - pad)], mode="edge")
    # cumulative-sum trick is not exact for a Hann window: use FFT convolution
    n = xp.shape[-1] + width - 1
    nfft = 1 << (n - 1).bit_length()
    y = np.fft.irfft(np.fft.rfft(xp, nfft) * np.fft.rfft(win, nfft), nfft)
    return y[..., width - 1:width - 1 + x.shape[-1]]


def _utterance_tracks(rng: np.random.Generator, n: int, sr: int):
    """Per-sample control tracks of one utterance of ``n`` samples: voicing and noise
    amplitudes, 4 formant frequencies and bandwidths, noise resonance and bandwidth."""
    av = np.zeros(n)
    an = np.zeros(n)
    formants = np.zeros((4, n))
    fbw = np.zeros((4, n))
    nf = np.zeros(n)
    nbw = np.zeros(n)
    scale = rng.uniform(0.85, 1.25)  # vocal-tract length: male .. child-like
    vowel_names = list(VOWELS)
    cur = np.array(VOWELS[rng.choice(vowel_names)] + (3500,), float) * scale
    t = int(rng.uniform(0.02, 0.15) * sr)  # leading silence
    formants[:, :t] = cur[:, None]
    fbw[:, :t] = np.array([80, 100, 150, 200])[:, None]
    nf[:t], nbw[:t] = 3000, 2000

    def seg(dur_s, a_v, a_n, f, bw, noise_f, noise_bw):
        nonlocal t
        m = min(n - t, max(1, int(dur_s * sr)))
        if m <= 0:
            return
        av[t:t + m], an[t:t + m] = a_v, a_n
        formants[:, t:t + m] = np.asarray(f)[:, None]
        fbw[:, t:t + m] = np.asarray(bw)[:, None]
        nf[t:t + m], nbw[t:t + m] = noise_f, noise_bw
        t += m

    base_bw = np.array([80.0, 100.0, 150.0, 200.0])
    while t < n:
        # one syllable: optional onset consonant, vowel, optional coda
        for position in ("onset", "nucleus", "coda"):
            if position == "nucleus":
                v = np.array(VOWELS[rng.choice(vowel_names)] + (3500,), float) * scale
                v *= rng.uniform(0.95, 1.05, 4)
                cur = v
                seg(rng.uniform(0.06, 0.22), rng.uniform(0.6, 1.0), 0.0, cur, base_bw,
                    3000, 2000)
                continue
            if rng.random() > (0.75 if position == "onset" else 0.4):
                continue
            kind = rng.choice(["fric", "plos", "nasal"], p=[0.4, 0.4, 0.2])
            if kind == "fric":
                name = rng.choice(list(FRICATIVES))
                fc, bw, lvl = FRICATIVES[name]
                seg(rng.uniform(0.05, 0.14), 0.0, lvl * rng.uniform(0.7, 1.3), cur,
                    base_bw, fc * rng.uniform(0.9, 1.1), bw)
            elif kind == "plos":
                name = rng.choice(list(PLOSIVES))
                fc, bw, lvl = PLOSIVES[name]
                voiced = name in "bdg"
                seg(rng.uniform(0.02, 0.06), 0.08 if voiced else 0.0, 0.0, cur, base_bw,
                    fc, bw)  # closure
                seg(rng.uniform(0.008, 0.02), 0.0, lvl, cur, base_bw, fc, bw)  # burst
                seg(rng.uniform(0.01, 0.04), 0.0, lvl * 0.25, cur, base_bw * 2, 1500,
                    2500)  # aspiration
            else:
                name = rng.choice(list(NASALS))
                f = np.array(NASALS[name] + (3500,), float) * scale
                seg(rng.uniform(0.04, 0.1), 0.35, 0.0, f, base_bw * np.array([3, 2, 2, 1.5]),
                    3000, 2000)
        if rng.random() < 0.3:  # word boundary
            seg(rng.uniform(0.05, 0.25), 0.0, 0.0, cur, base_bw, 3000, 2000)
    ms = sr // 1000
    return (_smooth(av, 8 * ms), _smooth(an, 3 * ms), _smooth(formants, 20 * ms),
            _smooth(fbw, 20 * ms), _smooth(nf, 10 * ms), _smooth(nbw, 10 * ms))


def _glottal_source(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    """Differentiated Rosenberg glottal pulses with a moving pitch (speaker base F0,
    declination, slow random intonation, per-period jitter) plus aspiration noise."""
    f0_base = rng.uniform(85, 250)
    t = np.arange(n) / sr
    steps = max(2, n // (sr // 20))  # intonation knots every 50 ms
    walk = np.cumsum(rng.normal(0, 0.04, steps))
    walk -= walk.mean()
    intonation = np.interp(np.linspace(0, steps - 1, n), np.arange(steps), walk)
    decl = 1.0 - 0.15 * t / max(t[-1], 1e-9)
    f0 = f0_base * decl * np.exp(_smooth(intonation[None], 40 * sr // 1000)[0])
    f0 *= 1 + rng.normal(0, 0.01, n)  # jitter
    phase = np.cumsum(f0 / sr) % 1.0
    tp, tn = 0.4, 0.16  # Rosenberg opening / closing fractions of the period
    g = np.where(phase < tp, 0.5 * (1 - np.cos(np.pi * phase / tp)),
                 np.where(phase < tp + tn, np.cos(np.pi * (phase - tp) / (2 * tn)), 0.0))
    dg = np.diff(g, prepend=0.0) * (sr / (2 * np.pi * f0_base))  # lip radiation
    return dg + 0.03 * rng.normal(0, 1, n) * g


def _resonator_coeffs(f, bw, sr):
    """Klatt's second-order resonator, unity gain at DC: y = a x + b y1 + c y2."""
    r = np.exp(-np.pi * bw / sr)
    c = -r * r
    b = 2 * r * np.cos(2 * np.pi * np.minimum(f, 0.45 * sr) / sr)
    return 1 - b - c, b, c


def synth_speech(n_utterances: int, seconds: float = 2.0, seed: int = 0,
                 sr: int = SAMPLE_RATE, chunk: int = 64) -> np.ndarray:
    """(n_utterances, round(seconds*sr)) float32 speech-like waveforms, peak ~0.5.

    Each utterance is a new random "speaker" (F0 85-250 Hz, vocal-tract scale
    0.85-1.25) saying random CV(C) syllables with word pauses. Deterministic in
    ``seed``: utterance i uses the stream ``SeedSequence([seed, i])``.
    """
    n = int(round(seconds * sr))
    out = np.zeros((n_utterances, n), np.float32)
    for start in range(0, n_utterances, chunk):
        ids = range(start, min(n_utterances, start + chunk))
        u = len(ids)
        coef = np.zeros((n, 3, 5, u))  # (time, a/b/c, resonator, utterance)
        src_v = np.zeros((n, u))
        src_n = np.zeros((n, u))
        for j, i in enumerate(ids):
            rng = np.random.default_rng(np.random.SeedSequence([seed, i]))
            av, an, fr, fbw, nf, nbw = _utterance_tracks(rng, n, sr)
            src_v[:, j] = av * _glottal_source(rng, n, sr)
            src_n[:, j] = an * rng.normal(0, 1, n)
            for k in range(4):
                coef[:, :, k, j] = np.stack(_resonator_coeffs(fr[k], fbw[k], sr), 1)
            a, b, c = _resonator_coeffs(nf, nbw, sr)
            # the noise resonator is band-pass-like: scale so its peak gain ~ 1
            coef[:, :, 4, j] = np.stack([a * 0 + (1 - np.exp(-np.pi * nbw / sr)), b, c], 1)
        y1 = np.zeros((5, u))
        y2 = np.zeros((5, u))
        y = np.zeros((n, u))
        for t in range(n):
            a, b, c = coef[t]
            x = src_v[t]
            for k in range(4):  # cascade of formant resonators on the voiced branch
                v = a[k] * x + b[k] * y1[k] + c[k] * y2[k]
                y2[k] = y1[k]
                y1[k] = v
                x = v
            w = a[4] * src_n[t] + b[4] * y1[4] + c[4] * y2[4]
            y2[4] = y1[4]
            y1[4] = w
            y[t] = x + w
        y -= y.mean(0, keepdims=True)
        y /= np.abs(y).max(0, keepdims=True) + 1e-9
        out[start:start + u] = (0.5 * y).T.astype(np.float32)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 1 << 30]))
    out += rng.normal(0, 1e-3, out.shape).astype(np.float32)  # faint noise floor
    return out


@dataclass
class WaveSource:
    """Fixed-length windows of synthetic speech: random training windows from one set
    of utterances (seed ``seed``), held-out windows from utterances synthesised with a
    different seed (new random speakers and syllables)."""

    train_audio: np.ndarray  # (U, T)
    window: int = 1024

    def __post_init__(self):
        self.train = torch.from_numpy(self.train_audio)

    def train_batch(self, gen: torch.Generator, n: int) -> torch.Tensor:
        u, t = self.train.shape
        rows = torch.randint(u, (n,), generator=gen)
        starts = torch.randint(t - self.window + 1, (n,), generator=gen)
        idx = starts[:, None] + torch.arange(self.window)[None]
        return self.train[rows[:, None], idx][:, None, :].contiguous()

    @staticmethod
    def windows(audio: np.ndarray, window: int) -> torch.Tensor:
        """(U, T) -> (U * (T // window), 1, window) non-overlapping windows."""
        u, t = audio.shape
        m = t // window
        w = torch.from_numpy(np.ascontiguousarray(audio[:, :m * window]))
        return w.reshape(u * m, 1, window)


def utterances_for_tokens(n_tokens: int, seconds: float, hop: int, window: int,
                          sr: int = SAMPLE_RATE) -> int:
    """How many held-out utterances give at least ``n_tokens`` latent tokens."""
    per_utt = (int(round(seconds * sr)) // window) * (window // hop)
    return max(1, math.ceil(n_tokens / per_utt))
