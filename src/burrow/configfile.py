"""A TOML file of a command's options: ``burrow relay --config relay.toml``.

Keys come from the click command itself (``--token-key`` is ``token-key``), so
an option added to the command has its key at once; the file's values become
the command's defaults, which the command line overrides. Errors name the key
and the line it is on.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol, TypeVar, runtime_checkable

import click
from click.core import ParameterSource

# Where the file's values wait between the eager --config callback and the
# command's body; a context's meta is per invocation.
_CHECK: Final = "burrow.configfile.check"
_SOURCE: Final = "burrow.configfile.path"

# The options that read the file are not keys in it.
_OWN: Final = frozenset({"config", "check_config"})

# Words that make a string option a secret in --check-config's output. A path
# is never one (the file it names is protected by its mode, and the operator
# needs to see which file is used), nor a number (--max-tunnels-per-token).
# An e-mail address is not a secret either: the operator typed it, the CA
# gets it, and a typo in it is one of the things the check is for.
_SECRET_WORDS: Final = frozenset(
    {"token", "secret", "password", "passphrase", "hmac", "credential", "credentials", "apikey"}
)
MASK: Final = "********"


class ConfigFileError(click.ClickException):
    """The file cannot be read, is not TOML, or a key in it is wrong: exit status 2,
    as for a wrong option on the command line."""

    exit_code = 2


@runtime_checkable
class Formats(Protocol):
    """A click type whose values are written back to TOML as its own text
    (``(20000, 29999)`` as ``"20000-29999"``)."""

    def to_text(self, value: Any) -> str: ...


class OneOrMore(click.Option):
    """A repeatable option that the file may also set to one value rather than an
    array: one that took a single value before it could be repeated (``token-key``),
    so that files written then still read."""


# -- keys -----------------------------------------------------------------------


def key_of(param: click.Parameter) -> str:
    """The key of an option: its first long name without the dashes."""
    for opt in param.opts:
        if opt.startswith("--"):
            return opt[2:]
    return (param.name or "").replace("_", "-")


def keys(command: click.Command) -> dict[str, click.Option]:
    """Every option of ``command`` that the file may set, by key, in declaration order."""
    return {
        key_of(param): param
        for param in command.params
        if isinstance(param, click.Option) and param.name not in _OWN
    }


def is_secret(param: click.Parameter) -> bool:
    """Whether --check-config masks this option's value (see _SECRET_WORDS)."""
    if not isinstance(param, click.Option) or param.is_flag:
        return False
    if param.hide_input:
        return True
    if not isinstance(param.type, click.types.StringParamType):
        return False
    words = set(key_of(param).split("-")) | {key_of(param).replace("-", "")}
    return bool(words & _SECRET_WORDS)


# -- where each key is ----------------------------------------------------------

_BARE: Final = re.compile(r"[A-Za-z0-9_-]+")


def key_lines(text: str) -> dict[tuple[str, ...], int]:
    """The line (from 1) where each key path is first written in a TOML document.

    tomllib gives values but no positions. This reads the statements of a
    document that tomllib has already accepted: ``[table]`` headers and
    ``key = value`` lines, with dotted and quoted keys; values are skipped
    whole, so a multi-line string or array that contains ``x = 1`` is not
    taken for a key. Every prefix of a path is recorded too: the line of
    ``a`` in ``a.b = 1`` is that line.
    """
    scanner = _Scanner(text)
    lines: dict[tuple[str, ...], int] = {}
    table: tuple[str, ...] = ()
    for line, path, is_table in scanner.statements():
        full = path if is_table else table + path
        if is_table:
            table = path
        for end in range(1, len(full) + 1):
            lines.setdefault(full[:end], line)
    return lines


def _basic_string(raw: str) -> str:
    import tomllib  # loaded already: the text was parsed with it

    value: str = tomllib.loads(f"k = {raw}")["k"]
    return value


class _Scanner:
    """Just enough of TOML to find where statements start (the text is valid TOML)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.line = 1

    def statements(self) -> Iterator[tuple[int, tuple[str, ...], bool]]:
        while True:
            self._skip_blank()
            if self.pos >= len(self.text):
                return
            line = self.line
            if self.text[self.pos] == "[":
                self.pos += 2 if self.text.startswith("[[", self.pos) else 1
                path = self._key()
                self._to_end_of_line()
                yield line, path, True
            else:
                path = self._key()
                self._skip_spaces()
                self.pos += 1  # "="
                self._value()
                yield line, path, False

    def _skip_spaces(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos] in " \t":
            self.pos += 1

    def _skip_blank(self) -> None:
        while self.pos < len(self.text):
            char = self.text[self.pos]
            if char in " \t\r":
                self.pos += 1
            elif char == "\n":
                self.pos += 1
                self.line += 1
            elif char == "#":
                self._to_end_of_line()
            else:
                return

    def _to_end_of_line(self) -> None:
        end = self.text.find("\n", self.pos)
        self.pos = len(self.text) if end < 0 else end

    def _key(self) -> tuple[str, ...]:
        parts: list[str] = []
        while True:
            self._skip_spaces()
            start = self.pos
            char = self.text[self.pos]
            if char in "\"'":
                self._string(char)
                raw = self.text[start : self.pos]
                parts.append(raw[1:-1] if char == "'" else _basic_string(raw))
            else:
                match = _BARE.match(self.text, self.pos)
                assert match is not None, "not valid TOML"
                parts.append(match.group())
                self.pos = match.end()
            self._skip_spaces()
            if self.pos < len(self.text) and self.text[self.pos] == ".":
                self.pos += 1
                continue
            return tuple(parts)

    def _string(self, quote: str) -> None:
        """Past a string that starts at pos: basic or literal, one line or many."""
        text = self.text
        triple = quote * 3
        if text.startswith(triple, self.pos):
            self.pos += 3
            while not text.startswith(triple, self.pos):
                if quote == '"' and text[self.pos] == "\\":
                    self._advance()
                self._advance()
            self.pos += 3
            # Up to two more quotes belong to the string: """a""""" is 'a""'.
            for _ in range(2):
                if self.pos < len(text) and text[self.pos] == quote:
                    self.pos += 1
            return
        self.pos += 1
        while text[self.pos] != quote:
            if quote == '"' and text[self.pos] == "\\":
                self.pos += 1
            self.pos += 1
        self.pos += 1

    def _advance(self) -> None:
        if self.text[self.pos] == "\n":
            self.line += 1
        self.pos += 1

    def _value(self) -> None:
        """Past a value and the rest of its last line (arrays may span lines)."""
        depth = 0
        text = self.text
        while self.pos < len(text):
            char = text[self.pos]
            if char in "\"'":
                self._string(char)
            elif char == "#":
                self._to_end_of_line()
            elif char == "\n":
                if depth == 0:
                    return
                self._advance()
            elif char in "[{":
                depth += 1
                self.pos += 1
            elif char in "]}":
                depth -= 1
                self.pos += 1
            else:
                self.pos += 1


# -- reading a file -------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """One thing wrong in the file: a key, the line it is on, and what is wrong."""

    key: str
    line: int | None
    message: str

    def text(self, path: Path) -> str:
        where = f"{path}, line {self.line}" if self.line else str(path)
        return f"{where}: {self.key}: {self.message}"


def load(path: Path, command: click.Command, ctx: click.Context | None = None) -> dict[str, Any]:
    """The file's settings as a click ``default_map`` (parameter name -> value).

    Raises ConfigFileError listing every problem, each with its key and line.
    """
    import tomllib

    try:
        text = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigFileError(f"cannot read the config file {path}: {exc}") from exc
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigFileError(f"{path} is not valid TOML: {exc}") from exc
    values, problems = parse(
        document, key_lines(text), command, base=path.absolute().parent, ctx=ctx
    )
    if len(problems) == 1:
        raise ConfigFileError(problems[0].text(path))
    if problems:
        raise ConfigFileError(
            f"{len(problems)} problems in {path}:\n"
            + "\n".join("  " + problem.text(path) for problem in problems)
        )
    return values


def parse(
    document: Mapping[str, Any],
    lines: Mapping[tuple[str, ...], int],
    command: click.Command,
    *,
    base: Path,
    ctx: click.Context | None = None,
) -> tuple[dict[str, Any], list[Problem]]:
    """Check a parsed document against ``command``'s options.

    Returns the default_map and the problems found. Relative paths are taken
    from ``base``, the file's directory: a unit file's working directory is
    ``/``, and ``cert = "fullchain.pem"`` beside relay.toml should mean that.
    """
    known = keys(command)
    values: dict[str, Any] = {}
    problems: list[Problem] = []
    for key, value in document.items():
        line = lines.get((key,))
        param = known.get(key)
        if param is None:
            problems.append(Problem(key, line, _unknown(key, value, known)))
            continue
        try:
            values[str(param.name)] = _check(param, value, base, ctx)
        except _WrongValue as exc:
            problems.append(Problem(key, line, str(exc)))
    return values, problems


class _WrongValue(Exception):
    pass


def _unknown(key: str, value: Any, known: Mapping[str, click.Option]) -> str:
    if isinstance(value, dict):
        nested = [key + "-" + "-".join(sub) for sub in _paths(value)]
        hint = [name for name in nested if name in known]
        return "tables are not used: every key is at the top level" + (
            f" (did you mean {', '.join(hint)}?)" if hint else ""
        )
    close = difflib.get_close_matches(key.replace("_", "-").lower(), list(known), n=1)
    return "unknown key" + (f" (did you mean {close[0]}?)" if close else "")


def _paths(table: Mapping[str, Any]) -> Iterator[tuple[str, ...]]:
    for key, value in table.items():
        if isinstance(value, dict):
            for sub in _paths(value):
                yield (key, *sub)
        else:
            yield (key,)


def _toml_type(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return f"a {type(value).__name__}"  # dates and times


def _expected(param_type: click.ParamType[Any]) -> tuple[tuple[type, ...], str]:
    """The TOML types an option's type takes, and how to say so."""
    if isinstance(param_type, click.types.BoolParamType):
        return (bool,), "a boolean (true or false)"
    if isinstance(param_type, click.types.IntParamType):
        return (int,), "an integer"
    if isinstance(param_type, click.types.FloatParamType):
        return (int, float), "a number"
    if isinstance(param_type, click.Path):
        return (str,), "a string (a path)"
    if isinstance(param_type, click.Choice):
        choices = ", ".join(json.dumps(str(choice)) for choice in param_type.choices)
        return (str,), f"one of {choices}"
    name = param_type.name.upper()
    return (str,), "a string" + (f" ({name})" if name not in ("TEXT", "STRING") else "")


def _check(param: click.Option, value: Any, base: Path, ctx: click.Context | None) -> Any:
    if param.is_flag and not param.count:
        if not isinstance(value, bool):
            raise _WrongValue(f"must be true or false, not {_toml_type(value)}")
        if param.is_bool_flag:
            return value
        return param.flag_value if value else param.default
    if param.count:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise _WrongValue(f"must be a count (an integer, 0 or more), not {_toml_type(value)}")
        return value
    if isinstance(param, OneOrMore) and not isinstance(value, list):
        value = [value]
    if param.multiple or param.nargs != 1:
        shape = "an array" if param.nargs == 1 else f"an array of {param.nargs}"
        if not isinstance(value, list):
            example = key_of(param) + " = [" + json.dumps(str(value)) + "]"
            raise _WrongValue(f"must be {shape} ({example}), not {_toml_type(value)}")
        if param.multiple and param.nargs != 1:
            raise _WrongValue("options with several values per use have no key yet")
        if param.nargs != 1 and len(value) != param.nargs:
            raise _WrongValue(f"must be an array of {param.nargs} values, not {len(value)}")
        return [
            _item(param, item, base, ctx, f"item {index}")
            for index, item in enumerate(value, start=1)
        ]
    return _item(param, value, base, ctx, "")


def _item(
    param: click.Option, value: Any, base: Path, ctx: click.Context | None, where: str
) -> Any:
    prefix = f"{where}: " if where else ""
    accepted, described = _expected(param.type)
    if (isinstance(value, bool) and bool not in accepted) or not isinstance(value, accepted):
        raise _WrongValue(f"{prefix}must be {described}, not {_toml_type(value)}")
    if isinstance(param.type, click.Path):
        value = str(base / Path(str(value)).expanduser()) if value else value
    try:
        param.type.convert(value, param, ctx)
    except click.BadParameter as exc:
        raise _WrongValue(prefix + exc.message) from None
    return value


# -- the command's side ---------------------------------------------------------

_Command = TypeVar("_Command", bound=Callable[..., Any])


def options(command: _Command) -> _Command:
    """``--config FILE`` and ``--check-config`` on a click command (put above @command)."""

    def read(ctx: click.Context, param: click.Parameter, value: Path | None) -> None:
        if value is None:
            return
        assert isinstance(ctx.command, click.Command)
        ctx.meta[_SOURCE] = value
        ctx.default_map = {**(ctx.default_map or {}), **load(value, ctx.command, ctx)}

    def check(ctx: click.Context, param: click.Parameter, value: bool) -> None:
        ctx.meta[_CHECK] = value

    command = click.option(
        "--check-config",
        is_flag=True,
        expose_value=False,
        callback=check,
        help="Check the settings (the --config file and the command line), print them "
        "with secrets masked, and exit: 0 if they are valid.",
    )(command)
    return click.option(
        "--config",
        type=click.Path(dir_okay=False, path_type=Path),
        is_eager=True,
        expose_value=False,
        callback=read,
        metavar="FILE",
        help="TOML file of these options (key: the option's name, e.g. token-key); "
        "the command line overrides it.",
    )(command)


def checking() -> bool:
    """Whether this run of the command is ``--check-config``: show settings, start nothing."""
    return bool(click.get_current_context().meta.get(_CHECK))


def effective_settings(ctx: click.Context) -> str:
    """The command's settings after the file and the command line, as TOML, each with
    where it came from; secrets masked, unset options as comments."""
    source = ctx.meta.get(_SOURCE)
    origin = {
        ParameterSource.COMMANDLINE: "command line",
        ParameterSource.ENVIRONMENT: "environment",
        ParameterSource.DEFAULT_MAP: str(source) if source else "config file",
        ParameterSource.DEFAULT: "default",
        ParameterSource.PROMPT: "prompt",
    }
    out = [f"# burrow {ctx.info_name}: effective settings (command line > config file > default)"]
    for key, param in keys(ctx.command).items():
        name = str(param.name)
        value = ctx.params.get(name)
        where = origin.get(ctx.get_parameter_source(name) or ParameterSource.DEFAULT, "default")
        if value is None or (param.multiple and not value):
            out.append(f"# {key} is not set ({where})")
            continue
        if is_secret(param):
            out.append(f"{key} = {_toml_string(MASK)}  # {where}; secret, masked")
            continue
        out.append(f"{key} = {_toml(param, value)}  # {where}")
    return "\n".join(out)


def _toml(param: click.Option, value: Any) -> str:
    if param.multiple or (param.nargs != 1 and isinstance(value, tuple | list)):
        return "[" + ", ".join(_toml_scalar(param, item) for item in value) + "]"
    return _toml_scalar(param, value)


def _toml_scalar(param: click.Option, value: Any) -> str:
    if isinstance(param.type, Formats):
        value = param.type.to_text(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return _toml_string(str(value))


def _toml_string(text: str) -> str:
    """A TOML basic string: JSON's, with non-ASCII kept whole (TOML has no surrogate
    pairs) and DEL escaped (TOML forbids it raw)."""
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")
