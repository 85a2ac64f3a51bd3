"""Experiments: plain VQ vs SimVQ codebook collapse on images and audio.

Not imported by ``simvq_kernels``; import it explicitly::

    from simvq_kernels import experiments
    from simvq_kernels.experiments import data, models, train, plots, report

The programs ``python/train_images.py`` and ``python/train_audio.py`` drive it.
Needs numpy and torch; scikit-image for the image data and matplotlib for the figures
(both imported only where used).
"""
from . import data, models, train  # noqa: F401  (plots imports matplotlib lazily)
from .models import PlainVQ, VQAutoencoder, build_autoencoder, make_quantiser
from .train import Task, TrainConfig, evaluate, run_sweep, train_model

__all__ = ["PlainVQ", "Task", "TrainConfig", "VQAutoencoder", "build_autoencoder",
           "data", "evaluate", "make_quantiser", "models", "run_sweep", "train",
           "train_model"]
