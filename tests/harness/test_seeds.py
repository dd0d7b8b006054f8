"""Stable hashes: canonical JSON, md5 by hand, the same value in another process."""

import hashlib
import subprocess
import sys

from torchsage.harness.seeds import canonical_json, digest, stable_seed


def test_digest_is_md5_of_sorted_compact_json():
    value = {"b": [1, 2], "a": {"y": None, "x": 0.5}}
    text = '{"a":{"x":0.5,"y":null},"b":[1,2]}'
    assert canonical_json(value) == text
    assert digest(value) == hashlib.md5(text.encode()).hexdigest()
    assert stable_seed(value) == int(hashlib.md5(text.encode()).hexdigest(), 16) % 2**31


def test_the_seed_is_the_same_in_a_new_process():
    code = "from torchsage.harness.seeds import stable_seed; print(stable_seed(['PACS', 3]))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert int(out) == stable_seed(["PACS", 3])
