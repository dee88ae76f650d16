"""The optional extras tests need (lmms-eval, mlflow, wandb): skipped where one is not installed, failed
instead when `COSCTL_REQUIRE_EXTRAS=1` (scripts/test.sh installs them and sets it), so a broken install
cannot pass as skipped tests."""

from __future__ import annotations

import importlib
import os

import pytest


def require(module: str, extra: str):
    """`module` imported, or the test skipped (failed under COSCTL_REQUIRE_EXTRAS=1) naming the extra."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        message = f"{module} is not importable ({err}); install it with pip install -e '.[{extra}]'"
        if os.environ.get("COSCTL_REQUIRE_EXTRAS") == "1":
            pytest.fail(f"COSCTL_REQUIRE_EXTRAS=1 but {message}", pytrace=False)
        pytest.skip(message, allow_module_level=True)
