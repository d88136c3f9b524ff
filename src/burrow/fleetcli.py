"""``burrow fleet sign|verify``: the operator's fleet document (burrow.fleet)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import click

from burrow.exception import Error, InvalidError


def _utc(timestamp: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


@click.group("fleet")
def fleet() -> None:
    """The fleet document: the relays of a fleet and its revoked tokens, signed."""


@fleet.command("sign")
@click.option(
    "--key",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="The token-signing key (burrow token keygen); relays verify with its public half.",
)
@click.option(
    "--kid",
    default=None,
    help="The key id relays know the key by; checked against --key (default: its own).",
)
@click.option(
    "--serial",
    type=click.IntRange(1),
    required=True,
    help="Greater than every serial signed before (e.g. $(date +%s)): relays take only a "
    "newer document.",
)
@click.option(
    "--expires",
    default="30d",
    show_default=True,
    help="How long the document is valid: 12h, 30d, 1w... Sign a new one before then.",
)
@click.option(
    "--relays",
    "relays_file",
    type=click.Path(exists=True, dir_okay=False, readable=True, path_type=Path),
    required=True,
    help="TOML file of [[relay]] tables: name, address (host:port), region, weight.",
)
@click.option(
    "--revoked-tokens",
    type=click.Path(exists=True, dir_okay=False, readable=True, path_type=Path),
    default=None,
    metavar="FILE",
    help="Revocation list whose token ids the document revokes (burrow token revoke --list).",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Where to write the document; replaced whole (relays never read half of one).",
)
def fleet_sign(
    key: Path,
    kid: str | None,
    serial: int,
    expires: str,
    relays_file: Path,
    revoked_tokens: Path | None,
    out: Path,
) -> None:
    """Sign a fleet document for relays' --fleet."""
    from burrow import fleet as fleet_document
    from burrow import tokens

    try:
        signing_key = tokens.read_signing_key(key)
        if kid is not None and kid != tokens.key_id(signing_key):
            raise InvalidError(
                f"--kid {kid} is not the id of {key} ({tokens.key_id(signing_key)}); "
                "relays know a key by the id of its public half"
            )
        ttl = tokens.parse_duration(expires)
        if ttl is None:
            raise InvalidError("a fleet document must expire: give --expires such as 30d")
        relays = fleet_document.parse_relays_file(_read(relays_file))
        revoked = tokens.parse_revocation_list(_read(revoked_tokens)) if revoked_tokens else ()
        now = int(time.time())
        text = fleet_document.sign(
            signing_key,
            serial=serial,
            expires=now + ttl,
            relays=relays,
            revoked=revoked,
            now=now,
        )
        _replace(out, text + "\n")
    except Error as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(
        f"fleet document {serial} ({len(relays)} relays, {len(set(revoked))} revoked tokens, "
        f"expires {_utc(now + ttl)}) written to {out}"
    )


@fleet.command("verify")
@click.option(
    "--token-key",
    type=click.Path(path_type=Path),
    multiple=True,
    required=True,
    help="A public key (or a directory of *.pem) as relays are given it; repeat for several.",
)
@click.argument("document", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def fleet_verify(token_key: tuple[Path, ...], document: Path) -> None:
    """Check a fleet document the way a relay does and show what it says."""
    from burrow import fleet as fleet_document
    from burrow import tokens

    try:
        checked = fleet_document.verify(_read(document), tokens.read_public_keys(token_key))
    except Error as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"serial: {checked.serial}")
    click.echo(f"key: {checked.key_id}")
    if checked.issued:
        click.echo(f"issued: {_utc(checked.issued)}")
    click.echo(f"expires: {_utc(checked.expires)}")
    click.echo(f"relays: {len(checked.relays)}")
    for relay in checked.relays:
        region = f" region={relay.region}" if relay.region else ""
        click.echo(f"  {relay.name} {relay.address}{region} weight={relay.weight}")
    click.echo(f"revoked: {len(checked.revoked)}")
    for token_id in sorted(checked.revoked):
        click.echo(f"  {token_id}")


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise InvalidError(f"cannot read {path}: {exc.strerror}") from exc


def _replace(path: Path, text: str) -> None:
    """Write ``path`` whole: a new file renamed over the old, so a relay re-reading
    it meanwhile sees the old document or the new one, never part of one."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with temporary.open("w", encoding="utf-8") as file:
            file.write(text)
        os.chmod(temporary, 0o644)  # relays run as their own user
        os.replace(temporary, path)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise InvalidError(f"cannot write {path}: {exc.strerror}") from exc
