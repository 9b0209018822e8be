"""`make run`: the demo legacy app and the gateway in front of it, in one command.

Development only. Starts `python -m ztgateway.demo_app` on 127.0.0.1:8080 and the gateway with
config/gateway.toml, prints the exact curl line to try, and stops both on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ztgateway.devrun")
    p.add_argument("-c", "--config", default="config/gateway.toml")
    p.add_argument("--app-port", type=int, default=8080)
    args = p.parse_args(argv)
    Path("var").mkdir(exist_ok=True)
    token = Path("certs/admin.token")
    if not token.exists():
        import secrets

        token.write_text(secrets.token_urlsafe(32) + "\n")
        token.chmod(0o600)
    py = sys.executable
    app = subprocess.Popen(
        [py, "-m", "ztgateway.demo_app", "--host", "127.0.0.1", "--port", str(args.app_port)]
    )
    idp = subprocess.Popen(
        [py, "-m", "ztgateway", "dev-idp", "--host", "127.0.0.1", "--port", "9200",
         "--users", "config/dev-idp-users.toml"]
    )  # fmt: skip
    check = subprocess.run([py, "-m", "ztgateway", "check-config", "-c", args.config], check=False)
    if check.returncode != 0:
        app.terminate()
        idp.terminate()
        return check.returncode
    gw = subprocess.Popen([py, "-m", "ztgateway", "run", "-c", args.config])
    time.sleep(1.0)
    print(
        "\nztgateway is running. Try:\n\n"
        "  curl --cert certs/clients/alice-laptop.pem --key certs/clients/alice-laptop.key "
        "--cacert certs/ca.pem https://127.0.0.1:8443/echo\n\n"
        "  TOKEN=$(.venv/bin/ztgateway token issue --sub alice --groups admins)\n"
        "  curl --cert certs/clients/alice-laptop.pem --key certs/clients/alice-laptop.key "
        '--cacert certs/ca.pem -H "Authorization: Bearer $TOKEN" https://127.0.0.1:8443/api/echo\n\n'
        "  curl http://127.0.0.1:9100/metrics\n\n"
        "In a browser: import certs/clients/alice-laptop.p12 (password: ztgateway), open\n"
        "https://127.0.0.1:8443/ and sign in as alice / alice-dev-password (development only).\n\n"
        "Ctrl-C stops all three.\n",
        flush=True,
    )
    try:
        while gw.poll() is None and app.poll() is None and idp.poll() is None:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        for proc in (gw, app, idp):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in (gw, app, idp):
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=20)
    return gw.returncode or 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
