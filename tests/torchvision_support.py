"""What the tests marked ``torchvision`` share: the import of the real torchvision, which skips them
where it does not import (``make test``'s CPU build of torch cannot load PyPI's torchvision) and
fails them under ``make test-vision``, which sets ``TORCHSAGE_REQUIRE_TORCHVISION=1`` so that a
broken install cannot pass as a run of skips."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest

REQUIRED = "TORCHSAGE_REQUIRE_TORCHVISION"


def torchvision_error() -> BaseException | None:
    """Why torchvision does not import here, or None when it does. A torchvision built for
    another torch raises RuntimeError (``operator torchvision::nms does not exist``), not ImportError."""
    try:
        importlib.import_module("torchvision")
    except Exception as error:
        return error
    return None


def require_torchvision() -> ModuleType:
    """The real torchvision; skips the calling module where it does not import, or raises under
    ``TORCHSAGE_REQUIRE_TORCHVISION=1``."""
    error = torchvision_error()
    if error is not None:
        if os.environ.get(REQUIRED) == "1":
            raise RuntimeError(f"{REQUIRED}=1 but torchvision does not import: {error}") from error
        pytest.skip(
            f"torchvision does not import here ({type(error).__name__}: {error}); "
            "make test-vision runs these",
            allow_module_level=True,
        )
    return importlib.import_module("torchvision")
