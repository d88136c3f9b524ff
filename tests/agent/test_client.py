"""The client side that needs no relay: where the agent's configuration comes
from, forward()'s argument checks, and the runtime's event-loop thread."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import burrow
from burrow.agent import client as client_module
from burrow.agent.client import Client, workload_env
from burrow.agent.session import AgentConfig
from burrow.exception import InvalidError

NOT_INSIDE = "Forwarding works only inside a burrow workload: no relay credentials were found"


@pytest.fixture(autouse=True)
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """No BURROW_* variable, and a dev relay state directory with nothing running."""
    for name in list(os.environ):
        if name.startswith("BURROW_"):
            monkeypatch.delenv(name)
    state = tmp_path / "dev"
    monkeypatch.setenv("BURROW_STATE_DIR", str(state))
    yield state


def _dev_relay(state: Path, pid: int, **settings: str) -> None:
    """What a running ``burrow dev`` leaves in its state directory."""
    state.mkdir(parents=True, exist_ok=True)
    (state / "relay.pid").write_text(f"{pid}\n")
    (state / "env").write_text("".join(f"{key}={value}\n" for key, value in settings.items()))


# -- Client.config() -------------------------------------------------------------------


def test_config_from_arguments() -> None:
    client = Client(relay="relay.example:8443", token=" tok\n", ca="/x/ca.pem", plain_data=True)
    assert client.config() == AgentConfig(
        relay="relay.example:8443", token="tok", ca=Path("/x/ca.pem"), plain_data=True
    )
    assert Client(relay="r:1", token="t", workload="w1").config().workload == "w1"


def test_config_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BURROW_RELAY", "relay.example")
    monkeypatch.setenv("BURROW_TOKEN", "tok")
    monkeypatch.setenv("BURROW_CA", "/x/ca.pem")
    monkeypatch.setenv("BURROW_PLAIN_DATA", "1")
    monkeypatch.setenv("BURROW_WORKLOAD", "w1")
    config = Client().config()
    assert config == AgentConfig("relay.example", "tok", Path("/x/ca.pem"), True, "w1")
    assert config.relays == ("relay.example",)


def test_several_relays(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BURROW_RELAY", " r1.example:443, r2.example:8443,,r1.example:443 ")
    monkeypatch.setenv("BURROW_TOKEN", "tok")
    config = Client().config()
    assert config.relays == ("r1.example:443", "r2.example:8443")
    assert config.relay == "r1.example:443,r2.example:8443"
    assert Client(relay=["a.example", "b.example"]).config().relays == ("a.example", "b.example")
    monkeypatch.setenv("BURROW_FAILOVER_SECONDS", "5")
    assert Client().config().failover == 5.0
    monkeypatch.setenv("BURROW_FAILOVER_SECONDS", "soon")
    with pytest.raises(InvalidError, match="BURROW_FAILOVER_SECONDS"):
        Client().config()
    monkeypatch.delenv("BURROW_FAILOVER_SECONDS")
    for bad in (",", "r1.example:99999,r2.example", "r1.example:x"):
        monkeypatch.setenv("BURROW_RELAY", bad)
        with pytest.raises(InvalidError):
            Client().config()


def test_arguments_win_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BURROW_RELAY", "env.example")
    monkeypatch.setenv("BURROW_TOKEN", "env-token")
    monkeypatch.setenv("BURROW_PLAIN_DATA", "1")
    monkeypatch.setenv("BURROW_WORKLOAD", "env-workload")
    config = Client(relay="arg.example", plain_data=False, workload="arg-workload").config()
    assert config == AgentConfig("arg.example", "env-token", None, False, "arg-workload")


@pytest.mark.parametrize(
    ("value", "plain"),
    [("1", True), ("true", True), (" YES ", True), ("0", False), ("", False), ("no", False)],
)
def test_plain_data_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, value: str, plain: bool
) -> None:
    monkeypatch.setenv("BURROW_PLAIN_DATA", value)
    assert Client(relay="r:1", token="t").config().plain_data is plain


def test_empty_variables_are_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BURROW_CA", "")
    monkeypatch.setenv("BURROW_WORKLOAD", "")
    config = Client(relay="r:1", token="t").config()
    assert config.ca is None
    assert config.workload is None


def test_no_relay_anywhere() -> None:
    with pytest.raises(InvalidError) as info:
        Client().config()
    message = str(info.value)
    assert message.startswith(f"{NOT_INSIDE} (BURROW_RELAY, BURROW_TOKEN not set).")
    assert "burrow dev" in message
    assert "burrow.Client(relay=..., token=...)" in message


def test_a_relay_without_a_token(monkeypatch: pytest.MonkeyPatch, env: Path) -> None:
    # Half the settings given: a running dev relay does not fill in the rest.
    _dev_relay(env, os.getpid(), BURROW_RELAY="dev.localhost:1", BURROW_TOKEN="dev-token")
    monkeypatch.setenv("BURROW_RELAY", "relay.example")
    with pytest.raises(InvalidError, match=r"\(BURROW_TOKEN not set\)"):
        Client().config()


def test_a_running_dev_relay_is_found(env: Path) -> None:
    _dev_relay(
        env,
        os.getpid(),
        BURROW_RELAY="dev.localhost:8443",
        BURROW_TOKEN="dev-token",
        BURROW_CA="/dev/ca.pem",
    )
    assert Client().config() == AgentConfig("dev.localhost:8443", "dev-token", Path("/dev/ca.pem"))
    # Explicit settings still come first.
    assert Client(relay="r:1", token="t").config() == AgentConfig("r:1", "t")


def test_a_dev_relay_that_has_exited_is_ignored(env: Path) -> None:
    child = os.fork()
    if child == 0:  # pragma: no cover - the child only exits
        os._exit(0)
    os.waitpid(child, 0)  # a pid that no process has now
    _dev_relay(env, child, BURROW_RELAY="dev.localhost:8443", BURROW_TOKEN="dev-token")
    with pytest.raises(InvalidError, match=NOT_INSIDE):
        Client().config()


@pytest.mark.parametrize(
    "config",
    [
        AgentConfig("relay.example:8443", "tok"),
        AgentConfig("relay.example", "tok", Path("/x/ca.pem"), plain_data=True, workload="w1"),
    ],
)
def test_workload_env_gives_a_workload_the_same_config(config: AgentConfig) -> None:
    env = workload_env(config, base={"PATH": "/bin", "BURROW_PLAIN_DATA": ""})
    assert env["PATH"] == "/bin"
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        assert Client().config() == config


# -- forward()'s arguments, checked before any relay is looked for -----------------------


@pytest.mark.parametrize(
    ("port", "message"),
    [
        ("8000", "The port argument should be an int, not '8000'"),
        (True, "The port argument should be an int, not True"),
        (0, "Invalid port number 0"),
        (65536, "Invalid port number 65536"),
    ],
)
def test_forward_checks_its_port(port: object, message: str) -> None:
    with pytest.raises(InvalidError) as info:
        burrow.forward(port)  # type: ignore[arg-type]
    assert str(info.value) == message


def test_forward_refuses_h2_on_a_raw_tcp_port() -> None:
    with pytest.raises(InvalidError, match="H2 can only be used with encrypted ports"):
        burrow.forward(8000, unencrypted=True, h2_enabled=True)


def test_forward_checks_its_allowlist() -> None:
    with pytest.raises(InvalidError, match=r"^inbound_cidr_allowlist: "):
        burrow.forward(8000, inbound_cidr_allowlist=["not a network"])


def test_forward_without_a_relay() -> None:
    with pytest.raises(InvalidError, match=NOT_INSIDE):
        burrow.forward(8000)


def test_forward_resolves_its_config_when_made() -> None:
    handle = burrow.forward(8000, client=Client(relay="r:1", token="t"))
    assert handle.config == AgentConfig("r:1", "t")


# -- the runtime's loop thread ------------------------------------------------------------


@pytest.fixture
def runtime() -> Iterator[client_module._Runtime]:
    runtime = client_module._Runtime()
    yield runtime
    runtime._thread.stop(timeout=5)


def test_the_runtime_runs_coroutines_on_its_own_thread(
    runtime: client_module._Runtime,
) -> None:
    async def where() -> str:
        await asyncio.sleep(0)
        return threading.current_thread().name

    assert runtime.run(where()) == "burrow-agent"
    assert runtime.submit(where()).result(timeout=5) == "burrow-agent"
    assert runtime.loop() is runtime.loop()


def test_the_blocking_api_refuses_its_own_loop(runtime: client_module._Runtime) -> None:
    async def inner() -> None:
        pass

    async def outer() -> None:
        runtime.run(inner())

    with pytest.raises(InvalidError, match="cannot be called from its own event loop"):
        runtime.run(outer())
