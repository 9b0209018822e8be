"""`ztgateway reload`: ask a running gateway to reload its configuration.

The request goes to the admin API's `/admin/reload` on the ops listener of the configuration
given, with the admin token; settings that only a restart applies are named on stderr, so an
operator is not left believing a change took effect.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..config import load_config
from .common import add_config


def cmd_reload(args: argparse.Namespace) -> int:
    """Ask the running gateway to reload (the admin API's /admin/reload on its ops listener)."""
    import urllib.error
    import urllib.request

    from ..admin import load_admin_token

    config = load_config(args.config)
    token = load_admin_token(config.ops)
    if token is None:
        print("error: no admin token ([ops] admin_token_file or ZTGW_ADMIN_TOKEN)", file=sys.stderr)
        return 2
    url = f"http://{config.ops.host}:{config.ops.port}/admin/reload"
    request = urllib.request.Request(
        url, method="POST", headers={"Authorization": f"Bearer {token}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as r:  # noqa: S310 - the configured ops URL
            text = r.read().decode()
            print(text)
            pending = _restart_required(json.loads(text))
            if pending:
                print(
                    "warning: reloaded, but these settings take effect only after a restart: "
                    + ", ".join(pending),
                    file=sys.stderr,
                )
            return 0
    except urllib.error.HTTPError as exc:
        print(f"error: reload refused ({exc.code}): {exc.read().decode()}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: cannot reach the gateway at {url}: {exc}", file=sys.stderr)
        return 1


def _restart_required(answer: object) -> list[str]:
    """`restart_required` of a gateway's reload answer, or of every worker's (supervisor)."""
    if not isinstance(answer, dict):
        return []
    found = set(answer.get("restart_required") or ())
    for worker in (answer.get("workers") or {}).values():
        if isinstance(worker, dict):
            found.update(worker.get("restart_required") or ())
    return sorted(found)


def register(sub: Any) -> None:
    rl = add_config(sub.add_parser("reload", help="reload a running gateway's configuration"))
    rl.set_defaults(func=cmd_reload)
