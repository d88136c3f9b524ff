"""examples/flask_app: a page and a signed webhook, fetched with curl through the HTTPS URL."""

from __future__ import annotations

import hashlib
import hmac
import json
import sys
from pathlib import Path

from backends import free_port
from devrelay import DevRelay
from examplerun import EXAMPLES, StartExample, fetch_when_up

SECRET = "s3cret-for-the-test"


def _post(dev: DevRelay, url: str, body: str, signature: str) -> tuple[str, str]:
    """POST ``body`` as a webhook delivery; (response body, status code)."""
    result = dev.curl(
        url,
        "-H",
        "Content-Type: application/json",
        "-H",
        f"X-Signature: {signature}",
        "--data-binary",
        body,
        "-w",
        "\n%{http_code}",
    )
    assert result.returncode == 0, result.stderr
    text, _, status = result.stdout.rpartition("\n")
    return text, status


def test_flask_app_serves_a_page_and_a_signed_webhook(
    dev: DevRelay, start_example: StartExample, tmp_path: Path
) -> None:
    port = free_port()
    app = start_example(
        [sys.executable, "app.py"],
        env=dev.env(PORT=str(port), WEBHOOK_SECRET=SECRET),
        cwd=EXAMPLES / "flask_app",
    )
    url = app.wait_for_line(r"Serving at (https://\S+)").group(1)
    assert url.startswith("https://") and ".r1.localhost:" in url

    page = fetch_when_up(dev, url + "/", app)
    assert page == "Hello from Flask, through burrow!\n"

    body = json.dumps({"type": "push", "ref": "refs/heads/main"})
    signature = "sha256=" + hmac.new(SECRET.encode(), body.encode(), hashlib.sha256).hexdigest()
    text, status = _post(dev, url + "/webhook", body, signature)
    assert status == "200", text
    assert json.loads(text) == {"received": "push"}
    app.wait_for_line(r"^webhook: .*'type': 'push'")

    # A delivery signed with another secret, or a tampered body, is refused.
    forged = "sha256=" + hmac.new(b"guess", body.encode(), hashlib.sha256).hexdigest()
    assert _post(dev, url + "/webhook", body, forged)[1] == "401"
    assert _post(dev, url + "/webhook", body.replace("main", "evil"), signature)[1] == "401"
