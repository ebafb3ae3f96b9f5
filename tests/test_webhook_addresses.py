"""SSRF: webhook receivers must be public unicast, in every spelling of an address (NAT64, 6to4,
IPv4-mapped and -compatible, Teredo, numeric IPv4 forms), and the request goes to the address that
was checked (one DNS lookup per attempt: no rebinding window)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from ipaddress import ip_address
from typing import Any

import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from domain.addresses import embedded_ipv4, refusal
from domain.models import Base, Job, Tenant, WebhookDelivery
from domain.webhooks import WebhookUrlError, attempt, check_url, resolve

REFUSED = [
    "http://169.254.169.254/latest/meta-data", "http://127.0.0.1:9/x", "http://0.0.0.0/", "http://10.1.2.3/",
    "http://172.16.0.1/", "http://192.168.1.1/", "http://100.64.0.1/", "http://192.0.0.1/", "http://198.18.0.1/",
    "http://192.88.99.1/", "http://224.0.0.1/", "http://240.0.0.1/", "http://255.255.255.255/",
    "http://2130706433/", "http://0x7f.1/", "http://017700000001/",  # 127.0.0.1 in numeric forms
    "http://[::1]/", "http://[::]/", "http://[fd00::1]/", "http://[fe80::1]/", "http://[ff02::1]/",
    "http://[64:ff9b::a9fe:a9fe]/", "http://[64:ff9b::7f00:1]/",  # NAT64 of 169.254.169.254, 127.0.0.1
    "http://[2002:a9fe:a9fe::1]/", "http://[2002:7f00:1::1]/",  # 6to4
    "http://[::ffff:127.0.0.1]/", "http://[::ffff:a9fe:a9fe]/",  # IPv4-mapped
    "http://[::127.0.0.1]/", "http://[::a9fe:a9fe]/",  # IPv4-compatible
    "http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/",  # Teredo
    "http://[64:ff9b:1::1]/", "http://[100::1]/", "http://[2001:db8::1]/", "http://[3fff::1]/",
    "https://[fec0::1]:8443/",
]


@pytest.mark.parametrize("url", REFUSED)
def test_special_purpose_addresses_are_refused(url: str) -> None:
    with pytest.raises(WebhookUrlError, match="non-public"):
        check_url(url, allow_private=False)


def test_public_addresses_and_their_nat64_and_6to4_forms_pass() -> None:
    for text in ("93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946", "64:ff9b::5db8:d822", "2002:5db8:d822::1"):
        assert refusal(ip_address(text)) is None, text
    assert embedded_ipv4(ip_address("64:ff9b::a9fe:a9fe")) == ip_address("169.254.169.254")  # type: ignore[arg-type]
    assert embedded_ipv4(ip_address("2002:a9fe:a9fe::1")) == ip_address("169.254.169.254")  # type: ignore[arg-type]


def test_not_http_or_no_host_is_refused() -> None:
    for url in ("ftp://example.com/x", "file:///etc/passwd", "http:///x", "http://example.com:99999/"):
        with pytest.raises(WebhookUrlError):
            check_url(url, allow_private=True)


class _Answers:
    """getaddrinfo that answers `hook.test` from a list, one answer per lookup, and counts lookups."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *answers: list[str]) -> None:
        self.answers, self.lookups = list(answers), 0
        real = socket.getaddrinfo

        def lookup(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
            if host != "hook.test":
                return real(host, port, *args, **kwargs)
            self.lookups += 1
            addresses = self.answers[min(self.lookups, len(self.answers)) - 1]
            return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "",
                     (a, port)) for a in addresses]

        monkeypatch.setattr(socket, "getaddrinfo", lookup)


def test_a_name_with_any_private_address_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    _Answers(monkeypatch, ["93.184.216.34", "64:ff9b::a9fe:a9fe"])
    with pytest.raises(WebhookUrlError, match="64:ff9b::a9fe:a9fe"):
        resolve("https://hook.test/x", allow_private=False)


@pytest.fixture
def receiver() -> Iterator[tuple[int, list[dict[str, str]]]]:
    seen: list[dict[str, str]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802  (http.server's naming)
            self.rfile.read(int(self.headers["content-length"]))
            seen.append({name.lower(): value for name, value in self.headers.items()})
            self.send_response(204)
            self.end_headers()

        def log_message(self, *_args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1], seen
    server.shutdown()
    server.server_close()


def _session() -> Session:
    engine = create_engine("sqlite://")
    Base.metadata.create_all(engine)
    session = Session(engine)
    session.add(Tenant(id="t", name="t", webhook_secret="whsec_" + "A" * 32))
    session.add(Job(id="j", tenant_id="t", queue="cpu", config={}, model_key="m", data_key="d", max_attempts=1))
    session.commit()
    return session


def _deliver(session: Session, url: str, allow_private: bool) -> float | None:
    return attempt(session, job_id="j", url=url, secret="whsec_" + "A" * 32, event_type="job.started",
                   event_id="msg_1", body="{}", attempt_no=1, schedule=[1.0], timeout=5, allow_private=allow_private)


def test_the_request_goes_to_the_address_resolved_once(monkeypatch: pytest.MonkeyPatch,
                                                       receiver: tuple[int, list[dict[str, str]]]) -> None:
    """The name is looked up once and the connection goes to that answer with the URL's host in the
    Host header: a second lookup (127.0.0.2, where nothing listens) would fail the delivery."""
    port, seen = receiver
    answers = _Answers(monkeypatch, ["127.0.0.1"], ["127.0.0.2"])
    session = _session()
    assert _deliver(session, f"http://hook.test:{port}/hook", allow_private=True) is None
    assert answers.lookups == 1
    assert len(seen) == 1 and seen[0]["host"] == f"hook.test:{port}"
    assert session.scalars(select(WebhookDelivery)).one().status_code == 204


def test_a_refused_address_is_never_connected_to(monkeypatch: pytest.MonkeyPatch,
                                                 receiver: tuple[int, list[dict[str, str]]]) -> None:
    port, seen = receiver
    _Answers(monkeypatch, ["::ffff:127.0.0.1"])
    session = _session()
    assert _deliver(session, f"http://hook.test:{port}/hook", allow_private=False) is None  # not retried
    delivery = session.scalars(select(WebhookDelivery)).one()
    assert not delivery.succeeded and "non-public" in (delivery.error or "") and delivery.status_code is None
    assert seen == []
