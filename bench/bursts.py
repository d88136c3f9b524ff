"""Memory over repeated bursts: relay and agent RSS after each of N bursts of visitors.

    python bench/bursts.py [--rounds 10] [--visitors 1000] [--tcp]

The relay (`burrow dev`), the agent and the local echo server run as
processes of their own, as in bench/scale.py; each burst is that file's
1,000 concurrent visitors (echo, wait until all are up, echo again, close)
over the HTTPS address, or the raw TCP port with --tcp. A relay or agent
that keeps what finished visitors left behind grows round after round; a
sound one levels off after the first. Prints a Markdown table (about 1 minute).
"""

from __future__ import annotations

import argparse
import asyncio
import ssl
from collections.abc import Awaitable

import _relayproc as rp
from scale import SETTLE_SECONDS, Connect, Visitors

# After a burst, before RSS is read: closes finish and the pool refills.
AFTER_BURST_SECONDS = 2.0


async def run(rounds: int, visitors: int, tcp: bool) -> None:
    rp.raise_nofile()
    with rp.processes() as procs:
        relay = rp.start_relay(procs)
        echo = rp.start_local_server(procs, "echo")
        agent = rp.start_agent(procs, relay, echo, tcp=tcp)
        tunnel = agent.tunnel
        connect: Connect
        if tcp:

            def connect() -> Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
                return asyncio.open_connection("127.0.0.1", tunnel["tcp_port"])
        else:
            context = ssl.create_default_context(cafile=relay.ca)

            def connect() -> Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
                return asyncio.open_connection(
                    "127.0.0.1", tunnel["port"], ssl=context, server_hostname=tunnel["host"]
                )

        await asyncio.sleep(SETTLE_SECONDS)
        kind = "raw TCP" if tcp else "HTTPS"
        print(f"{rounds} bursts of {visitors:,} {kind} visitors through one tunnel\n")
        print(
            "| after burst | relay RSS (MiB) | agent RSS (MiB) | relay fds | agent fds | errors |"
        )
        print("|--:|--:|--:|--:|--:|--:|")
        print(row("before", relay.pid, agent.pid, "-"))
        for round_ in range(1, rounds + 1):
            burst = Visitors(visitors, connect, lambda: None)
            await burst.run()
            await asyncio.sleep(AFTER_BURST_SECONDS)
            print(row(str(round_), relay.pid, agent.pid, str(sum(burst.errors.values()))))


def row(label: str, relay: int, agent: int, errors: str) -> str:
    rss = [f"{rp.mib(rp.rss_bytes(pid)):.1f}" for pid in (relay, agent)]
    fds = [str(rp.open_fds(pid)) for pid in (relay, agent)]
    return "| " + " | ".join([label, *rss, *fds, errors]) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--visitors", type=int, default=1000)
    parser.add_argument("--tcp", action="store_true", help="visit the raw TCP port instead")
    args = parser.parse_args()
    asyncio.run(run(args.rounds, args.visitors, args.tcp))


if __name__ == "__main__":
    main()
