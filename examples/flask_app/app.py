"""A Flask app with a webhook receiver, published at a public HTTPS URL by burrow.

    python app.py            # prints the URL

PORT (default 8000) and WEBHOOK_SECRET come from the environment.
"""

import hashlib
import hmac
import os

from flask import Flask, abort, request

import burrow

app = Flask(__name__)
# The sender signs each delivery with this secret (as GitHub and Stripe do): the URL
# is public, so the signature is what keeps strangers from posting fake events.
SECRET = os.environ.get("WEBHOOK_SECRET", "change-me").encode()


@app.get("/")
def hello() -> str:
    return "Hello from Flask, through burrow!\n"


@app.post("/webhook")
def webhook() -> dict[str, str]:
    expected = "sha256=" + hmac.new(SECRET, request.get_data(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(request.headers.get("X-Signature", ""), expected):
        abort(401)
    event = request.get_json(force=True)
    print("webhook:", event, flush=True)
    return {"received": str(event.get("type", ""))}


if __name__ == "__main__":
    port = int(os.environ.get("PORT", "8000"))
    with burrow.forward(port) as tunnel:
        print(f"Serving at {tunnel.url}", flush=True)
        app.run(port=port)
