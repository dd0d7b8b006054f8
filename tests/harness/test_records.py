"""Run records: whole lines, the torn-line count, the done file, atomic writes."""

import json
import os

import pytest
import torch

from torchsage.harness.records import (
    append_json_line,
    atomic_torch_save,
    atomic_write_text,
    is_done,
    mark_done,
    read_json_lines,
)


def test_lines_round_trip_and_a_torn_last_line_is_reported_not_parsed(tmp_path):
    path = tmp_path / "results.jsonl"
    records = [{"step": i, "acc": i / 10, "args": {"name": "x"}} for i in range(3)]
    for r in records:
        append_json_line(path, r)
    text = path.read_text()
    assert text.count("\n") == 3 and all(json.loads(line) == r for line, r in zip(text.splitlines(), records))
    with open(path, "a") as f:
        f.write('{"step": 3, "acc"')  # killed mid-write
    read, problems = read_json_lines(path)
    assert read == records and len(problems) == 1 and problems[0].startswith("line 4: invalid JSON (")
    with open(path, "a") as f:
        f.write("\n\n[1, 2]\n")  # blank lines ignored; a line that is not an object is reported
    assert read_json_lines(path)[1][1:] == ["line 6: not a JSON object (list)"]  # the torn line ends at 4


def test_done_file(tmp_path):
    assert not is_done(tmp_path)
    mark_done(tmp_path)
    assert is_done(tmp_path) and (tmp_path / "done").read_text() == "done\n"


def test_atomic_writes_leave_no_temporary_file(tmp_path):
    atomic_torch_save({"w": torch.arange(3)}, tmp_path / "model.pt")
    atomic_write_text(tmp_path / "a.json", "{}")
    assert sorted(os.listdir(tmp_path)) == ["a.json", "model.pt"]
    assert torch.equal(torch.load(tmp_path / "model.pt", weights_only=True)["w"], torch.arange(3))


def test_a_failed_save_keeps_the_previous_file(tmp_path):
    atomic_torch_save({"w": 1}, tmp_path / "model.pt")
    with pytest.raises(Exception):  # noqa: B017 - whatever pickling raises
        atomic_torch_save({"w": lambda: None}, tmp_path / "model.pt")
    assert torch.load(tmp_path / "model.pt", weights_only=True) == {"w": 1}
