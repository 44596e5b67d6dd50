"""One CLI surface, checked by walking the whole click tree: --json on every command that
reports, -h everywhere, plain help on every command and option, one meaning per short
flag, and the exit statuses the README documents."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from orchestrator.cli import cli, main
from orchestrator.errors import ConvergentError, Degraded

ROOT = Path(__file__).resolve().parents[2]
# commands that print no report, and why (everything else must take --json)
NOT_REPORTING = {
    "agent": "the daemon: it writes logs, not a report",
    "render-rules": "its output is the ruleset itself, for nft -f",
    "audit export": "its output is the export, in the --format asked for",
}
# a short flag means one thing everywhere
SHORT_FLAGS = {"-h": "--help", "-n": "--last", "-o": "--output"}


def commands() -> list[tuple[str, click.Command]]:
    found: list[tuple[str, click.Command]] = []

    def walk(cmd: click.Command, path: list[str]) -> None:
        if isinstance(cmd, click.Group):
            ctx = click.Context(cmd)
            for name in cmd.list_commands(ctx):
                sub = cmd.get_command(ctx, name)
                assert sub is not None, name
                walk(sub, [*path, name])
        found.append((" ".join(path), cmd))

    walk(cli, [])
    return found


LEAVES = [(p, c) for p, c in commands() if not isinstance(c, click.Group)]


def test_the_tree_is_walked() -> None:
    paths = {p for p, _ in LEAVES}
    assert {"status", "sync status", "audit verify", "lab status", "lab up"} <= paths
    assert set(NOT_REPORTING) <= paths  # an exemption for a command that is gone goes too


@pytest.mark.parametrize(("path", "cmd"), LEAVES, ids=[p for p, _ in LEAVES])
def test_every_reporting_command_takes_json(path: str, cmd: click.Command) -> None:
    names = {o for p in cmd.params for o in p.opts}
    assert ("--json" in names) != (path in NOT_REPORTING), path


@pytest.mark.parametrize(("path", "cmd"), commands(), ids=[p or "convergent" for p, _ in
                                                           commands()])
def test_help_is_plain_and_complete(path: str, cmd: click.Command) -> None:
    result = CliRunner().invoke(cli, [*path.split(), "-h"], terminal_width=100)
    assert result.exit_code == 0, result.output
    text = result.output
    assert text.startswith("Usage: ")
    assert cmd.help and cmd.get_short_help_str().strip()
    for junk in ("``", "(dynamic)", "[default: (", ":func:", ".. "):
        assert junk not in text, (path, junk)
    for p in cmd.params:
        if isinstance(p, click.Option) and not p.hidden:
            assert p.help and p.help[0].isupper() and p.help.rstrip().endswith((".", "]")), \
                (path, p.opts, p.help)


def test_one_meaning_per_short_flag() -> None:
    seen: dict[str, set[str]] = {}
    for _, cmd in commands():
        for p in cmd.params:
            shorts = [o for o in p.opts if re.fullmatch(r"-[a-zA-Z]", o)]
            longs = [o for o in p.opts if o.startswith("--")]
            for s in shorts:
                seen.setdefault(s, set()).update(longs)
    seen["-h"] = {"--help"}
    assert {s: sorted(v) for s, v in seen.items()} == \
        {s: [long] for s, long in SHORT_FLAGS.items() if s in seen}


def exit_status(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as done:
        main(argv)
    return int(done.value.code or 0), capsys.readouterr().err


def test_exit_statuses(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                       tmp_path: Path) -> None:
    code, err = exit_status(["status", "--bogus"], capsys)
    assert code == 2 and err.startswith("convergent: No such option '--bogus'")
    code, err = exit_status(["render-rules", "--config", str(tmp_path / "none.toml")], capsys)
    assert code == 1 and err.startswith("convergent: ") and len(err.splitlines()) == 1

    def fail(error: Exception):
        def run(*_: object, **__: object) -> None:
            raise error
        return run

    import orchestrator.cli.rules as rules
    seed = str(ROOT / "examples" / "seed-2node.toml")
    for error, expected in ((Degraded("half done"), 3), (ConvergentError("no"), 1)):
        monkeypatch.setattr(rules, "load_for_node", fail(error))
        code, err = exit_status(["render-rules", "--config", seed], capsys)
        assert (code, err) == (expected, f"convergent: {error}\n")


def test_readme_documents_the_exit_statuses() -> None:
    readme = (ROOT / "README.md").read_text()
    for code in ("0", "1", "2", "3", "70", "130"):
        assert re.search(rf"^\| `{code}` \|", readme, re.M), code
