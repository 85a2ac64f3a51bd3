"""pytest-benchmark options for simvq-kernels' benchmark suite.

    pytest benchmarks --benchmark-only                          # preset 'quick'
    pytest benchmarks --benchmark-only --simvq-preset cpu       # any preset of the bench
    pytest benchmarks --benchmark-only --simvq-preset core --simvq-backend cpu

The shapes come from ``simvq_kernels.bench.PRESETS`` (``python -m simvq_kernels.bench
--list-presets``), so the two tools time the same cases. The repository's pytest
configuration adds ``--benchmark-skip``, so a plain ``pytest`` (tests/) never runs these;
``--benchmark-only`` overrides it.
"""
import pytest
import torch

from simvq_kernels import bench


def pytest_addoption(parser):
    group = parser.getgroup("simvq", "simvq-kernels benchmarks")
    group.addoption("--simvq-preset", action="append", default=None,
                    help="bench preset(s) whose shapes to run (repeatable; default: quick)")
    group.addoption("--simvq-backend", action="append", default=None,
                    help="backend(s) to run (repeatable; default: every available one)")
    group.addoption("--simvq-device", default=None,
                    help="cpu or cuda (default: cuda if available, else cpu)")
    group.addoption("--simvq-rounds", type=int, default=None,
                    help="timed rounds per benchmark (default 5 on CPU, 20 on CUDA)")


def _device(config):
    dev = config.getoption("simvq_device")
    if dev is None:
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(dev)


def pytest_generate_tests(metafunc):
    config = metafunc.config
    if "shape" in metafunc.fixturenames:
        presets = config.getoption("simvq_preset") or ["quick"]
        params, ids = [], []
        for name in presets:
            if name not in bench.PRESETS:
                raise pytest.UsageError(f"unknown --simvq-preset {name!r}; choose from "
                                        f"{sorted(bench.PRESETS)}")
            for s in bench.PRESETS[name].shapes():
                params.append(s)
                ids.append(f"{name}-{s.label.replace(' ', '-')}")
        metafunc.parametrize("shape", params, ids=ids)
    if "backend" in metafunc.fixturenames:
        import simvq_kernels as sk

        wanted = config.getoption("simvq_backend") or list(bench.BACKEND_NAMES)
        device = _device(config)
        names = []
        for b in wanted:
            if b not in sk.available_backends():
                continue
            try:
                sk.select_backend(b, device, torch.float32)
            except sk.BackendUnavailableError:
                continue
            names.append(b)
        metafunc.parametrize("backend", names)


@pytest.fixture
def device(request):
    return _device(request.config)


@pytest.fixture
def rounds(request, device):
    r = request.config.getoption("simvq_rounds")
    return r if r else (20 if device.type == "cuda" else 5)
