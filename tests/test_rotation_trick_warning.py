"""rotation_trick=True on a SimVQ layer warns once per process: the rotation trick
collapsed the SimVQ codebook in the demos (python/results/rotation_trick/), in our layer
and in vector-quantize-pytorch's. The default (straight-through) never warns."""
from __future__ import annotations

import warnings

import pytest

import simvq_kernels as sk
from simvq_kernels import nn as sk_nn


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.setattr(sk_nn, "_ROTATION_TRICK_WARNED", False)


def _caught(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return [w for w in caught if "rotation_trick=True" in str(w.message)]


def test_warns_once_per_process(fresh):
    first = _caught(lambda: sk.SimVQ(8, 16, rotation_trick=True))
    assert len(first) == 1 and first[0].category is UserWarning
    assert first[0].filename == __file__  # points at the caller's line
    assert "collapsed" in str(first[0].message) and "migration" in str(first[0].message)
    assert _caught(lambda: sk.SimVQ(8, 16, rotation_trick=True)) == []  # once only


def test_default_and_straight_through_do_not_warn(fresh):
    assert _caught(lambda: sk.SimVQ(8, 16)) == []
    assert _caught(lambda: sk.SimVQ(8, 16, rotation_trick=False)) == []
    assert _caught(lambda: sk.ResidualSimVQ(8, 16, 2)) == []
    assert sk_nn._ROTATION_TRICK_WARNED is False


def test_residual_layer_warns(fresh):
    got = _caught(lambda: sk.ResidualSimVQ(8, 16, 2, rotation_trick=True))
    assert len(got) == 1 and got[0].filename == __file__
