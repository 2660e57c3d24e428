"""Progress in a file is plain lines at a steady interval and one at the end; on a terminal, tqdm's bar."""

from __future__ import annotations

import io

from adyolo.progress import Progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_file_gets_plain_lines_with_the_meter_and_the_postfix():
    stream = io.StringIO()
    with Progress(total=4, desc="epoch 1/2", every_s=0.0, stream=stream) as bar:
        for _ in range(4):
            bar.set_postfix_str("box 0.0500 | 12.0 img/s | 1.00 GiB peak")
            bar.update()
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert len(lines) == 5  # one per update (every_s 0) and the closing one
    assert lines[-1].startswith("epoch 1/2: 100% 4/4 [") and lines[-1].endswith(
        "box 0.0500 | 12.0 img/s | 1.00 GiB peak]"
    )


def test_a_long_interval_still_leaves_one_line_and_a_disabled_one_none():
    stream = io.StringIO()
    assert list(Progress(range(3), desc="validate", stream=stream)) == [0, 1, 2]
    assert stream.getvalue().count("\n") == 1 and stream.getvalue().startswith("validate: 100% 3/3")
    quiet = io.StringIO()
    with Progress(total=3, disable=True, stream=quiet) as bar:
        bar.update(3)
    assert quiet.getvalue() == ""


def test_a_terminal_gets_the_redrawn_bar():
    stream = Terminal()
    with Progress(total=2, desc="epoch 1/1", stream=stream) as bar:
        bar.update(2)
    assert "\r" in stream.getvalue() and "2/2" in stream.getvalue()
