"""Which relay of several: a race of TLS handshakes, and a home relay the agent keeps.

Choosing is connecting. The agent opens TLS to the best few candidates at
once (RFC 8305's idea, for relays instead of addresses), keeps the first
to finish its handshake and closes the others before any ``hello``, so
losers hold no session. Every handshake that finishes is a measurement of
its relay, remembered in the agent's state directory.

Once it has a home relay the agent stays there unless another is clearly
faster: at least ``CLEARLY_FASTER_MS`` and a third faster, comparing the
medians of at least ``MIN_SAMPLES`` handshakes of each. A tunnel's name
belongs to its relay, so a home that changed with every small wobble of
the network would change every tunnel's name with it.

:func:`decide` and :class:`Memory` are pure; :func:`race` does the I/O.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final

from burrow.exception import ConnectionError, Error
from burrow.net.files import write_atomically
from burrow.net.stream import TlsStream
from burrow.wire.text import loggable

if TYPE_CHECKING:
    from burrow.fleet import Fleet

log = logging.getLogger("burrow.agent")

# Candidates dialled at once: enough that a dead or far relay costs nothing,
# few enough that a fleet of agents does not double every relay's handshakes.
MAX_RACERS: Final = 3

# "Clearly faster" (Tailscale's rule for changing its home DERP region): at
# least this many milliseconds and a third faster, over several measurements.
CLEARLY_FASTER_MS: Final = 10.0
CLEARLY_FASTER_SHARE: Final = 2 / 3
MIN_SAMPLES: Final = 3

# What the agent remembers: the last handshakes of each relay, and at most
# this many sets of candidates (the file stays small whatever runs here).
SAMPLES_KEPT: Final = 8
SETS_KEPT: Final = 32

# Where the agent keeps what it learns of relays.
ENV_AGENT_STATE_DIR: Final = "BURROW_AGENT_STATE_DIR"
MEMORY_FILE: Final = "relays.json"


def parse_relays(text: str) -> tuple[str, ...]:
    """The relays of ``BURROW_RELAY``: ``host:port`` entries separated by commas, each once."""
    relays: list[str] = []
    for entry in text.split(","):
        entry = entry.strip()
        if entry and entry not in relays:
            relays.append(entry)
    return tuple(relays)


def clearly_faster(home: Sequence[float], other: Sequence[float]) -> bool:
    """Whether ``other``'s handshakes (ms) beat ``home``'s clearly enough to move home."""
    if len(home) < MIN_SAMPLES or len(other) < MIN_SAMPLES:
        return False
    at_home, there = statistics.median(home), statistics.median(other)
    return there + CLEARLY_FASTER_MS <= at_home and there <= at_home * CLEARLY_FASTER_SHARE


@dataclass
class Memory:
    """What the agent knows of one set of candidates: its home, and handshake times (ms)."""

    home: str | None = None
    rtt: dict[str, list[float]] = field(default_factory=dict)

    def measured(self, relay: str, milliseconds: float) -> None:
        samples = self.rtt.setdefault(relay, [])
        samples.append(round(milliseconds, 3))
        del samples[:-SAMPLES_KEPT]

    def ordered(self, candidates: Sequence[str]) -> list[str]:
        """Home first, then the others by their median handshake (unmeasured last, as given)."""

        def rank(item: tuple[int, str]) -> tuple[int, float, int]:
            index, relay = item
            if relay == self.home:
                return (0, 0.0, index)
            samples = self.rtt.get(relay)
            return (1, statistics.median(samples), index) if samples else (2, 0.0, index)

        return [relay for _, relay in sorted(enumerate(candidates), key=rank)]


def decide(memory: Memory, first: str, home_connected: bool) -> str:
    """The relay to keep, ``first`` having finished its handshake first.

    The home stays unless it failed (``home_connected`` False) or ``first`` is
    clearly faster; with no home yet, the first wins.
    """
    home = memory.home
    if home is None or home == first or not home_connected:
        return first
    if clearly_faster(memory.rtt.get(home, []), memory.rtt.get(first, [])):
        return first
    return home


# -- the file ----------------------------------------------------------------------


def state_dir() -> Path:
    """``$BURROW_AGENT_STATE_DIR``, else ``$XDG_STATE_HOME/burrow/agent``, else
    ``~/.local/state/burrow/agent``."""
    explicit = os.environ.get(ENV_AGENT_STATE_DIR)
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "burrow" / "agent"


class Memories:
    """Every candidate set's :class:`Memory`, in one small JSON file (private, written whole)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    @staticmethod
    def key(candidates: Sequence[str]) -> str:
        return ",".join(sorted(candidates))

    def _read(self) -> dict[str, dict[str, object]]:
        if self.path is None:
            return {}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}  # none yet, or spoiled: start again
        return data if isinstance(data, dict) else {}

    def load(self, candidates: Sequence[str]) -> Memory:
        entry = self._read().get(self.key(candidates))
        memory = Memory()
        if not isinstance(entry, dict):
            return memory
        home = entry.get("home")
        memory.home = home if isinstance(home, str) and home in candidates else None
        rtt = entry.get("rtt")
        if isinstance(rtt, dict):
            for relay, samples in rtt.items():
                if relay in candidates and isinstance(samples, list):
                    memory.rtt[relay] = [
                        float(s) for s in samples[-SAMPLES_KEPT:] if isinstance(s, (int, float))
                    ]
        return memory

    def save(self, candidates: Sequence[str], memory: Memory) -> None:
        if self.path is None:
            return
        data = self._read()
        key = self.key(candidates)
        data.pop(key, None)
        data[key] = {"home": memory.home, "rtt": memory.rtt, "at": time.time()}
        while len(data) > SETS_KEPT:  # the oldest first: dicts keep insertion order
            data.pop(next(iter(data)))
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            write_atomically(self.path, json.dumps(data).encode())
        except (OSError, Error) as exc:
            log.debug("could not keep what was learnt of relays in %s: %s", self.path, exc)


def memories() -> Memories:
    return Memories(state_dir() / MEMORY_FILE)


# -- the fleet document, as relays hand it out -----------------------------------------


def _fleet_path(relays: Sequence[str]) -> Path:
    digest = hashlib.sha256(Memories.key(relays).encode()).hexdigest()[:16]
    return state_dir() / "fleets" / f"{digest}.jws"


def kept_fleet(relays: Sequence[str], now: float | None = None) -> Fleet | None:
    """The fleet document a relay of ``relays`` gave this agent, if it is kept and not
    expired. Read without its signature: it came from a relay whose certificate the
    agent checked, and the file is the agent's own (0600)."""
    from burrow.fleet import FleetError, read_unverified

    try:
        fleet = read_unverified(_fleet_path(relays).read_text(encoding="ascii"))
    except (OSError, UnicodeDecodeError, FleetError):
        return None
    return None if fleet.expired(time.time() if now is None else now) else fleet


def keep_fleet(relays: Sequence[str], document: str) -> Fleet | None:
    """Keep ``document`` (from ``welcome.fleet``) if it reads well and is newer."""
    from burrow.fleet import FleetError, read_unverified

    try:
        fleet = read_unverified(document)
    except FleetError as exc:
        log.info("a relay gave a fleet document that does not read: %s", exc)
        return None
    kept = kept_fleet(relays)
    if kept is not None and kept.serial >= fleet.serial:
        return kept
    path = _fleet_path(relays)
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_atomically(path, document.encode("ascii"))
    except (OSError, UnicodeEncodeError, Error) as exc:
        log.debug("could not keep the fleet document in %s: %s", path, exc)
    log.info("fleet document %d: %d relays", fleet.serial, len(fleet.relays))
    return fleet


def candidates(relays: Sequence[str]) -> list[str]:
    """``relays`` (BURROW_RELAY's), then the other relays of the fleet document kept
    for them that take new agents (weight above 0), the heavier first."""
    listed = list(relays)
    fleet = kept_fleet(relays)
    if fleet is None:
        return listed
    extra = sorted(
        (r for r in fleet.relays if r.weight > 0 and r.address not in listed),
        key=lambda r: -r.weight,
    )
    return listed + [r.address for r in extra]


# -- the race ----------------------------------------------------------------------

Dial = Callable[[str], Awaitable[TlsStream]]

_measuring: set[asyncio.Task[None]] = set()


@dataclass
class Winner:
    relay: str
    stream: TlsStream
    seconds: float
    """How long its TCP connect and TLS handshake took."""


async def race(
    candidates: Sequence[str],
    dial: Dial,
    memory: Memory,
    *,
    racers: int = MAX_RACERS,
    keep: Callable[[Memory], None] | None = None,
) -> Winner:
    """Dial the best ``racers`` of ``candidates`` at once and keep one (see :func:`decide`).

    The others are measured as their handshakes finish, then closed (cleanly:
    the relay sees a connection that said nothing, and no session), and
    ``keep(memory)`` is called once all are in. Raises ConnectionError naming
    every relay tried when none could be reached.
    """
    ordered = memory.ordered(candidates)[:racers]
    loop = asyncio.get_running_loop()
    started = loop.time()

    async def timed(relay: str) -> tuple[str, TlsStream, float]:
        stream = await dial(relay)
        return relay, stream, loop.time() - started

    tasks = {loop.create_task(timed(relay)): relay for relay in ordered}
    connected: dict[str, tuple[TlsStream, float]] = {}
    failed: dict[str, BaseException] = {}
    chosen: str | None = None
    pending = set(tasks)
    try:
        while pending and chosen is None:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                error = task.exception()
                if error is not None:
                    failed[tasks[task]] = error
                    continue
                relay, stream, seconds = task.result()
                connected[relay] = (stream, seconds)
                memory.measured(relay, seconds * 1000)
            if not connected:
                continue
            first = min(connected, key=lambda r: connected[r][1])
            home = memory.home
            waiting_for_home = home is not None and home in {tasks[t] for t in pending}
            if waiting_for_home and home != first:
                assert home is not None
                if not clearly_faster(memory.rtt.get(home, []), memory.rtt.get(first, [])):
                    continue  # the home is not clearly beaten: wait for it
            chosen = decide(memory, first, home is not None and home in connected)
    except BaseException:
        for task in tasks:
            task.cancel()
        for stream, _ in connected.values():
            stream.close()
        raise
    if chosen is None:
        why = "; ".join(f"{relay}: {loggable(exc)}" for relay, exc in failed.items())
        raise ConnectionError(f"could not reach any burrow relay ({why})")
    for relay, (stream, _) in connected.items():
        if relay != chosen:
            stream.close()
    if memory.home != chosen:
        if memory.home is not None:
            log.info("relay %s is clearly faster than %s: it is home now", chosen, memory.home)
        memory.home = chosen
    if pending:
        measuring = loop.create_task(_measure_rest(pending, memory, keep))
        _measuring.add(measuring)  # held until done: the loop keeps only weak references
        measuring.add_done_callback(_measuring.discard)
    elif keep is not None:
        keep(memory)
    stream, seconds = connected[chosen]
    return Winner(chosen, stream, seconds)


async def _measure_rest(
    pending: set[asyncio.Task[tuple[str, TlsStream, float]]],
    memory: Memory,
    keep: Callable[[Memory], None] | None,
) -> None:
    """The handshakes still running after the race: each a measurement, then closed."""
    for task in pending:
        try:
            relay, stream, seconds = await task
        except Exception:
            continue
        memory.measured(relay, seconds * 1000)
        stream.close()
    if keep is not None:
        keep(memory)
