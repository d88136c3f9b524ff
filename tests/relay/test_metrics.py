"""The relay's counters, their samples, and the Prometheus text made of them."""

from __future__ import annotations

import json

import pytest
from prometheus_client.parser import text_string_to_metric_families

from burrow.relay import metrics
from burrow.relay.admin import counts, merged_samples, render
from burrow.relay.metrics import FAMILIES, Histogram, RelayMetrics, merge


def _samples(m: RelayMetrics, **gauges: float) -> metrics.Samples:
    """Samples as observe.samples makes them, without a relay: the counters and some gauges."""
    by_one = lambda d: metrics.labelled(((k,), v) for k, v in d.items())  # noqa: E731
    return {
        "sessions": gauges.get("sessions", 0),
        "sessions_ended_total": by_one(m.sessions_ended),
        "tunnels": by_one(dict.fromkeys(metrics.TUNNEL_KINDS, gauges.get("tunnels", 0))),
        "tunnel_opens_total": by_one(m.tunnel_opens),
        "tunnel_open_errors_total": by_one(m.tunnel_open_errors),
        "visitors_total": metrics.labelled(m.visitors.items()),
        "visitors_connected": gauges.get("visitors", 0),
        "data_connection_wait_seconds": metrics.histogram_sample(m.data_connection_wait),
        "bytes_total": metrics.labelled(
            [(("to-agent",), m.bytes_to_agent), (("to-visitor",), m.bytes_to_visitor)]
        ),
        "tls_handshakes_total": by_one(m.handshakes),
        "tls_handshake_seconds": metrics.histogram_sample(m.handshake_time),
        "handshakes_pending": 0,
        "auth_failures_total": by_one(m.auth_failures),
        "pooled_data_connections": 0,
        "revoked_tokens": gauges.get("revoked_tokens", 0),
        "certificate_expiry_timestamp_seconds": gauges.get("expiry", 2_000_000_000),
        "certificate_renewals_total": by_one(m.renewals),
        "dns_queries_total": metrics.labelled(m.dns.items()),
        "admin_unauthorized_total": m.admin_unauthorized,
        "workers": 1,
        "build_info": metrics.labelled([(("1.0", "r1.example.com"), 1)]),
    }


def _parse(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            found[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return found


def test_every_family_is_rendered_with_its_prefix_and_type() -> None:
    text = render(_samples(RelayMetrics()))
    families = {f.name: f for f in text_string_to_metric_families(text.decode())}
    for family in FAMILIES:
        name = metrics.PREFIX + family.name
        if family.kind == "counter":
            name = name.removesuffix("_total")
        assert name in families, name
        assert families[name].type == family.kind


def test_counts_come_out_as_counted() -> None:
    m = RelayMetrics()
    m.count_visitor("https", "joined")
    m.count_visitor("https", "joined")
    m.count_visitor("tcp", "allowlist")
    m.count_session_end("heartbeat")
    m.count_open_error("limit")
    m.count_auth_failure("bad-signature")
    m.data_connection_wait.observe(0.0002)
    m.data_connection_wait.observe(3.0)
    found = _parse(render(_samples(m)))
    visitors = "burrow_relay_visitors_total"
    assert found[visitors, (("kind", "https"), ("result", "joined"))] == 2
    assert found[visitors, (("kind", "tcp"), ("result", "allowlist"))] == 1
    assert found[visitors, (("kind", "h2"), ("result", "joined"))] == 0
    assert found["burrow_relay_sessions_ended_total", (("reason", "heartbeat"),)] == 1
    assert found["burrow_relay_tunnel_open_errors_total", (("code", "limit"),)] == 1
    assert found["burrow_relay_auth_failures_total", (("reason", "bad-signature"),)] == 1
    wait = "burrow_relay_data_connection_wait_seconds"
    assert found[wait + "_count", ()] == 2
    assert found[wait + "_sum", ()] == pytest.approx(3.0002)
    assert found[wait + "_bucket", (("le", "0.0005"),)] == 1
    assert found[wait + "_bucket", (("le", "2.5"),)] == 1
    assert found[wait + "_bucket", (("le", "5.0"),)] == 2
    assert found[wait + "_bucket", (("le", "+Inf"),)] == 2


def test_label_values_from_peers_cannot_add_series() -> None:
    m = RelayMetrics()
    before = len(_parse(render(_samples(m))))
    for code in ("no-such-code", "x" * 1000, "\n# HELP evil"):
        m.count_open_error(code)
        m.count_auth_failure(code)
        m.count_dns(code, "answered")
    found = _parse(render(_samples(m)))
    assert len(found) == before
    assert found["burrow_relay_tunnel_open_errors_total", (("code", "other"),)] == 3
    assert found["burrow_relay_auth_failures_total", (("reason", "other"),)] == 3


def test_refusals_kept_are_bounded() -> None:
    m = RelayMetrics()
    for i in range(metrics.REFUSALS_KEPT * 3):
        m.refused(float(i), "unknown-name", "127.0.0.1:1", "no tunnel at this name")
    assert len(m.refusals) == metrics.REFUSALS_KEPT
    assert m.refusals[-1].time == metrics.REFUSALS_KEPT * 3 - 1


def test_histogram_buckets_hold_their_upper_bound() -> None:
    h = Histogram((1.0, 2.0))
    for value in (0.5, 1.0, 1.5, 2.0, 9.0):
        h.observe(value)
    assert h.counts == [2, 2, 1]
    assert h.sum == 14.0


def test_workers_sum_with_each_familys_rule() -> None:
    a, b = RelayMetrics(), RelayMetrics()
    a.count_visitor("https", "joined")
    b.count_visitor("https", "joined")
    b.count_visitor("https", "joined")
    a.data_connection_wait.observe(0.001)
    b.data_connection_wait.observe(0.001)
    one = _samples(a, sessions=2, revoked_tokens=5, expiry=2_000_000_000)
    two = _samples(b, sessions=3, revoked_tokens=5, expiry=1_900_000_000)
    # As JSON, as the other worker sends it.
    two = json.loads(json.dumps(two))
    merged = merge([one, two])
    assert merged["sessions"] == 5
    assert merged["revoked_tokens"] == 5  # every worker reads the same list
    assert merged["certificate_expiry_timestamp_seconds"] == 1_900_000_000
    assert merged["build_info"] == one["build_info"]
    joined = {tuple(row[:-1]): row[-1] for row in merged["visitors_total"]}  # type: ignore[union-attr]
    assert joined["https", "joined"] == 3
    assert merged["data_connection_wait_seconds"]["counts"][1] == 2  # type: ignore[index]


def test_merged_samples_count_the_workers_that_answered() -> None:
    one = {"pid": 10, "worker": 0, "samples": _samples(RelayMetrics(), sessions=1)}
    two = {"pid": 11, "worker": 1, "samples": _samples(RelayMetrics(), sessions=2)}
    gone = {"worker": 2, "samples": {"visitors_total": one["samples"]["visitors_total"]}}
    merged = merged_samples([one, two, gone], 3)
    assert merged["workers"] == 2
    assert counts(merged)["sessions"] == 3
