"""Robustness of the install: a missing or broken compiled extension.

Each scenario runs in a child process on a copy of the package (the Python files
only, plus whatever stands in for ``simvq_kernels._C``), put first on PYTHONPATH, with
the editable install's import hook removed (so neither the package nor its ``_C`` is
found in the source tree instead):

- missing: no ``_C`` at all (a pure-Python install, or a build that failed);
- broken: a ``_C*.so`` that is not a shared object (ImportError: invalid ELF header);
- the extension raises OSError or RuntimeError when imported (an ABI mismatch with the
  torch it was built against, a missing libtorch symbol);
- the extension raises another exception when imported (ValueError, as binary
  incompatibilities such as "numpy.dtype size changed" do, or AttributeError);
- disabled on purpose with SIMVQ_DISABLE_EXTENSION=1 (no warning then).

In every case: ``import simvq_kernels`` works and loads nothing; the 'reference' and
'chunked' backends give correct results (checked against a float64 argmin in the
child); "auto" falls back to 'chunked'; the layer trains; an explicit 'cpu' raises
BackendUnavailableError saying why; ``python -m simvq_kernels.info`` reports the
problem; and exactly one RuntimeWarning is issued, which says how to fix it
(``pip install --no-build-isolation -e .``).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

import simvq_kernels

PKG = os.path.dirname(os.path.abspath(simvq_kernels.__file__))

# An editable install (pip install -e .) puts a finder on sys.meta_path that resolves
# simvq_kernels.* submodules in the source tree, so the copy's missing _C would be found
# there. Drop it, as a regular install would not have it.
PRELUDE = textwrap.dedent("""
    import sys
    sys.meta_path[:] = [f for f in sys.meta_path
                        if "editable" not in getattr(f, "__name__", type(f).__name__).lower()]
""")

CHILD = PRELUDE + textwrap.dedent("""
    import json, os, sys, warnings
    warnings.simplefilter("always")
    report = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import torch
        import simvq_kernels as sk
        report["file"] = sk.__file__
        report["loaded_at_import"] = "simvq_kernels._C" in sys.modules
        report["warnings_at_import"] = len([w for w in caught
                                            if "simvq_kernels" in str(w.message)])
        g = torch.Generator().manual_seed(0)
        z = torch.randn(300, 12, generator=g)
        q = torch.randn(1100, 12, generator=g)
        want = torch.cdist(z.double(), q.double()).argmin(1)
        for b in ("reference", "chunked", "auto"):
            out = sk.nearest_code_ex(z, q, backend=b)
            report["backend_" + b] = out.backend
            report["agree_" + b] = float((out.indices == want).double().mean())
        report["available"] = sk.available_backends()
        try:
            sk.nearest_code(z, q, backend="cpu")
            report["cpu_error"] = None
        except sk.BackendUnavailableError as e:
            report["cpu_error"] = str(e)
        layer = sk.SimVQ(12, 64)
        out, idx, loss = layer(z[None].requires_grad_())
        loss.backward()
        report["layer_backend"] = layer.last_backend
        report["layer_grad_ok"] = bool(torch.isfinite(layer.weight.grad).all())
        for _ in range(3):
            sk.nearest_code(z, q)
        msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)
                and "simvq_kernels" in str(w.message)]
        report["warnings"] = msgs
    print("REPORT" + json.dumps(report))
""")


def _stub_package(root, ext_kind):
    """A copy of the package under root/simvq_kernels with ``_C`` replaced."""
    dst = os.path.join(root, "simvq_kernels")
    shutil.copytree(PKG, dst, ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__"))
    so_name = "_C" + (next((f[2:] for f in os.listdir(PKG) if f.startswith("_C.")
                            and f.endswith(".so")), ".cpython-311-x86_64-linux-gnu.so"))
    if ext_kind == "broken_so":
        with open(os.path.join(dst, so_name), "wb") as f:
            f.write(b"this is not an ELF shared object\n" * 10)
    elif ext_kind.startswith("raises_"):
        exc = ext_kind[len("raises_"):]
        messages = {"OSError": "libtorch_cpu.so: undefined symbol: _ZN3c104cuda9SetDevice",
                    "RuntimeError": "simvq_kernels._C was built for another torch",
                    "ValueError": "numpy.dtype size changed, may indicate binary "
                                  "incompatibility",
                    "AttributeError": "module 'torch.library' has no attribute "
                                      "'register_fake'"}
        with open(os.path.join(dst, "_C.py"), "w") as f:
            f.write(f"raise {exc}({messages[exc]!r})\n")
    return root


def _run(tmp_path, ext_kind, extra_env=None):
    root = _stub_package(str(tmp_path), ext_kind)
    env = {k: v for k, v in os.environ.items() if k != "SIMVQ_DISABLE_EXTENSION"}
    env["PYTHONPATH"] = root
    env.update(extra_env or {})
    res = subprocess.run([sys.executable, "-c", CHILD], cwd=root, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"child failed:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}"
    line = next(x for x in res.stdout.splitlines() if x.startswith("REPORT"))
    report = json.loads(line[len("REPORT"):])
    assert report["file"].startswith(root), f"the child imported {report['file']}"
    info = subprocess.run([sys.executable, "-c", PRELUDE + "import runpy; runpy.run_module("
                           "'simvq_kernels.info', run_name='__main__')"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    return report, info


def _assert_pure_python_backends_work(report):
    assert report["loaded_at_import"] is False, "importing the package loaded the extension"
    assert report["warnings_at_import"] == 0, "importing the package warned"
    for b in ("reference", "chunked"):
        assert report["backend_" + b] == b
        assert report["agree_" + b] == 1.0, f"{b} disagrees with the float64 argmin"
    assert report["backend_auto"] == "chunked"
    assert report["agree_auto"] == 1.0
    assert report["available"] == ["reference", "chunked"]
    assert report["layer_backend"] == "chunked" and report["layer_grad_ok"]
    assert report["cpu_error"] is not None and "compiled extension is not loaded" in \
        report["cpu_error"], report["cpu_error"]
    assert "backend='auto'" in report["cpu_error"] and "chunked" in report["cpu_error"]


@pytest.mark.parametrize("ext_kind,expect_in_error", [
    ("missing", "No module named 'simvq_kernels._C'"),
    ("broken_so", "ImportError"),
    ("raises_OSError", "undefined symbol"),
    ("raises_RuntimeError", "built for another torch"),
])
def test_missing_or_broken_extension(tmp_path, ext_kind, expect_in_error):
    report, info = _run(tmp_path, ext_kind)
    _assert_pure_python_backends_work(report)
    assert len(report["warnings"]) == 1, f"expected one warning, got {report['warnings']}"
    msg = report["warnings"][0]
    assert "could not be loaded" in msg and expect_in_error in msg, msg
    assert "pip install --no-build-isolation -e ." in msg, \
        f"the warning does not say how to fix it: {msg}"
    assert "'reference' and 'chunked' backends work without it" in msg
    assert expect_in_error in report["cpu_error"]
    assert info.returncode == 0, info.stderr[-2000:]
    assert "NOT LOADED" in info.stdout and expect_in_error in info.stdout, info.stdout
    assert "fma peak   not measured: the compiled extension is not loaded" in info.stdout, \
        info.stdout


@pytest.mark.parametrize("exc", ["ValueError", "AttributeError"])
def test_extension_raising_other_exceptions_falls_back(tmp_path, exc):
    """Bug 05 regression test: any exception at import, not only ImportError/OSError/
    RuntimeError, leaves 'auto' and available_backends() working."""
    report, info = _run(tmp_path, f"raises_{exc}")
    _assert_pure_python_backends_work(report)
    assert len(report["warnings"]) == 1 and exc in report["warnings"][0]
    assert info.returncode == 0 and "NOT LOADED" in info.stdout


def test_disabled_extension_needs_no_warning(tmp_path):
    report, info = _run(tmp_path, "missing", {"SIMVQ_DISABLE_EXTENSION": "1"})
    _assert_pure_python_backends_work(report)
    assert report["warnings"] == [], report["warnings"]
    assert "SIMVQ_DISABLE_EXTENSION=1" in report["cpu_error"]
    assert info.returncode == 0 and "disabled by SIMVQ_DISABLE_EXTENSION=1" in info.stdout


def test_the_installed_extension_loads():
    """The other side: on this install the extension is present and loads, so the
    scenarios above are the exception, not the rule (setup.py always builds it)."""
    if os.environ.get("SIMVQ_DISABLE_EXTENSION", "0") == "1":
        pytest.skip("the run disabled the extension on purpose")
    status = simvq_kernels.backend_status()
    assert status["cpu"] is None, f"the compiled extension does not load: {status['cpu']}"
