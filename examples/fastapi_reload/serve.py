"""Run app.py under uvicorn --reload behind one burrow URL that outlives every reload.

    python serve.py          # PORT (default 8000) is read from the environment

This process holds the tunnel and runs uvicorn's reloader; the reloader starts
a fresh worker process for each change to a .py file here. Only the worker
restarts, so the tunnel, and with it the URL, stays the same.
"""

import os
from pathlib import Path

import uvicorn

import burrow

HERE = str(Path(__file__).resolve().parent)

if __name__ == "__main__":
    port = int(os.environ.get("PORT", "8000"))
    with burrow.forward(port) as tunnel:
        print(f"Serving at {tunnel.url}", flush=True)
        # Every visitor arrives from 127.0.0.1 (the agent), an address uvicorn trusts for
        # X-Forwarded-* by default; the relay adds no such headers, so any come from visitors.
        uvicorn.run(
            "app:app",
            port=port,
            reload=True,
            app_dir=HERE,
            reload_dirs=[HERE],
            proxy_headers=False,
        )
