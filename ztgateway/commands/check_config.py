"""`ztgateway check-config`: validate a configuration before a deploy.

It loads the file exactly as `run` would (every error names the file and the key) and builds the
TLS material, so a certificate that does not match its key or a CA file that is not one fails
here rather than at the next restart; then it lists the routes and warns about audit key
placement (docs/audit.md).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from ..config import load_config
from ..configreader import ConfigError
from .common import add_config


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
        from ..edge.tlsmaterial import build_material

        build_material(config.tls, config.server.client_cert)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:
        print(f"error: {args.config}: tls: {exc}", file=sys.stderr)
        return 2
    print(
        f"{config.file}: ok (revision {config.revision}, {len(config.routes)} routes, "
        f"{len(config.issuers)} issuers)"
    )
    from ..audit.keys import placement_warnings

    a = config.audit
    for warning in placement_warnings(
        a.db,
        a.jsonl,
        a.mask_key_file,
        a.checkpoint_key_file,
        mask_env=bool(os.environ.get(a.mask_key_env)),
    ):
        print(f"  warning: {warning}")
    for r in config.routes:
        hosts = ",".join(sorted(r.hosts)) or "*"
        print(f"  route {r.name}: {hosts}{r.prefix} -> {r.upstream.url} [{r.mode}]")
    return 0


def register(sub: Any) -> None:
    check = add_config(sub.add_parser("check-config", help="validate a configuration"))
    check.set_defaults(func=cmd_check_config)
