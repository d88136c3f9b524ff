"""The relay's own certificate for ``<domain>`` and ``*.<domain>`` through ACME DNS-01.

One order covers both names; both authorizations are proved by TXT records of
``_acme-challenge.<domain>``, which the relay's DNS zone (or any
:class:`ChallengeSink`) serves, both values at once. The account key, the
certificate and its key live in ``<state dir>/acme/``, written atomically.

The ACME library (certbot's ``acme``) is synchronous, so every call to the CA
runs in a thread. The schedule is pure (:class:`Schedule`, time passed in):
renew in the CA's ACME Renewal Information window (RFC 9773) when it offers
one, else at two thirds of the lifetime; back off with jitter on failure;
warn at one third of the lifetime left, and loudly at one sixth.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import logging
import random as _random
import time
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol

from acme import challenges, client, crypto_util, errors, messages
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from josepy.errors import DeserializationError
from josepy.jwa import ES256
from josepy.jwk import JWKEC

from burrow._version import __version__
from burrow.exception import Error, InvalidError
from burrow.net.files import write_atomically
from burrow.relay.config import ACME_DIRECTORY, ACME_TIMEOUT, RelayConfig

log = logging.getLogger("burrow.relay.acme")


# How long one order may take, authorizations polled and certificate fetched.
ORDER_TIMEOUT: Final = 120.0

# Seconds one HTTP request to the CA may take.
NETWORK_TIMEOUT: Final = 30

# Back-off after a failed renewal: the first retry after about a minute,
# doubling to at most an hour, each delay jittered down to half so that a
# fleet of relays that failed together does not retry together. For short-lived
# certificates the cap is a twelfth of the lifetime, so a few retries fit in.
RETRY_FIRST: Final = 60.0
RETRY_MAX: Final = 3600.0

# A stored certificate is reused on restart while more than this share of its
# life is left (the CA limits duplicate certificates; a renewal would come at
# two thirds anyway).
REUSE_LEFT: Final = 1 / 3
# Renew at this share of the lifetime when the CA offers no renewal window.
RENEW_AT: Final = 2 / 3
# Log a warning when a certificate has this share of its life left and has
# not been renewed; an error at the second.
WARN_LEFT: Final = 1 / 3
ALARM_LEFT: Final = 1 / 6

ACCOUNT_KEY_FILE: Final = "account-key.pem"
CERT_FILE: Final = "cert.pem"
KEY_FILE: Final = "key.pem"

_PUBLIC_MODE = 0o644


class ChallengeSink(Protocol):
    """Where the TXT records of ``_acme-challenge.<domain>`` go: the relay's DNS zone."""

    def set_challenge(self, values: list[str]) -> None: ...

    def clear_challenge(self) -> None: ...


class CaaSink(Protocol):
    """Where the CAA record of ``<domain>`` goes: the relay's DNS zone."""

    def set_caa(self, issuer: str | None, account_uri: str | None = None) -> None: ...


class AcmeError(Error):
    """Getting a certificate failed; the message is one line that says what to fix."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


@dataclass(frozen=True)
class AcmeSettings:
    """What the relay needs to get its certificate."""

    domain: str
    """The relay's name; the certificate covers it and ``*.domain``."""

    state_dir: Path
    """The relay's state directory; ACME's files go in ``acme/`` under it."""

    email: str | None = None
    """Contact address for the CA's account (expiry notices), or none."""

    directory: str = ACME_DIRECTORY
    """The CA's ACME directory URL."""

    ca_bundle: Path | None = None
    """PEM certificates trusted for the ACME server besides the usual ones."""

    issue_timeout: float = ACME_TIMEOUT
    """Seconds the relay waits for its first certificate before it gives up."""

    caa: str | None = None
    """The CA's domain from ``--dns-caa``: when given, the zone's CAA record is bound to
    this relay's account (RFC 8657) once it is known; None leaves CAA alone."""

    retry_first: float = RETRY_FIRST
    """Seconds before the first retry of a failed renewal (then doubling)."""

    retry_max: float = RETRY_MAX
    """The longest wait between two tries."""

    @classmethod
    def of(cls, config: RelayConfig) -> AcmeSettings:
        """The settings of a relay started with ``--auto-cert``."""
        if config.state_dir is None:
            raise InvalidError(
                "--auto-cert needs --state-dir: the ACME account and certificate are kept there"
            )
        return cls(
            domain=config.domain,
            state_dir=config.state_dir,
            email=config.acme_email,
            directory=config.acme_directory,
            ca_bundle=config.acme_ca_bundle,
            issue_timeout=config.acme_timeout,
            caa=config.dns_caa,
        )

    @property
    def dir(self) -> Path:
        return self.state_dir / "acme"

    @property
    def cert(self) -> Path:
        """PEM chain of the current certificate (the relay's ``--cert``)."""
        return self.dir / CERT_FILE

    @property
    def key(self) -> Path:
        """Its private key (mode 0600)."""
        return self.dir / KEY_FILE

    @property
    def names(self) -> list[str]:
        return [self.domain, f"*.{self.domain}"]


@dataclass(frozen=True)
class Certificate:
    """A certificate on disk and the times that matter for its renewal (epoch seconds)."""

    pem: bytes
    not_before: float
    not_after: float

    @property
    def lifetime(self) -> float:
        return self.not_after - self.not_before

    def left(self, now: float) -> float:
        """Share of its lifetime still ahead at ``now`` (may be negative)."""
        return (self.not_after - now) / self.lifetime if self.lifetime > 0 else 0.0


# -- the schedule (pure) ---------------------------------------------------------


def reusable(cert: Certificate, now: float) -> bool:
    """Whether a stored certificate is good enough not to order a new one at start-up."""
    return cert.not_before <= now and cert.left(now) > REUSE_LEFT


def renewal_time(
    cert: Certificate, window: tuple[float, float] | None, random: Callable[[], float]
) -> float:
    """When to renew: a random point of the CA's window if it gave one, else at 2/3 of life."""
    if window is not None:
        start, end = window
        if end >= start:
            return start + random() * (end - start)
    return cert.not_before + RENEW_AT * cert.lifetime


def retry_delay(
    failures: int,
    random: Callable[[], float],
    lifetime: float,
    first: float = RETRY_FIRST,
    most: float = RETRY_MAX,
) -> float:
    """Seconds to wait after the ``failures``-th failure in a row, jittered to [1/2, 1]."""
    cap = min(most, max(first, lifetime / 12)) if lifetime > 0 else most
    delay: float = min(cap, first * 2.0 ** min(failures - 1, 30))
    return delay * (0.5 + random() / 2)


@dataclass
class Schedule:
    """When the current certificate is renewed, retried, and complained about."""

    cert: Certificate
    renew_at: float
    retry_first: float = RETRY_FIRST
    retry_max: float = RETRY_MAX
    failures: int = 0
    retry_at: float | None = None
    alarmed: int = 0
    """Highest log level already used for the certificate's age (0: none yet)."""

    @classmethod
    def for_certificate(
        cls,
        cert: Certificate,
        window: tuple[float, float] | None,
        random: Callable[[], float],
        *,
        retry_first: float = RETRY_FIRST,
        retry_max: float = RETRY_MAX,
    ) -> Schedule:
        return cls(cert, renewal_time(cert, window, random), retry_first, retry_max)

    @property
    def next_try(self) -> float:
        return self.retry_at if self.retry_at is not None else self.renew_at

    def thresholds(self) -> list[tuple[float, int]]:
        """(time, level) of the warning and the error, in order."""
        cert = self.cert
        return [
            (cert.not_after - WARN_LEFT * cert.lifetime, logging.WARNING),
            (cert.not_after - ALARM_LEFT * cert.lifetime, logging.ERROR),
        ]

    def next_wake(self) -> float:
        """The next moment something is due: a try, or a warning not yet given."""
        pending = [at for at, level in self.thresholds() if level > self.alarmed]
        return min([self.next_try, *pending])

    def due(self, now: float) -> bool:
        return now >= self.next_try

    def alarm(self, now: float) -> int | None:
        """The log level to complain at now, once per threshold crossed; None if nothing new."""
        crossed = [level for at, level in self.thresholds() if now >= at]
        if not crossed or max(crossed) <= self.alarmed:
            return None
        self.alarmed = max(crossed)
        return self.alarmed

    def failed(self, now: float, random: Callable[[], float]) -> float:
        """Note a failed try at ``now``; returns the seconds until the next."""
        self.failures += 1
        delay = retry_delay(
            self.failures, random, self.cert.lifetime, self.retry_first, self.retry_max
        )
        self.retry_at = now + delay
        return delay


# -- files -------------------------------------------------------------------------


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def parse_certificate(pem: bytes) -> Certificate:
    leaf = x509.load_pem_x509_certificate(pem)
    return Certificate(
        pem=pem,
        not_before=leaf.not_valid_before_utc.timestamp(),
        not_after=leaf.not_valid_after_utc.timestamp(),
    )


def load_stored(settings: AcmeSettings) -> Certificate | None:
    """The stored certificate if it is whole, matches its key and covers both names."""
    try:
        pem = settings.cert.read_bytes()
        leaf = x509.load_pem_x509_certificate(pem)
        key = serialization.load_pem_private_key(settings.key.read_bytes(), password=None)
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except (OSError, ValueError, TypeError, UnsupportedAlgorithm, x509.ExtensionNotFound):
        return None
    if key.public_key() != leaf.public_key():
        return None
    if not set(settings.names) <= set(san.value.get_values_for_type(x509.DNSName)):
        return None
    return parse_certificate(pem)


def _ari_cert_id(pem: bytes) -> str | None:
    """The certificate's id for ACME Renewal Information (RFC 9773 section 4.1)."""
    leaf = x509.load_pem_x509_certificate(pem)
    try:
        aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    except x509.ExtensionNotFound:
        return None
    if aki.key_identifier is None:
        return None
    serial = leaf.serial_number.to_bytes((leaf.serial_number.bit_length() + 8) // 8, "big")

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    return f"{b64(aki.key_identifier)}.{b64(serial)}"


# -- talking to the CA (blocking: run in a thread) ---------------------------------


def _problem(exc: messages.Error) -> str:
    detail = exc.detail or exc.title or exc.description or "no detail"
    return f"{detail} ({exc.code})" if exc.code else str(detail)


def _network_error(settings: AcmeSettings, exc: OSError) -> AcmeError:
    text = str(exc)
    if "CERTIFICATE_VERIFY_FAILED" in text or "SSLError" in type(exc).__name__:
        return AcmeError(
            f"the ACME server {settings.directory} has a certificate this relay does not "
            "trust: give its CA with --acme-ca-bundle FILE, or check --acme-directory",
            retryable=False,
        )
    reason = text.rsplit(":", 1)[-1].strip(" ')\"") or type(exc).__name__
    return AcmeError(
        f"cannot reach the ACME server {settings.directory} ({reason}): check "
        "--acme-directory and that this host can make outbound HTTPS connections",
        retryable=True,
    )


class AcmeClient:
    """One account at one CA, used from a thread."""

    def __init__(self, settings: AcmeSettings) -> None:
        self.settings = settings
        self._client: client.ClientV2 | None = None
        self._account_key: JWKEC | None = None

    def _load_account_key(self) -> JWKEC:
        path = self.settings.dir / ACCOUNT_KEY_FILE
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except FileNotFoundError:
            key = ec.generate_private_key(ec.SECP256R1())
            write_atomically(path, _key_pem(key))
        except (OSError, ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise InvalidError(
                f"cannot use the ACME account key {path}: {exc}; move it away to make a new one"
            ) from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise InvalidError(f"the ACME account key {path} is not an EC key")
        return JWKEC(key=key)

    def connect(self) -> client.ClientV2:
        """The CA's directory and this relay's account there (made on first use)."""
        if self._client is not None:
            return self._client
        settings = self.settings
        settings.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        key = self._load_account_key()
        verify: bool | str = True
        if settings.ca_bundle is not None:
            verify = str(self._trust_file())
        net = client.ClientNetwork(
            key,
            alg=ES256,
            user_agent=f"burrow/{__version__}",
            timeout=NETWORK_TIMEOUT,
        )
        net.verify_ssl = verify  # type: ignore[assignment]  # requests takes a bundle path too
        try:
            directory = client.ClientV2.get_directory(settings.directory, net)
        except OSError as exc:
            raise _network_error(settings, exc) from exc
        except (errors.Error, messages.Error, ValueError, DeserializationError) as exc:
            raise AcmeError(
                f"{settings.directory} is not an ACME directory ({exc}): check --acme-directory",
                retryable=False,
            ) from exc
        acme = client.ClientV2(directory, net)
        registration = messages.NewRegistration.from_data(
            email=settings.email, terms_of_service_agreed=True
        )
        try:
            acme.new_account(registration)
        except errors.ConflictError as exc:  # this key has an account already: use it
            net.account = messages.RegistrationResource(
                uri=exc.location, body=messages.Registration()
            )
            if settings.email:
                self._update_contact(acme, net.account)
        except messages.Error as exc:
            raise self._account_error(exc) from exc
        except OSError as exc:
            raise _network_error(settings, exc) from exc
        self._client = acme
        self._account_key = key
        return acme

    def _update_contact(self, acme: client.ClientV2, regr: messages.RegistrationResource) -> None:
        try:
            current = acme.query_registration(regr)
            wanted = messages.Registration.from_data(email=self.settings.email)
            if tuple(current.body.contact) != tuple(wanted.contact):
                acme.update_registration(current, current.body.update(contact=wanted.contact))
        except messages.Error as exc:
            raise self._account_error(exc) from exc

    def _account_error(self, exc: messages.Error) -> AcmeError:
        if exc.code in ("invalidContact", "unsupportedContact"):
            return AcmeError(
                f"the ACME server refused the contact {self.settings.email!r}: {_problem(exc)}; "
                "fix --acme-email",
                retryable=False,
            )
        return AcmeError(
            f"the ACME server {self.settings.directory} refused to make an account: "
            f"{_problem(exc)}",
            retryable=exc.code in ("rateLimited", "serverInternal", "badNonce"),
        )

    def _trust_file(self) -> Path:
        """The usual trust store plus ``--acme-ca-bundle``, as one file for requests."""
        import certifi

        assert self.settings.ca_bundle is not None
        try:
            extra = self.settings.ca_bundle.read_bytes()
        except OSError as exc:
            raise InvalidError(
                f"cannot read --acme-ca-bundle {self.settings.ca_bundle}: {exc.strerror}"
            ) from exc
        combined = Path(certifi.where()).read_bytes() + b"\n" + extra
        path = self.settings.dir / "ca-bundle.pem"
        write_atomically(path, combined, _PUBLIC_MODE)
        return path

    def account(self) -> tuple[str, tuple[str, ...]]:
        """This relay's account URI at the CA, and the CA's CAA identities (the
        directory's ``meta.caaIdentities``, maybe none)."""
        acme = self.connect()
        assert acme.net.account is not None
        identities = acme.directory.meta.caa_identities or ()
        return acme.net.account.uri, tuple(identities)

    def renewal_window(self, cert: Certificate) -> tuple[float, float] | None:
        """The CA's suggested renewal window for ``cert`` (RFC 9773), or None."""
        acme = self.connect()
        try:
            base = acme.directory["renewalInfo"]
        except KeyError:
            return None
        cert_id = _ari_cert_id(cert.pem)
        if cert_id is None:
            return None
        try:
            response = acme.net.get(f"{str(base).rstrip('/')}/{cert_id}")
            info = messages.RenewalInfo.from_json(response.json())
        except (OSError, errors.Error, messages.Error, ValueError, DeserializationError) as e:
            log.info("no renewal information from the CA (%s): renewing at 2/3 of life", e)
            return None
        window = info.suggested_window
        return window.start.timestamp(), window.end.timestamp()

    def begin_order(self) -> tuple[messages.OrderResource, list[str], bytes]:
        """A new order for both names: the order, the TXT values to publish, the new key."""
        acme = self.connect()
        assert self._account_key is not None
        key = ec.generate_private_key(ec.SECP256R1())
        key_pem = _key_pem(key)
        csr = crypto_util.make_csr(key_pem, self.settings.names)
        try:
            order = acme.new_order(csr)
        except messages.Error as exc:
            raise AcmeError(
                f"the ACME server refused to certify {' and '.join(self.settings.names)}: "
                f"{_problem(exc)}",
                retryable=exc.code in ("rateLimited", "serverInternal", "badNonce"),
            ) from exc
        except OSError as exc:
            raise _network_error(self.settings, exc) from exc
        values = []
        for authorization in order.authorizations:
            if authorization.body.status == messages.STATUS_VALID:
                continue  # the CA remembers a recent validation
            values.append(self._dns_challenge(authorization).validation(self._account_key))
        return order, values, key_pem

    def _dns_challenge(
        self, authorization: messages.AuthorizationResource
    ) -> messages.ChallengeBody:
        for challenge in authorization.body.challenges:
            if isinstance(challenge.chall, challenges.DNS01):
                return challenge
        raise AcmeError(
            f"the ACME server offers no DNS-01 challenge for "
            f"{authorization.body.identifier.value}: use a CA that does",
            retryable=False,
        )

    def finish_order(self, order: messages.OrderResource, key_pem: bytes) -> Certificate:
        """Answer the challenges (their TXT records published), wait, store the result."""
        acme = self.connect()
        assert self._account_key is not None
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=ORDER_TIMEOUT)
        try:
            for authorization in order.authorizations:
                if authorization.body.status == messages.STATUS_VALID:
                    continue
                challenge = self._dns_challenge(authorization)
                acme.answer_challenge(challenge, challenge.response(self._account_key))
            done = acme.poll_and_finalize(order, deadline)
        except errors.ValidationError as exc:
            raise self._validation_error(exc) from exc
        except errors.TimeoutError as exc:
            raise AcmeError(
                f"the ACME server did not finish the order within {ORDER_TIMEOUT:g}s",
                retryable=True,
            ) from exc
        except errors.IssuanceError as exc:
            raise AcmeError(
                f"the ACME server refused to issue the certificate: {_problem(exc.error)}",
                retryable=False,
            ) from exc
        except messages.Error as exc:
            raise AcmeError(
                f"the ACME server refused the order: {_problem(exc)}",
                retryable=exc.code in ("rateLimited", "serverInternal", "badNonce"),
            ) from exc
        except OSError as exc:
            raise _network_error(self.settings, exc) from exc
        pem = done.fullchain_pem.encode()
        cert = parse_certificate(pem)
        # Key first: if we stop between the two writes, the pair does not match
        # and the next start orders again instead of serving a broken pair.
        write_atomically(self.settings.key, key_pem)
        write_atomically(self.settings.cert, pem, _PUBLIC_MODE)
        return cert

    def _validation_error(self, exc: errors.ValidationError) -> AcmeError:
        details = []
        for authorization in exc.failed_authzrs:
            for challenge in authorization.body.challenges:
                if challenge.error is not None:
                    details.append(_problem(challenge.error))
        detail = details[0] if details else "no detail"
        domain = self.settings.domain
        return AcmeError(
            f"the ACME server could not check the TXT record _acme-challenge.{domain} "
            f"({detail}): delegate the zone {domain} to this relay (NS record and glue at "
            "the parent zone) and make sure its DNS port is reachable",
            retryable=True,
        )


# -- the manager: start-up and the renewal loop ------------------------------------


class CertificateManager:
    """Gets the relay its certificate, then keeps it renewed.

    With ``settings.caa`` and a ``caa`` sink, the CAA record is bound to the
    account before the first order (and at the start of the renewals).
    ``clock`` (epoch seconds) and ``random`` are injected for the tests.
    """

    def __init__(
        self,
        settings: AcmeSettings,
        sink: ChallengeSink,
        *,
        caa: CaaSink | None = None,
        clock: Callable[[], float] = time.time,
        random: Callable[[], float] = _random.random,
    ) -> None:
        self.settings = settings
        self.sink = sink
        self.caa = caa
        self.caa_bound: str | None = None
        """The account URI the CAA record names, once published."""
        self.clock = clock
        self.random = random
        self.client = AcmeClient(settings)
        self.current: Certificate | None = None
        self.orders = 0
        """Orders placed by this manager (the tests count them)."""
        self.schedule: Schedule | None = None

    async def bind_caa(self) -> None:
        """Publish ``CAA 0 issue "<CA>; accounturi=<account>"`` (RFC 8657) if the operator
        asked for CAA, once: only this relay's account may get certificates for the zone.

        The CA's domain is the one its directory names (``meta.caaIdentities``), the
        operator's ``--dns-caa`` if that is among them or there are none.
        """
        if self.caa is None or self.settings.caa is None or self.caa_bound is not None:
            return
        uri, identities = await asyncio.to_thread(self.client.account)
        issuer = self.settings.caa
        if identities and issuer not in identities:
            log.warning(
                "--dns-caa %s is not among the CA's CAA identities (%s): publishing CAA for %s",
                issuer,
                ", ".join(identities),
                identities[0],
            )
            issuer = identities[0]
        try:
            self.caa.set_caa(issuer, uri)
        except ValueError as exc:  # what the CA sent cannot be a CAA value
            log.warning("CAA for %s not bound to the ACME account: %s", self.settings.domain, exc)
            return
        self.caa_bound = uri
        log.info('CAA for %s: 0 issue "%s; accounturi=%s"', self.settings.domain, issuer, uri)

    async def issue(self) -> Certificate:
        """Place one order and wait for its certificate (stored on success)."""
        self.orders += 1
        # Before the order: the CA checks CAA when it validates.
        await self.bind_caa()
        order, values, key_pem = await asyncio.to_thread(self.client.begin_order)
        # Both names' values at once: they share _acme-challenge.<domain>.
        if values:
            self.sink.set_challenge(values)
        try:
            cert = await asyncio.to_thread(self.client.finish_order, order, key_pem)
        finally:
            if values:
                self.sink.clear_challenge()
        log.info(
            "certificate for %s and *.%s issued, valid until %s",
            self.settings.domain,
            self.settings.domain,
            _when(cert.not_after),
        )
        return cert

    async def ensure(self) -> Certificate:
        """A certificate to start with: the stored one while it has over a third of its
        life left, else a new one. Retries what may pass for ``issue_timeout`` seconds;
        raises :class:`AcmeError` with the reason otherwise."""
        stored = load_stored(self.settings)
        if stored is not None and reusable(stored, self.clock()):
            log.info(
                "using the stored certificate for %s (valid until %s)",
                self.settings.domain,
                _when(stored.not_after),
            )
            self.current = stored
            return stored
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.issue_timeout
        failures = 0
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    self.current = await self.issue()
                    return self.current
            except TimeoutError:
                raise AcmeError(
                    f"no certificate from {self.settings.directory} within "
                    f"{self.settings.issue_timeout:g}s: check the CA and the zone's delegation",
                    retryable=False,
                ) from None
            except AcmeError as exc:
                failures += 1
                delay = retry_delay(
                    failures, self.random, 0, self.settings.retry_first, self.settings.retry_max
                )
                if not exc.retryable or loop.time() + delay >= deadline:
                    raise
                log.warning("%s; trying again in %.0fs", exc, delay)
                await asyncio.sleep(delay)

    async def _window(self, cert: Certificate) -> tuple[float, float] | None:
        try:
            return await asyncio.to_thread(self.client.renewal_window, cert)
        except Error as exc:
            log.info("no renewal information from the CA (%s)", exc)
            return None

    async def run(
        self,
        installed: Callable[[Certificate], object],
        outcomes: MutableMapping[str, int] | None = None,
    ) -> None:
        """Renew for ever; ``installed`` is called with each new certificate (on disk).

        A certificate ``installed`` refuses (an :class:`InvalidError`, such as the
        relay's ``CertificateError``) counts as a failed renewal and is tried again.
        ``outcomes`` counts the renewals: its ``ok`` and ``failed`` go up by one each.
        """
        outcomes = outcomes if outcomes is not None else {"ok": 0, "failed": 0}
        assert self.current is not None, "ensure() first"
        settings = self.settings
        try:  # a restart with a stored certificate has not talked to the CA yet
            await self.bind_caa()
        except Error as exc:
            log.info("CAA not bound to the ACME account yet (%s): again at the renewal", exc)
        schedule = self._new_schedule(self.current, await self._window(self.current))
        log.info("certificate for %s renews at %s", settings.domain, _when(schedule.renew_at))
        while True:
            await asyncio.sleep(max(0.0, schedule.next_wake() - self.clock()))
            if schedule.due(self.clock()):
                # The renewal first: at two thirds of the life it is due just as the
                # warning at a third left is, which is only for one not renewed.
                try:
                    cert = await self.issue()
                    installed(cert)
                except (AcmeError, InvalidError) as exc:
                    outcomes["failed"] += 1
                    delay = schedule.failed(self.clock(), self.random)
                    log.warning(
                        "renewing the certificate for %s failed: %s; next try in %.1fs",
                        settings.domain,
                        exc,
                        delay,
                    )
                else:
                    outcomes["ok"] += 1
                    self.current = cert
                    schedule = self._new_schedule(cert, await self._window(cert))
                    log.info(
                        "certificate for %s renews at %s", settings.domain, _when(schedule.renew_at)
                    )
                    continue
            now = self.clock()
            level = schedule.alarm(now)
            if level is not None:
                log.log(
                    level,
                    "the certificate for %s expires at %s (%.0f%% of its life left) and has "
                    "not been renewed%s",
                    settings.domain,
                    _when(schedule.cert.not_after),
                    100 * max(0.0, schedule.cert.left(now)),
                    "" if schedule.failures == 0 else f" ({schedule.failures} failed tries)",
                )

    def _new_schedule(self, cert: Certificate, window: tuple[float, float] | None) -> Schedule:
        self.schedule = Schedule.for_certificate(
            cert,
            window,
            self.random,
            retry_first=self.settings.retry_first,
            retry_max=self.settings.retry_max,
        )
        return self.schedule


def _when(epoch: float) -> str:
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
