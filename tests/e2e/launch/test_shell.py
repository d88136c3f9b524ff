"""``burrow launch shell`` through a dev relay: headless Chromium, curl, a WebSocket client.

Chromium trusts the dev CA the way a user's browser would: the CA goes into an
NSS database under a throwaway $HOME (``certutil``), which Chromium on Linux
reads, so the relay's certificate is checked for real, name included.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from http.cookies import SimpleCookie
from pathlib import Path

import pytest
from devrelay import DevRelay
from launchers import Launched, LaunchFactory
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from burrow.wire import names

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
CERTUTIL = shutil.which("certutil")
COOKIE = "__Host-burrow-shell"
WAIT = 30  # seconds a browser step may take on a slow machine


# -- a visitor with curl ------------------------------------------------------------


def _status(relay: DevRelay, url: str, *args: str) -> tuple[int, dict[str, list[str]], str]:
    """(status, headers by lower-case name, body) of one request through the tunnel."""
    result = relay.curl(url, "-i", *args)
    assert result.returncode == 0, result.stderr
    head, _, body = result.stdout.replace("\r\n", "\n").partition("\n\n")
    lines = head.splitlines()
    status = int(lines[0].split()[1])
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    return status, headers, body


def _session_cookie(relay: DevRelay, shell: Launched) -> str:
    """Trade the token for the session cookie, as the page does; its value."""
    status, headers, _ = _status(relay, shell.url)
    assert status == 303
    cookie: SimpleCookie = SimpleCookie()
    for value in headers["set-cookie"]:
        cookie.load(value)
    return cookie[COOKIE].value


# -- a visitor with a WebSocket client ---------------------------------------------


async def _connect(
    shell: Launched, relay: DevRelay, cookie: str | None, origin: str | None = None
) -> ClientConnection:
    headers = {"Cookie": f"{COOKIE}={cookie}"} if cookie is not None else {}
    return await connect(
        f"wss://{shell.host}:{shell.port}/ws",
        ssl=ssl.create_default_context(cafile=relay.ca),
        host=names.resolve_host(shell.host),
        port=shell.port,
        origin=origin or shell.base,  # type: ignore[arg-type]  # typed as a NewType
        additional_headers=headers,
        open_timeout=WAIT,
        max_size=None,
    )


async def _read_until(ws: ClientConnection, pattern: str) -> str:
    """Terminal output until ``pattern`` (a regex) shows up in it."""
    seen = ""
    async with asyncio.timeout(WAIT):
        while not re.search(pattern, seen):
            kind, *data = json.loads(await ws.recv())
            if kind == "stdout":
                seen += data[0]
    return seen


async def _closed(ws: ClientConnection) -> tuple[int | None, str]:
    """Read until the server closes; its close code and reason."""
    with pytest.raises(ConnectionClosed):
        async with asyncio.timeout(WAIT):
            while True:
                await ws.recv()
    assert ws.close_code is not None
    return ws.close_code, ws.close_reason or ""


# -- headless Chromium ---------------------------------------------------------------


@pytest.fixture
def browser(relay: DevRelay, tmp_path: Path) -> Iterator[WebDriver]:
    """Headless Chromium (selenium, the system chromedriver) that trusts the dev CA."""
    # No skipping: scripts/test installs these, and a missing one must show.
    assert CHROMIUM and CHROMEDRIVER and CERTUTIL, (
        "needs the Debian packages chromium, chromium-driver and libnss3-tools "
        "(scripts/test installs them)"
    )

    home = tmp_path / "home"
    nssdb = home / ".pki" / "nssdb"
    nssdb.mkdir(parents=True)
    subprocess.run(
        [CERTUTIL, "-N", "-d", f"sql:{nssdb}", "--empty-password"], check=True, timeout=30
    )
    subprocess.run(
        [CERTUTIL, "-A", "-d", f"sql:{nssdb}", "-n", "burrow dev CA", "-t", "C,,", "-i", relay.ca],
        check=True,
        timeout=30,
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
        "--window-size=1000,700",
    ):
        options.add_argument(flag)
    if os.geteuid() == 0:
        options.add_argument("--no-sandbox")  # Chromium's sandbox refuses to run as root
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


def _screen(driver: WebDriver) -> list[str]:
    """The terminal's rendered rows, as the DOM renderer draws them."""
    while True:
        rows = driver.find_elements(By.CSS_SELECTOR, ".xterm-rows > div")
        try:
            return [(row.get_attribute("textContent") or "").rstrip() for row in rows]
        except StaleElementReferenceException:
            continue  # xterm.js redrew its rows while we read them: read them again


def _wait(driver: WebDriver, what: str, predicate: Callable[[WebDriver], bool]) -> None:
    try:
        WebDriverWait(driver, WAIT, poll_frequency=0.1).until(predicate)
    except Exception as exc:
        raise AssertionError(f"waited in vain for {what}; screen: {_screen(driver)}") from exc


def _type(driver: WebDriver, text: str) -> None:
    driver.find_element(By.CSS_SELECTOR, ".xterm-helper-textarea").send_keys(text)


def _state(driver: WebDriver) -> str:
    return str(driver.execute_script("return document.body.dataset.state"))


def test_browser_types_a_command_and_reads_the_answer(
    launch: LaunchFactory, relay: DevRelay, browser: WebDriver
) -> None:
    driver = browser
    with launch("shell", "--command", "/bin/sh") as shell:
        driver.get(shell.url)
        # The token went into a cookie and out of the address bar.
        assert driver.current_url.rstrip("/") == shell.base
        cookies = {c["name"]: c for c in driver.get_cookies()}
        assert cookies[COOKIE]["httpOnly"] and cookies[COOKIE]["secure"]
        assert cookies[COOKIE]["sameSite"] == "Lax"
        _wait(driver, "the WebSocket", lambda d: _state(d) == "connected")
        # Typed before the shell's first prompt, the command's echo and its
        # answer would share a row with that prompt.
        _wait(driver, "the shell's prompt", lambda d: any(_screen(d)))

        _type(driver, "echo $((6*7))\n")
        _wait(driver, "42 on the screen", lambda d: "42" in _screen(d))

        # Resizing the window resizes the pty: `stty size` follows the page.
        rows_before = len(_screen(driver))
        _type(driver, "clear; stty size\n")
        _wait(driver, "the first size", lambda d: f"{rows_before} " in "\n".join(_screen(d)))
        driver.set_window_size(700, 450)
        _wait(driver, "fewer rows", lambda d: len(_screen(d)) < rows_before)
        rows_after = len(_screen(driver))
        _type(driver, "clear; stty size\n")
        _wait(
            driver,
            "the new size",
            lambda d: any(line.startswith(f"{rows_after} ") for line in _screen(d)),
        )

        # The shell ends: the page says so and stops taking input.
        _type(driver, "exit 3\n")
        _wait(driver, "the end of the shell", lambda d: _state(d) == "ended")
        status = driver.find_element(By.ID, "status").text
        assert "the shell ended (exit 3)" in status

        assert shell.stop() == 0, shell.log()


def test_without_the_token_everything_is_refused(launch: LaunchFactory, relay: DevRelay) -> None:
    with launch("shell") as shell:
        assert _status(relay, shell.base + "/")[0] == 401
        assert _status(relay, shell.base + "/static/xterm/xterm.js")[0] == 401
        assert _status(relay, shell.base + "/static/shell.html")[0] == 401
        assert _status(relay, shell.base + "/ws")[0] == 401
        assert _status(relay, shell.base + "/no/such/page")[0] == 401
        assert _status(relay, shell.base + "/?token=wrong")[0] == 403
        assert _status(relay, shell.base + "/", "-H", f"Cookie: {COOKIE}=wrong")[0] == 401
        assert _status(relay, shell.url.replace("token=", "token=x"))[0] == 403

        # The right token: a cookie with every guard on, and a redirect to the bare URL.
        status, headers, _ = _status(relay, shell.url)
        assert status == 303 and headers["location"] == ["/"]
        (set_cookie,) = headers["set-cookie"]
        attributes = {part.strip().split("=")[0].lower() for part in set_cookie.split(";")}
        assert {"httponly", "secure", "samesite", "path"} <= attributes
        assert "samesite=lax" in set_cookie.lower() and "path=/" in set_cookie.lower()
        assert "token" not in headers["location"][0]

        cookie = _session_cookie(relay, shell)
        with_cookie = ("-H", f"Cookie: {COOKIE}={cookie}")
        status, headers, body = _status(relay, shell.base + "/", *with_cookie)
        assert status == 200 and "xterm.js" in body
        assert "frame-ancestors 'none'" in headers["content-security-policy"][0]
        assert _status(relay, shell.base + "/static/xterm/xterm.js", *with_cookie)[0] == 200
        assert _status(relay, shell.base + "/no/such/page", *with_cookie)[0] == 404

        async def websockets() -> None:
            for cookie_value, origin, expected in (
                (None, None, 401),
                ("wrong", None, 401),
                (cookie, "https://evil.example", 403),  # another site, the visitor's cookie
            ):
                with pytest.raises(InvalidStatus) as refused:
                    await _connect(shell, relay, cookie_value, origin)
                assert refused.value.response.status_code == expected
            ws = await _connect(shell, relay, cookie)  # the page's own origin and cookie
            await ws.send(json.dumps(["stdin", "echo $((6*7))\r"]))
            assert "42" in await _read_until(ws, r"\b42\b")
            await ws.close()

        asyncio.run(websockets())
        assert shell.stop() == 0, shell.log()


@pytest.mark.parametrize(
    ("message", "code", "reason"),
    [
        ("not json", 1007, "JSON"),
        (json.dumps({"stdin": "ls"}), 1007, "expected"),
        (json.dumps(["stdin", 42]), 1007, "expected"),
        ('["stdin", "\\ud800"]', 1007, "expected"),  # a lone surrogate: not UTF-8
        (json.dumps(["set_size", 0, 80]), 1007, "expected"),
        (json.dumps(["set_size", True, 80]), 1007, "expected"),
        (json.dumps(["set_size", 24, 10**9]), 1007, "expected"),
        (json.dumps(["rm", "-rf"]), 1007, "expected"),
        (b"\x00\xff binary", 1003, "binary"),
        (json.dumps(["stdin", "x" * (2 << 20)]), 1009, ""),  # past the 1 MiB limit
    ],
    ids=[
        "garbage",
        "object",
        "stdin-not-text",
        "stdin-surrogate",
        "zero-rows",
        "bool",
        "huge-size",
        "unknown",
        "binary",
        "huge-message",
    ],
)
def test_bad_messages_close_the_websocket_with_a_reason(
    launch: LaunchFactory, relay: DevRelay, message: str | bytes, code: int, reason: str
) -> None:
    with launch("shell", "--command", "/bin/sh") as shell:
        cookie = _session_cookie(relay, shell)

        async def check() -> None:
            ws = await _connect(shell, relay, cookie)
            await ws.send(message)
            closed_code, closed_reason = await _closed(ws)
            if code == 1009:
                # Tornado sends 1009 and drops the connection at once, unread bytes and
                # all: a sender still mid-message may see the reset (1006) instead.
                assert closed_code in (1009, 1006)
            else:
                assert closed_code == code
                assert reason in closed_reason
            # The server is fine: the next tab gets a working shell.
            ws = await _connect(shell, relay, cookie)
            await ws.send(json.dumps(["stdin", "echo $((6*7))\r"]))
            await _read_until(ws, r"\b42\b")
            await ws.close()

        asyncio.run(check())
        assert shell.stop() == 0, shell.log()


def test_shell_end_tab_limit_and_stop(launch: LaunchFactory, relay: DevRelay) -> None:
    with launch("shell", "--command", "/bin/sh", "--max-shells", "1") as shell:
        cookie = _session_cookie(relay, shell)

        async def check() -> None:
            first = await _connect(shell, relay, cookie)
            await first.send(json.dumps(["set_size", 30, 100]))
            await first.send(json.dumps(["stdin", "stty size\r"]))
            await _read_until(first, r"30 100")

            # One shell at most: a second tab is told to come back later.
            second = await _connect(shell, relay, cookie)
            assert await _closed(second) == (
                1013,
                "Cannot create more than 1 terminals: close another tab first",
            )

            # The shell ends: a normal close that says so and gives the status.
            await first.send(json.dumps(["stdin", "exit 5\r"]))
            assert await _closed(first) == (1000, "the shell ended (exit 5)")

            # Closing a tab hangs its shell up and frees its place at once: a
            # reload with --max-shells 1 is not refused while the old shell ends,
            # and a shell deaf to the hang-up is ended all the same.
            tab = await _connect(shell, relay, cookie)
            await tab.send(json.dumps(["stdin", "trap '' HUP; echo pid=$$\r"]))
            pid = int(re.findall(r"pid=(\d+)", await _read_until(tab, r"pid=\d+\s"))[-1])
            await tab.close()
            reloaded = await _connect(shell, relay, cookie)
            await reloaded.send(json.dumps(["stdin", "echo $((6*7))\r"]))
            await _read_until(reloaded, r"\b42\b")
            await reloaded.close()
            assert await asyncio.to_thread(_ends, pid), f"shell {pid} outlived its tab"

            # A tab open when burrow stops is told why.
            third = await _connect(shell, relay, cookie)
            await third.send(json.dumps(["stdin", "echo ready\r"]))
            await _read_until(third, r"ready\s")
            stopped = asyncio.create_task(_closed(third))
            await asyncio.to_thread(shell.process.send_signal, signal.SIGINT)
            code, reason = await stopped
            assert code == 1001 and "stopping" in reason

        asyncio.run(check())
        assert shell.stop() == 0, shell.log()


def _ends(pid: int) -> bool:
    """Whether process ``pid`` ends (or is a zombie) within ``WAIT`` seconds."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except FileNotFoundError:
            return True
        if stat.rpartition(")")[2].split()[0] == "Z":
            return True
        time.sleep(0.05)
    return False


def test_missing_command_is_a_clear_error(relay: DevRelay, tmp_path: Path) -> None:
    from devrelay import BURROW

    result = subprocess.run(
        [*BURROW, "launch", "shell", "--command", "no-such-program-here --flag"],
        env=relay.env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "no-such-program-here" in result.stderr and "not found" in result.stderr
