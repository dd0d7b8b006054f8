"""Progress: plain lines without carriage returns when the stream is not a terminal."""

import io

from torchsage.harness.progress import Progress, bar


def test_plain_lines_on_a_non_terminal():
    stream = io.StringIO()
    with Progress(4, "sweep", "run", stream=stream, interval=0) as p:
        for _ in range(4):
            p.update()
            p.set_postfix(failed=0)
    text = stream.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert lines[0].startswith("sweep: 1/4 runs (25%), ")
    assert lines[-1].startswith("sweep: 4/4 runs (100%), 0 failed, ")


def test_disabled_and_tty_only_are_silent_on_a_non_terminal():
    for kwargs in ({"enabled": False}, {"tty_only": True}):
        stream = io.StringIO()
        p = Progress(2, "x", stream=stream, interval=0, **kwargs)
        p.update(2)
        p.close()
        assert stream.getvalue() == ""


def test_the_tqdm_drop_in_iterates_and_counts(capsys):
    assert list(bar(range(3), desc="d")) == [0, 1, 2]
    with bar(total=2, desc="e", disable=True) as b:
        b.update()
        b.update()
    assert b.n == 2
    assert "d: 3/3 its (100%)" in capsys.readouterr().err
