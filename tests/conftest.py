"""Shared pytest setup: hypothesis profiles for the property-based tests.

Select a profile with the environment variable ``HYPOTHESIS_PROFILE`` (default ``ci``):

- ``ci``: bounded in time for CI on 2 CPU cores (the fuzz suite, tests/test_fuzz.py,
  runs in about a minute; see its docstring). ``derandomize=True``: the examples are
  a fixed function of the test, so CI is reproducible and never flaky; no example
  database is written (nothing lands in the repository).
- ``long``: the nightly / pre-release fuzz run, random (fresh examples every run),
  8x the examples of ``ci`` (800 vs 100 per unit), with an example database *outside* the repository
  (``$SIMVQ_HYPOTHESIS_DB``, default ``~/.cache/simvq-kernels/hypothesis-db``) so that a
  failure found once is replayed first on the next run. Run it with

      HYPOTHESIS_PROFILE=long pytest tests/test_fuzz.py -p no:cacheprovider \\
          --hypothesis-show-statistics

  (about 10-15 minutes on 2 cores).
- ``dev``: a handful of examples, for editing the tests.

Per-test budgets are ``max_examples`` times a factor per test (see
``tests/test_fuzz.py``), so the profiles only set the scale.
"""
from __future__ import annotations

import os
import sys

from hypothesis import HealthCheck, settings
from hypothesis.configuration import set_hypothesis_home_dir
from hypothesis.database import DirectoryBasedExampleDatabase

_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "simvq-kernels")

# Hypothesis also writes failure patches and a constants cache under its home dir
# (default ./.hypothesis, i.e. inside the repository): keep it out of the tree.
if not os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY"):
    set_hypothesis_home_dir(os.path.join(_CACHE, "hypothesis-home"))

# tests/oracle.py is imported as `import oracle` by the test modules, whatever pytest's
# import mode (with --import-mode=importlib the test folder is not put on sys.path).
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

_COMMON = dict(
    deadline=None,  # timings on a shared 2-core CI box are noisy; budgets are per profile
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,  # a failure prints @reproduce_failure(...) to replay it exactly
)

settings.register_profile("ci", max_examples=100, derandomize=True, database=None, **_COMMON)
settings.register_profile(
    "long",
    max_examples=800,
    derandomize=False,
    database=DirectoryBasedExampleDatabase(os.environ.get(
        "SIMVQ_HYPOTHESIS_DB", os.path.join(_CACHE, "hypothesis-db"))),
    **_COMMON,
)
settings.register_profile("dev", max_examples=5, derandomize=True, database=None, **_COMMON)

settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
