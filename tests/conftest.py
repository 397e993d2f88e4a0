"""Markers: `slow` runs only with RETRO_SLOW=1 (or `-m slow`); `gpu` only where CUDA is present;
`spark` only where pyspark is installed. Default `make test` stays CPU-only and fast."""

from __future__ import annotations

import importlib.util
import os

import pytest

from tests.fixtures.toy_stage import toy_registered  # noqa: F401 (a fixture: the toy stage, registered)


def pytest_collection_modifyitems(config, items):
    markexpr = config.getoption("-m") or ""
    run_slow = os.environ.get("RETRO_SLOW") == "1" or "slow" in markexpr
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:
        has_cuda = False
    has_spark = importlib.util.find_spec("pyspark") is not None
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(pytest.mark.skip(reason="slow: set RETRO_SLOW=1 to run"))
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="gpu: CUDA not available"))
        if "spark" in item.keywords and not has_spark:
            item.add_marker(pytest.mark.skip(reason="spark: pyspark not installed (pip install '.[spark]')"))
