"""burrow.configfile: keys from click options, where each key is, what is wrong and where.

Documents are parsed in memory, and commands are built here or taken from
burrow.cli and run in process (CliRunner); one test imports burrow.cli in a
fresh interpreter.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from burrow import cli, configfile

BASE = Path("/etc/burrow")


def check(text: str, command: click.Command = cli.relay) -> tuple[dict[str, Any], list[str]]:
    """The default_map and the problems (as 'key@line: message') of a document."""
    values, problems = configfile.parse(
        tomllib.loads(text), configfile.key_lines(text), command, base=BASE
    )
    return values, [f"{p.key}@{p.line}: {p.message}" for p in problems]


# -- keys -----------------------------------------------------------------------


def test_every_option_of_the_relay_has_a_key_named_as_on_the_command_line() -> None:
    options = [
        p for p in cli.relay.params if isinstance(p, click.Option) and p.name != "check_config"
    ]
    options = [p for p in options if p.name != "config"]
    keys = configfile.keys(cli.relay)
    assert len(keys) == len(options) > 10
    for option in options:
        key = configfile.key_of(option)
        assert keys[key] is option
        assert f"--{key}" in option.opts
    assert {"domain", "token-key", "listen", "tcp-ports", "drain-timeout"} <= set(keys)
    assert "config" not in keys and "check-config" not in keys


def test_the_relay_accepts_a_file_with_its_every_default_written_back() -> None:
    """Each option's default, as --check-config prints it, is a valid value of its key."""
    ctx = cli.relay.make_context(
        "relay",
        ["--domain", "r1.example.com", "--cert", "c", "--key", "k", "--token-key", "t"],
    )
    with ctx:
        text = configfile.effective_settings(ctx)
    document = tomllib.loads(text)
    values, problems = check(text)
    assert problems == []
    assert document["domain"] == "r1.example.com"
    assert document["listen"] == ["0.0.0.0:443", "[::]:443"]
    assert document["tcp-ports"] == "20000-29999"
    assert values["tcp_ports"] == "20000-29999"
    assert "# public-port is not set (default)" in text.splitlines()


def test_the_command_line_loads_tomllib_only_when_a_file_is_read() -> None:
    probe = "import sys, burrow.cli; print('tomllib' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "False"


# -- lines ----------------------------------------------------------------------

TRICKY = '''\
# a comment with key = "value"
domain = "r1.example.com"   # trailing comment

"token-key" = 'keys/token-public.pem'
listen = [
    "127.0.0.1:443",   # ] not the end
    '[::1]:443',
]
motd = """
heartbeat = 3
a multi-line string with "quotes" and \\""" escaped ones
"""
literal = \'\'\'
workers = 2
\'\'\'
a.b . "c" = 1
tcp-ports = "20000-29999"
[table]
inner = {x = 1, y = [1, 2]}
[[list]]
name = "first"
'''


def test_key_lines_finds_every_statement_and_no_value_text() -> None:
    lines = configfile.key_lines(TRICKY)
    assert lines[("domain",)] == 2
    assert lines[("token-key",)] == 4
    assert lines[("listen",)] == 5
    assert lines[("motd",)] == 9
    assert lines[("literal",)] == 13
    assert lines[("a",)] == lines[("a", "b")] == lines[("a", "b", "c")] == 16
    assert lines[("tcp-ports",)] == 17
    assert lines[("table",)] == 18 and lines[("table", "inner")] == 19
    assert lines[("list",)] == 20 and lines[("list", "name")] == 21
    assert ("heartbeat",) not in lines and ("workers",) not in lines
    assert set(tomllib.loads(TRICKY)) == {k[0] for k in lines}


def test_key_lines_with_windows_line_ends_and_escaped_quotes() -> None:
    text = 'one = "a \\" b = 2"\r\n\r\ntwo = 2\r\n"th\\u0072ee" = 3\r\n'
    assert configfile.key_lines(text) == {("one",): 1, ("two",): 3, ("three",): 4}


# -- problems -------------------------------------------------------------------


def test_an_unknown_key_is_named_with_its_line_and_the_nearest_known_one() -> None:
    _, problems = check('domain = "r1.example.com"\n\ndrain_timeout = 5\nfrobnicate = 1\n')
    assert problems == [
        "drain_timeout@3: unknown key (did you mean drain-timeout?)",
        "frobnicate@4: unknown key",
    ]


def test_tables_are_refused_at_their_header_or_dotted_key() -> None:
    _, problems = check('domain = "x"\nhandshake.timeout = 3\n\n[max]\ntunnel-rate = 2\n')
    assert problems == [
        "handshake@2: tables are not used: every key is at the top level "
        "(did you mean handshake-timeout?)",
        "max@4: tables are not used: every key is at the top level",
    ]


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ('heartbeat = "10"', "heartbeat@2: must be an integer, not a string"),
        ("heartbeat = true", "heartbeat@2: must be an integer, not a boolean"),
        ("heartbeat = 0", "heartbeat@2: 0 is not in the range 1<=x<=3600."),
        ("drain-timeout = true", "drain-timeout@2: must be a number, not a boolean"),
        ('listen = "127.0.0.1:443"', 'listen@2: must be an array (listen = ["127.0.0.1:443"]), '
         "not a string"),
        ('listen = ["a:1", 443]', "listen@2: item 2: must be a string, not an integer"),
        ("tcp-ports = [1, 2]", "tcp-ports@2: must be a string (LOW-HIGH), not an array"),
        ('tcp-ports = "9-1"', "tcp-ports@2: '9-1' is not a port range within 1-65535"),
        ('log-level = "loud"', "log-level@2: 'loud' is not one of 'debug', 'info', 'warning', "
         "'error'."),
        ("cert = 1", "cert@2: must be a string (a path), not an integer"),
        ("domain = 1979-05-27", "domain@2: must be a string, not a date"),
    ],
)  # fmt: skip
def test_a_wrong_value_is_named_with_its_key_and_line(line: str, problem: str) -> None:
    _, problems = check(f"# relay\n{line}\n")
    assert problems == [problem]


def test_relative_paths_are_taken_from_the_files_directory() -> None:
    values, problems = check('cert = "fullchain.pem"\nkey = "/abs/privkey.pem"\n')
    assert problems == []
    assert values == {"cert": "/etc/burrow/fullchain.pem", "key": "/abs/privkey.pem"}


def test_token_key_is_one_path_or_several() -> None:
    """One value, as before it could be repeated, or an array (a key rotation)."""
    assert check('token-key = "keys/old.pem"') == ({"token_key": [f"{BASE}/keys/old.pem"]}, [])
    assert check('token-key = ["old.pem", "/k/new.pem"]') == (
        {"token_key": [f"{BASE}/old.pem", "/k/new.pem"]},
        [],
    )
    # Other repeatable options still want an array.
    assert check('listen = "127.0.0.1:443"')[1] != []


def test_load_reports_every_problem_with_the_files_name(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text('heartbeat = "x"\nworkers = 0\n')
    with pytest.raises(configfile.ConfigFileError) as caught:
        configfile.load(path, cli.relay)
    assert caught.value.exit_code == 2
    assert caught.value.message.splitlines() == [
        f"2 problems in {path}:",
        f"  {path}, line 1: heartbeat: must be an integer, not a string",
        f"  {path}, line 2: workers: 0 is not in the range 1<=x<=256.",
    ]
    path.write_text('domain = "unterminated\n')
    with pytest.raises(configfile.ConfigFileError, match=r"not valid TOML: .*line 1"):
        configfile.load(path, cli.relay)
    with pytest.raises(configfile.ConfigFileError, match="cannot read the config file"):
        configfile.load(tmp_path / "missing.toml", cli.relay)


# -- a command with the options -------------------------------------------------


@click.command()
@configfile.options
@click.option("--name", required=True)
@click.option("--admin-token", default=None)
@click.option("--password", default=None, hide_input=True)
@click.option("--token-key", type=click.Path(path_type=Path), default=None)
@click.option("--max-tunnels-per-token", type=int, default=5)
@click.option("--acme-email", default=None)
@click.option("--verbose", is_flag=True)
@click.option("--fast/--no-fast", default=False)
@click.option("--peer", multiple=True)
def toy(**values: Any) -> None:
    if configfile.checking():
        click.echo(configfile.effective_settings(click.get_current_context()))
        return
    SEEN.update(values)


SEEN: dict[str, Any] = {}


def test_the_command_line_overrides_the_file(tmp_path: Path) -> None:
    path = tmp_path / "toy.toml"
    path.write_text(
        'name = "from-file"\nverbose = true\nfast = true\npeer = ["a", "b"]\n'
        'token-key = "k.pem"\nmax-tunnels-per-token = 7\n'
    )
    SEEN.clear()
    result = CliRunner().invoke(
        toy, ["--config", str(path), "--name", "from-cli", "--peer", "c", "--no-fast"]
    )
    assert result.exit_code == 0, result.output
    values = SEEN
    assert values["name"] == "from-cli"
    assert values["peer"] == ("c",)  # the command line's list replaces the file's
    assert values["fast"] is False
    assert values["verbose"] is True
    assert values["max_tunnels_per_token"] == 7
    assert values["token_key"] == tmp_path / "k.pem"


def test_check_config_masks_secrets_and_says_where_each_value_came_from(tmp_path: Path) -> None:
    path = tmp_path / "toy.toml"
    path.write_text(
        'name = "n"\nadmin-token = "hunter2"\npassword = "swordfish"\n'
        'acme-email = "ops@example.com"\ntoken-key = "/k.pem"\n'
    )
    result = CliRunner().invoke(toy, ["--config", str(path), "--check-config", "--verbose"])
    assert result.exit_code == 0, result.output
    assert "hunter2" not in result.output and "swordfish" not in result.output
    lines = result.output.splitlines()
    assert f'admin-token = "********"  # {path}; secret, masked' in lines
    assert f'password = "********"  # {path}; secret, masked' in lines
    assert f'acme-email = "ops@example.com"  # {path}' in lines
    assert f'token-key = "/k.pem"  # {path}' in lines
    assert "max-tunnels-per-token = 5  # default" in lines
    assert "verbose = true  # command line" in lines
    assert "# peer is not set (default)" in lines


def test_which_options_are_secrets() -> None:
    secret = {configfile.key_of(p) for p in toy.params if configfile.is_secret(p)}
    assert secret == {"admin-token", "password"}
    relay = configfile.keys(cli.relay)
    for path_or_number in ("token-key", "revoked-tokens", "cert", "key", "max-tunnels-per-token"):
        assert not configfile.is_secret(relay[path_or_number]), path_or_number


def test_a_flag_takes_a_boolean_only(tmp_path: Path) -> None:
    path = tmp_path / "toy.toml"
    path.write_text('name = "n"\nverbose = "yes"\n')
    result = CliRunner().invoke(toy, ["--config", str(path)])
    assert result.exit_code == 2
    assert f"{path}, line 2: verbose: must be true or false, not a string" in result.output


# -- key_lines against tomllib, on generated documents ---------------------------

_KEYS = st.text(alphabet="abcxyz-_0.\" '=#[]\n\\", min_size=1, max_size=8)
_VALUES = st.recursive(
    st.integers() | st.booleans() | st.text(alphabet="ab=#[]{}\"'\\\n .", max_size=12),
    lambda inner: st.lists(inner, max_size=3),
    max_leaves=6,
)


def _toml_value(value: Any, style: int) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):
        sep = ",\n  # a comment, with x = 1\n  " if style % 2 else ", "
        return "[" + sep.join(_toml_value(item, style) for item in value) + "]"
    if style % 3 == 0 and "'''" not in value and "'" not in value[-1:]:
        return "'''\n" + value + "'''"  # multi-line literal: its lines are not keys
    if style % 3 == 1:
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return '"""\n' + escaped + '"""'
    return configfile._toml_string(value)


def _toml_key(key: str) -> str:
    if re.fullmatch(r"[A-Za-z0-9_-]+", key):
        return key
    return configfile._toml_string(key)


@given(st.dictionaries(_KEYS, st.tuples(_VALUES, st.integers(0, 5), st.integers(0, 2)), max_size=6))
def test_key_lines_finds_the_line_of_every_key_of_a_generated_document(
    document: dict[str, tuple[Any, int, int]],
) -> None:
    lines: list[str] = ["# generated"]
    expected: dict[tuple[str, ...], int] = {}
    for key, (value, style, blank) in document.items():
        lines.extend([""] * blank)
        expected[(key,)] = sum(line.count("\n") + 1 for line in lines) + 1
        lines.append(f"{_toml_key(key)} = {_toml_value(value, style)}  # x = 2")
    text = "\n".join(lines) + "\n"
    assert tomllib.loads(text).keys() == document.keys()
    assert configfile.key_lines(text) == expected
