"""Stable hashes: run ids and seeds that are the same in every process, machine and Python
version (Python's ``hash`` is salted per process, so it is not used).

Example:
    >>> canonical_json({"b": 1, "a": [2, 3]})
    '{"a":[2,3],"b":1}'
    >>> stable_seed(["RotatedDigits", "ERM", [0], 0, 0]) == stable_seed(["RotatedDigits", "ERM", [0], 0, 0])
    True
    >>> 0 <= stable_seed("x") < 2**31
    True
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

__all__ = ["canonical_json", "digest", "stable_seed"]


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no spaces: equal values give equal text."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def digest(obj: Any) -> str:
    """md5 hex digest of :func:`canonical_json` (a run directory's name)."""
    return hashlib.md5(canonical_json(obj).encode()).hexdigest()


def stable_seed(obj: Any) -> int:
    """An integer in ``[0, 2**31)`` from the md5 of :func:`canonical_json` of ``obj``."""
    return int(digest(obj), 16) % (2**31)
