"""The lab's own checks on a config (pure): its state stays in its directory, and no name
in the config collides with a namespace or link the lab makes itself."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.config.loader import parse
from orchestrator.errors import ConfigError
from orchestrator.lab.plan import (
    LabNames,
    default_config,
    lab_agent_paths,
    outside_lab,
    with_lab_agent,
)

STATE = Path("/run/convergent/lab/x")


def test_an_agent_table_that_leaves_paths_out_gets_the_labs_own():
    text = default_config(2, "x") + '\n[agent]\npeer_port = 7444  # ours\nreconcile_interval_s = 2\n'
    t = parse(with_lab_agent(text, STATE))
    assert t.agent.peer_port == 7444 and t.agent.reconcile_interval_s == 2
    assert str(t.agent.audit_log) == f"{STATE}/audit.log"
    assert t.agent.store == f"sqlite://{STATE}/store.db"
    assert outside_lab(t, STATE) == []
    # the same file without the lab's filling: production defaults under /var and /etc
    assert {k.split(":")[0] for k in outside_lab(parse(text), STATE)} == {
        f"agent.{k}" for k in lab_agent_paths(STATE)}


def test_no_agent_table_gets_the_whole_section():
    t = parse(with_lab_agent(default_config(2, "x"), STATE))
    assert t.agent.run_dir == STATE / "run" and outside_lab(t, STATE) == []


def test_a_path_the_config_points_at_var_is_named():
    text = default_config(2, "x") + '\n[agent]\nstore = "sqlite:///var/lib/convergent/s.db"\n'
    assert outside_lab(parse(with_lab_agent(text, STATE)), STATE) == [
        "agent.store: /var/lib/convergent/s.db is outside the lab's directory "
        f"{STATE}: a lab keeps all its state there"]


def test_an_inline_agent_table_cannot_be_filled_and_says_so():
    text = 'agent = { peer_port = 7444 }\n' + default_config(2, "x")
    with pytest.raises(ConfigError, match=r"write \[agent\] as a table"):
        with_lab_agent(text, STATE)


def test_node_names_that_are_the_labs_own_namespaces_are_named():
    text = default_config(3, "x").replace('name = "n1"', 'name = "ws"').replace(
        'name = "n2"', 'name = "sw"').replace('home = "n1"', 'home = "ws"')
    t = parse(text)
    assert LabNames("x").clashes(t) == [
        "nodes[0].name: node 'ws' would be namespace cvg-x-ws, which is the lab's "
        "workstation namespace",
        "nodes[1].name: node 'sw' would be namespace cvg-x-sw, which is the lab's "
        "switch namespace",
    ]


def test_a_node_named_like_a_guests_namespace_and_a_pipe_named_like_a_vif():
    text = default_config(2, "x").replace('name = "n2"', 'name = "g-guest1"').replace(
        'pipes = ["pipe0"]', 'pipes = ["vif1"]', 1)
    problems = LabNames("x").clashes(parse(text))
    assert problems == [
        "nodes[1].name: node 'g-guest1' would be namespace cvg-x-g-guest1, which is the "
        "lab's guest guest1's namespace",
        "nodes[0].pipes[0]: vif1 is the lab's name for guest guest1's vif",
    ]


def test_the_default_lab_has_no_clash():
    assert LabNames("x").clashes(parse(default_config(16, "x"))) == []
