"""Tunnel: the addresses ``burrow.forward()`` yields, as plain data."""

from __future__ import annotations

import dataclasses

import pytest

from burrow import Tunnel
from burrow.exception import InvalidError

TCP_ERROR = (
    "This tunnel is not configured for unencrypted TCP. "
    "Please use `forward(..., unencrypted=True)`."
)


def test_url_leaves_out_the_default_https_port() -> None:
    tunnel = Tunnel(host="wtqcahqwhd4tu0.r1.example.com", port=443)
    assert tunnel.url == "https://wtqcahqwhd4tu0.r1.example.com"
    assert ":443" not in tunnel.url
    assert tunnel.tls_socket == ("wtqcahqwhd4tu0.r1.example.com", 443)


def test_url_names_any_other_port() -> None:
    tunnel = Tunnel(host="wtqcahqwhd4tu0.r1.localhost", port=4443)
    assert tunnel.url == "https://wtqcahqwhd4tu0.r1.localhost:4443"
    assert tunnel.tls_socket == ("wtqcahqwhd4tu0.r1.localhost", 4443)


def test_tunnel_is_frozen() -> None:
    tunnel = Tunnel(host="wtqcahqwhd4tu0.r1.example.com", port=443)
    with pytest.raises(dataclasses.FrozenInstanceError):
        tunnel.host = "other.r1.example.com"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        tunnel.unencrypted_port = 20000  # type: ignore[misc]
    assert hash(tunnel) == hash(Tunnel(host="wtqcahqwhd4tu0.r1.example.com", port=443))


def test_tcp_socket_of_an_encrypted_only_tunnel_is_an_error() -> None:
    tunnel = Tunnel(host="wtqcahqwhd4tu0.r1.example.com", port=443)
    with pytest.raises(InvalidError) as info:
        _ = tunnel.tcp_socket
    assert str(info.value) == TCP_ERROR


@pytest.mark.parametrize(("tcp_host", "tcp_port"), [("r1.example.com", None), (None, 20000)])
def test_tcp_socket_needs_both_host_and_port(tcp_host: str | None, tcp_port: int | None) -> None:
    tunnel = Tunnel(
        host="wtqcahqwhd4tu0.r1.example.com",
        port=443,
        unencrypted_host=tcp_host,
        unencrypted_port=tcp_port,
    )
    with pytest.raises(InvalidError) as info:
        _ = tunnel.tcp_socket
    assert str(info.value) == TCP_ERROR


def test_tcp_socket_of_an_unencrypted_tunnel() -> None:
    tunnel = Tunnel(
        host="wtqcahqwhd4tu0.r1.example.com",
        port=443,
        unencrypted_host="r1.example.com",
        unencrypted_port=23456,
    )
    assert tunnel.tcp_socket == ("r1.example.com", 23456)
    assert tunnel.url == "https://wtqcahqwhd4tu0.r1.example.com"
