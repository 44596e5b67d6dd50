"""The demo's verdict and title (pure), and the command's exit status on a handover run
that lost a flow (the demo itself runs for real in tests/functional/test_demo.py)."""

from __future__ import annotations

import pytest

import orchestrator.lab.demo as demo
from orchestrator.cli import main
from orchestrator.lab.demo import lost_flows, title


def result(control: bool, *dead: str) -> dict:
    names = ["ssh@n1", "guest-snat", "udp@n2"]
    return {"control": control,
            "flows": [{"name": n, "kind": n.split("@")[0], "entry_node": "n1",
                       "survived": n not in dead, "max_gap_ms": 60.0, "error": None}
                      for n in names],
            "migrations": [{"from": "n1", "to": "n2", "precopy_ms": 1, "pause_ms": 2,
                            "cutover_ms": 3, "entries": 4, "total_ms": 9},
                           {"from": "n2", "to": "n1", "precopy_ms": 1, "pause_ms": 2,
                            "cutover_ms": 3, "entries": 4, "total_ms": 9}]}


def test_lost_flows_count_only_with_the_handover() -> None:
    assert lost_flows(result(False)) == []
    assert lost_flows(result(False, "guest-snat")) == ["guest-snat"]
    assert lost_flows(result(True, "guest-snat", "udp@n2")) == []


def test_title_names_mode_score_and_tour() -> None:
    assert title(result(False, "udp@n2")) == \
        "convergent lab demo, with handover: 2/3 flows survived (n1 -> n2 -> n1)"
    assert title(result(True)).startswith("convergent lab demo, control run (no handover): 3/3")


@pytest.mark.parametrize(("control", "dead", "status"), [
    (False, (), 0), (False, ("guest-snat",), 1), (True, ("guest-snat",), 0)])
def test_demo_exit_status(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                          control: bool, dead: tuple[str, ...], status: int) -> None:
    monkeypatch.setattr(demo, "run_demo", lambda *a, **k: result(control, *dead))
    try:
        main(["lab", "demo", "--name", "x"] + (["--control"] if control else []))
        code = 0
    except SystemExit as done:
        code = int(done.code or 0)
    out = capsys.readouterr()
    assert code == status
    assert "flows survived" in out.out  # the table is printed either way
    if status:
        assert out.err == "convergent: 1 of 3 flows died with the handover: guest-snat\n"
