"""The relay's dashboard (``GET /`` on its admin listener) in headless Chromium.

A real relay in a thread, real agents (``burrow forward`` and ``burrow.forward``),
a visitor with curl, and an operator at the page: what the page shows is what
``/api/status`` says, and a session ended from the page is over for its agent.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from backends import http_server
from devrelay import BURROW, clean_env, stop
from harness import RelayHarness, run_relay
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

import burrow
from burrow import Tunnel

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
ADMIN_TOKEN = "s3cret"
WAIT = 30  # seconds a browser step may take on a slow machine
OPERATOR_MESSAGE = "the relay's operator ended this session"

# Every count of the page, read in one go: {"tunnels_by_kind.https": "1", ...}.
PAGE_COUNTS = """
return Object.fromEntries(
  [...document.querySelectorAll("[data-count]")].map((e) => [e.dataset.count, e.dataset.value])
);
"""


# -- the relay and its API --------------------------------------------------------------


@pytest.fixture
def admin_relay(tmp_path: Path) -> Iterator[RelayHarness]:
    """A relay with its admin listener on loopback and an admin token."""
    with run_relay(
        tmp_path / "relay", metrics_listen=("127.0.0.1", 0), admin_token=ADMIN_TOKEN
    ) as harness:
        yield harness


def admin_url(relay: RelayHarness) -> str:
    return str(relay.thread.admin.url)


def api(relay: RelayHarness, path: str) -> Any:
    """GET an /api path with the admin token; the decoded JSON."""
    request = urllib.request.Request(
        admin_url(relay) + path, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
    )
    with urllib.request.urlopen(request, timeout=WAIT) as response:
        return json.load(response)


def flat_counts(counts: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``/api/status``'s counts as the page keys them: nested names joined by dots."""
    flat: dict[str, str] = {}
    for key, value in counts.items():
        if isinstance(value, dict):
            flat.update(flat_counts(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = str(value)
    return flat


def session_ids(relay: RelayHarness) -> set[str]:
    return {session["id"] for session in api(relay, "/api/sessions")["sessions"]}


def curl(relay: RelayHarness, url: str) -> str:
    """The status line and headers of one request through the relay."""
    out = subprocess.run(
        ["curl", "-sS", "-i", "--max-time", "20", "--cacert", str(relay.ca), url + "/"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


# -- headless Chromium ------------------------------------------------------------------


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    """Headless Chromium (selenium, the system chromedriver) that keeps its console log."""
    # No skipping: scripts/test installs these, and a missing one must show.
    assert CHROMIUM and CHROMEDRIVER, (
        "needs the Debian packages chromium and chromium-driver (scripts/test installs them)"
    )
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--window-size=1100,900",
    ):
        options.add_argument(flag)
    if os.geteuid() == 0:
        options.add_argument("--no-sandbox")  # Chromium's sandbox refuses to run as root
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    home = tmp_path / "home"
    home.mkdir()
    service = Service(
        executable_path=CHROMEDRIVER,
        env={**os.environ, "HOME": str(home)},
        log_output=str(tmp_path / "chromedriver.log"),
    )
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(WAIT)
    try:
        yield driver
    finally:
        driver.quit()


def console(driver: WebDriver) -> list[dict[str, Any]]:
    """What the page logged since the last call: console messages, script and network errors."""
    return list(driver.get_log("browser"))


def wait(driver: WebDriver, what: str, predicate: Callable[[WebDriver], object]) -> Any:
    try:
        return WebDriverWait(driver, WAIT, poll_frequency=0.1).until(predicate)
    except Exception as exc:
        state = driver.execute_script("return document.body.dataset.state")
        error = driver.find_element(By.ID, "error").text
        raise AssertionError(
            f"waited in vain for {what}; page state {state!r}, error {error!r}, "
            f"console {console(driver)}"
        ) from exc


def state(driver: WebDriver) -> str:
    return str(driver.execute_script("return document.body.dataset.state"))


def refreshes(driver: WebDriver) -> int:
    return int(driver.execute_script("return document.body.dataset.refreshes"))


def refreshed(driver: WebDriver) -> Callable[[WebDriver], bool]:
    """A condition: the page has drawn the API's answers once more since now."""
    before = refreshes(driver)
    return lambda d: state(d) == "ok" and refreshes(d) > before


def counts_match(relay: RelayHarness, driver: WebDriver) -> None:
    """Wait until every count on the page is the one ``/api/status`` gives (fetched here)."""
    seen: dict[str, Any] = {}

    def same(d: WebDriver) -> bool:
        seen["api"] = flat_counts(api(relay, "/api/status")["counts"])
        seen["page"] = d.execute_script(PAGE_COUNTS)
        return bool(seen["page"] == seen["api"])

    try:
        WebDriverWait(driver, WAIT, poll_frequency=0.2).until(same)
    except Exception as exc:
        raise AssertionError(
            f"the page's counts {seen['page']} != /api/status {seen['api']}"
        ) from exc


def table_rows(driver: WebDriver, table: str, attribute: str) -> list[str]:
    """One attribute of each row of a table, read in one go (the page redraws its rows)."""
    return list(
        driver.execute_script(
            "return [...document.querySelectorAll(`#${arguments[0]} tbody tr`)]"
            ".map((row) => row.getAttribute(arguments[1]) || '');",
            table,
            attribute,
        )
    )


def row_headers(driver: WebDriver, table: str) -> list[str]:
    """The text of each row's header cell, read in one go."""
    return list(
        driver.execute_script(
            "return [...document.querySelectorAll(`#${arguments[0]} tbody th`)]"
            ".map((cell) => cell.textContent);",
            table,
        )
    )


def save_screenshot(driver: WebDriver, tmp_path: Path, name: str) -> Path:
    """The whole page as a PNG under ``tmp_path`` (and in $BURROW_TEST_ARTIFACTS if set)."""
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1100, max(900, int(height) + 200))
    path = tmp_path / name
    assert driver.save_screenshot(str(path)), "no screenshot"
    artifacts = os.environ.get("BURROW_TEST_ARTIFACTS")
    if artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        path = Path(shutil.copy(path, Path(artifacts) / name))
    print(f"dashboard screenshot: {path}")
    return path


# -- the tests ------------------------------------------------------------------------------


def test_dashboard_shows_the_relay_and_ends_a_session(
    admin_relay: RelayHarness, browser: WebDriver, tmp_path: Path
) -> None:
    relay, driver = admin_relay, browser
    alice, bob = relay.mint("alice"), relay.mint("bob")
    with (
        http_server(marker="alice-page") as alice_server,
        http_server(marker="bob-page") as bob_server,
        subprocess.Popen(
            [*BURROW, "forward", str(alice_server.port), "--tcp"],
            env=clean_env(**relay.env(alice)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        ) as alice_agent,
        burrow.forward(bob_server.port, client=relay.client(bob)) as bob_tunnel,
    ):
        try:
            assert alice_agent.stdout is not None
            alice_url = alice_agent.stdout.readline().strip()
            if not alice_url.startswith("https://"):
                stop(alice_agent, timeout=10)
                raise AssertionError(f"burrow forward: {alice_agent.communicate()}")
            assert "alice-page" in curl(relay, alice_url)
            assert "bob-page" in curl(relay, bob_tunnel.url)
            # Visitors at names nobody holds: refusals the page lists.
            for prefix in ("zzzz", "yyyy"):
                unknown = bob_tunnel.url.replace(bob_tunnel.url[8:12], prefix, 1)
                assert curl(relay, unknown).startswith("HTTP/1.1 404 ")
            _operator_ends_alices_session(relay, driver, tmp_path, bob_tunnel)

            # Alice's agent was told why, and stopped: `burrow forward` says so and exits.
            _, err = alice_agent.communicate(timeout=WAIT)
            assert alice_agent.returncode != 0
            assert OPERATOR_MESSAGE in err, err
            assert curl(relay, alice_url).startswith("HTTP/1.1 404 ")
            assert "bob-page" in curl(relay, bob_tunnel.url)  # bob's session goes on
        finally:
            stop(alice_agent, timeout=10)


def _operator_ends_alices_session(
    relay: RelayHarness, driver: WebDriver, tmp_path: Path, bob_tunnel: Tunnel
) -> None:
    sessions = {s["subject"]: s["id"] for s in api(relay, "/api/sessions")["sessions"]}
    assert set(sessions) == {"alice", "bob"}, sessions

    # No token yet: the page asks for it (after the relay's one 401, which Chromium
    # logs as a failed request; nothing else may show in the console).
    driver.get(admin_url(relay) + "/")
    wait(driver, "the token prompt", lambda d: state(d) == "auth")
    assert driver.find_element(By.ID, "auth").is_displayed()
    assert "needs its admin token" in driver.find_element(By.ID, "auth-message").text
    for entry in console(driver):
        assert entry["source"] == "network" and "/api/status" in entry["message"], entry
        assert "401" in entry["message"], entry

    # A wrong token: refused, said so, asked again.
    field = driver.find_element(By.ID, "auth-token")
    assert driver.find_element(By.CSS_SELECTOR, "label[for=auth-token]").text == "Admin token"
    field.send_keys("not-the-token\n")
    wait(
        driver,
        "the 401 message",
        lambda d: "401" in d.find_element(By.ID, "auth-message").text and state(d) == "auth",
    )
    assert "refused" in driver.find_element(By.ID, "auth-message").text
    assert driver.find_element(By.ID, "auth-token").is_displayed()
    console(driver)  # that 401 again

    # The right token; it stays for the tab, so a reload loads without a sound.
    driver.find_element(By.ID, "auth-token").send_keys(ADMIN_TOKEN + "\n")
    wait(driver, "the relay's state", lambda d: state(d) == "ok")
    assert not driver.find_element(By.ID, "auth").is_displayed()
    driver.refresh()
    wait(driver, "the reloaded page", lambda d: state(d) == "ok" and refreshes(d) >= 1)
    assert console(driver) == []

    status = api(relay, "/api/status")
    assert driver.find_element(By.ID, "relay-domain").text == status["relay"]["domain"]
    assert driver.find_element(By.ID, "relay-version").text == status["relay"]["version"]
    assert driver.find_element(By.ID, "relay-state").text == "ready"
    counts_match(relay, driver)
    assert driver.find_element(By.ID, "count-sessions").text == "2"

    # The tables: every session and tunnel, names as the API shortened them.
    wait(
        driver,
        "both sessions",
        lambda d: sorted(table_rows(d, "sessions", "data-session-id")) == sorted(sessions.values()),
    )
    names = sorted(t["name"] for t in api(relay, "/api/tunnels")["tunnels"])
    shown = row_headers(driver, "tunnels")
    assert sorted(shown) == names and len(names) == status["counts"]["tunnels"]
    assert all(name.endswith("…") and len(name) == 5 for name in shown), shown
    assert bob_tunnel.url[8:22] not in driver.find_element(By.TAG_NAME, "body").text
    # The refusals of the unknown names, newest first.
    wait(
        driver,
        "the refusals",
        lambda d: table_rows(d, "refusals", "data-reason") == ["unknown-name"] * 2,
    )
    times = [float(t) for t in table_rows(driver, "refusals", "data-time")]
    assert times == sorted(times, reverse=True)
    # History charts, drawn from /api/history's first sample on (a rate needs two).
    for chart in ("sessions", "tunnels", "visitors"):
        assert driver.find_elements(By.CSS_SELECTOR, f"#chart-{chart} svg polyline"), chart
    assert driver.find_elements(By.CSS_SELECTOR, "#chart-bytes svg")
    # The certificate: a dev certificate, valid for long.
    assert "days left" in driver.find_element(By.ID, "certificate-days").text
    days = int(driver.find_element(By.ID, "certificate").get_attribute("data-days-left") or "")
    assert days == int(status["certificate"]["expires_in_seconds"] // 86400)
    save_screenshot(driver, tmp_path, "dashboard.png")
    driver.set_window_size(1100, 900)

    # End alice's session: the button asks first, the operator says yes.
    alice_id = sessions["alice"]
    row = driver.find_element(By.CSS_SELECTOR, f'#sessions tr[data-session-id="{alice_id}"]')
    row.find_element(By.CSS_SELECTOR, "button[data-action=end-session]").click()
    alert = WebDriverWait(driver, WAIT).until(expected_conditions.alert_is_present())
    assert alice_id in alert.text and "alice" in alert.text
    alert.accept()
    wait(
        driver,
        "alice's row to go",
        lambda d: table_rows(d, "sessions", "data-session-id") == [sessions["bob"]],
    )
    assert session_ids(relay) == {sessions["bob"]}
    assert not driver.find_element(By.ID, "error").is_displayed()
    assert f"Ended session {alice_id}" in driver.find_element(By.ID, "action").text
    wait(driver, "the next refresh", refreshed(driver))
    counts_match(relay, driver)
    assert console(driver) == []


def test_dashboard_without_an_admin_token_is_read_only(browser: WebDriver, tmp_path: Path) -> None:
    driver = browser
    with (
        run_relay(tmp_path / "relay", metrics_listen=("127.0.0.1", 0)) as relay,
        http_server() as server,
        burrow.forward(server.port, client=relay.client()),
    ):
        driver.get(admin_url(relay) + "/")
        wait(driver, "the relay's state", lambda d: state(d) == "ok")
        assert console(driver) == []
        assert not driver.find_element(By.ID, "auth").is_displayed()
        assert "read-only" in driver.find_element(By.ID, "relay-access").text
        counts_match(relay, driver)
        wait(
            driver, "the session", lambda d: len(table_rows(d, "sessions", "data-session-id")) == 1
        )
        button = driver.find_element(By.CSS_SELECTOR, "button[data-action=end-session]")
        assert not button.is_enabled()
        assert "--admin-token-file" in (button.get_attribute("title") or "")
        wait(driver, "the next refresh", refreshed(driver))
        assert console(driver) == []


def test_an_api_error_shows_on_the_page(admin_relay: RelayHarness, browser: WebDriver) -> None:
    """Ending a session that has gone meanwhile: the relay's 404 is shown, not thrown."""
    relay, driver = admin_relay, browser
    with http_server() as server, burrow.forward(server.port, client=relay.client()):
        driver.get(admin_url(relay) + "/")
        wait(driver, "the token prompt", lambda d: state(d) == "auth")
        driver.find_element(By.ID, "auth-token").send_keys(ADMIN_TOKEN + "\n")
        wait(
            driver, "the session", lambda d: len(table_rows(d, "sessions", "data-session-id")) == 1
        )
        console(driver)  # the first 401
        (session_id,) = session_ids(relay)
        # Another operator ends it first, while this page still shows its button (the
        # next refresh takes the row off the page; a script's click reaches it there).
        driver.execute_script(
            "window.endButton = document.querySelector('button[data-action=end-session]');"
        )
        request = urllib.request.Request(
            f"{admin_url(relay)}/api/sessions/{session_id}",
            method="DELETE",
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        )
        with urllib.request.urlopen(request, timeout=WAIT) as response:
            assert json.load(response) == {"ended": session_id}
        driver.execute_script("window.confirm = () => true; window.endButton.click();")
        action = driver.find_element(By.ID, "action")
        wait(driver, "the error", lambda d: action.is_displayed())
        assert f"404 no session {session_id}" in action.text, action.text
        wait(driver, "the row to go", lambda d: table_rows(d, "sessions", "data-session-id") == [])
        wait(driver, "the next refresh", refreshed(driver))
        assert f"404 no session {session_id}" in action.text  # until the next action
        # Chromium logs the failed request itself; the page's script adds nothing.
        for entry in console(driver):
            assert entry["source"] == "network" and "404" in entry["message"], entry
