"""The tests' own waiting helpers (tests/waiting.py): what they return, and what they say when the wait fails."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.waiting import Gate, eventually, throughout


def test_eventually_returns_the_first_truthy_value_once_assertions_stop_failing() -> None:
    looks: list[int] = []

    def condition() -> list[int]:
        looks.append(len(looks))
        assert len(looks) >= 3, "not yet"
        return looks if len(looks) >= 4 else []

    assert eventually(condition, what="the fourth look", interval=0) == [0, 1, 2, 3]


def test_eventually_says_what_it_waited_for_and_the_last_value_or_assertion() -> None:
    with pytest.raises(AssertionError, match=r"waiting for the answer; last value: 0\nlog tail") as value:
        eventually(lambda: 0, what="the answer", timeout=0, context=lambda: "log tail")
    assert value.value.__cause__ is None

    def failing() -> bool:
        raise AssertionError("status is PENDING")

    with pytest.raises(AssertionError, match="waiting for the task; last assertion: status is PENDING") as raised:
        eventually(failing, what="the task", timeout=0)
    assert isinstance(raised.value.__cause__, AssertionError)  # the last assertion, with its own traceback


def test_eventually_raises_anything_but_an_assertion_at_once() -> None:
    looks: list[int] = []

    def broken() -> bool:
        looks.append(1)
        raise KeyError("bug")

    with pytest.raises(KeyError):
        eventually(broken, what="a bug")
    assert looks == [1]


def test_a_gate_lets_the_script_waiting_there_go_with_one_line(tmp_path: Path) -> None:
    gate = Gate(tmp_path / "gate")
    script = subprocess.Popen(["sh", "-c", f"echo before\n{gate.wait} && echo after"], stdout=subprocess.PIPE,
                              text=True)
    gate.open()
    assert script.communicate(timeout=60)[0] == "before\nafter\n"  # `read` had a line, not an end of file


def test_opening_a_gate_nobody_waits_at_says_so(tmp_path: Path) -> None:
    gate = Gate(tmp_path / "gate")
    with pytest.raises(AssertionError, match="waiting for a script to wait at gate; last assertion: no reader"):
        gate.open(timeout=0)


@pytest.mark.parametrize("arrives", ["before", "after"])
def test_leaving_a_gate_opens_it_for_good_for_a_script_waiting_there_or_coming_later(tmp_path: Path,
                                                                                   arrives: str) -> None:
    script = f"read -r _ < {tmp_path / 'gate'} && echo passed"
    with Gate(tmp_path / "gate"):
        if arrives == "before":  # waiting at the gate, or about to: either way it gets through
            waiting = subprocess.Popen(["sh", "-c", script], stdout=subprocess.PIPE, text=True)
    if arrives == "after":
        waiting = subprocess.Popen(["sh", "-c", script], stdout=subprocess.PIPE, text=True)
    assert waiting.communicate(timeout=60)[0] == "passed\n"


def test_throughout_passes_while_the_condition_holds_and_says_when_it_stopped() -> None:
    throughout(lambda: True, what="calm", seconds=0.05)
    looks = iter([True, True, False])
    with pytest.raises(AssertionError, match="two at once stopped holding: False"):
        throughout(lambda: next(looks), what="two at once", seconds=60, interval=0)
