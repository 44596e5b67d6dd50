"""Options and conventions every command shares.

- ``--json``: every command that reports prints one JSON document on stdout instead of its
  text (``audit show/follow``: JSON lines, one record each); errors stay on stderr.
- Exit status: 0 ok; 1 failed; 2 usage (bad option or argument); 3 degraded: done, but not
  all of it (``Degraded``); 70 internal error (a bug); 130 interrupted.
- A short flag has one meaning everywhere: ``-h`` help, ``-n`` the last N records,
  ``-o`` an output file.
"""

from __future__ import annotations

import json
from typing import Any

import click

JSON = click.option("--json", "as_json", is_flag=True,
                    help="Print the result as JSON on stdout instead of text.")


def echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))
