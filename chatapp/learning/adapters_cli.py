"""`python -m chatapp adapters list|show|activate|rollback|deactivate|delete`: the registry from the
command line.

Invariants:
- Every change goes through `Registry` (its lock, validation and atomic writes); this module only
  parses and prints.
- A user mistake exits 2 with one `error:` line on stderr; results go to stdout.
- Importing this module is cheap (no torch, peft or transformers): the CLI builds its parser from it.
"""
from __future__ import annotations

import argparse
import json
import sys

from chatapp.core import config
from chatapp.learning.fingerprint import AdapterError, normalize_version
from chatapp.learning.registry import Registry


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `adapters` subcommand to the CLI's subparsers."""
    parser = subparsers.add_parser(
        "adapters", help="list, inspect and choose the LoRA adapters trained from feedback",
        description="The versioned adapters under DATA_DIR/adapters: v1, v2, ... (numbers are never reused). "
                    "The active one is what the chat serves; none active means the base model.")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="one line per version (* marks the active one)")
    listing.add_argument("--json", action="store_true", help="print the list as JSON")
    show = actions.add_parser("show", help="a version's full metadata as JSON")
    show.add_argument("version", help="v3 or 3")
    activate = actions.add_parser("activate", help="serve this version")
    activate.add_argument("version", help="v3 or 3")
    activate.add_argument("--reason", default="", help="why (kept in the activation history)")
    activate.add_argument("--force", action="store_true", help="activate even a version the gate rejected")
    rollback = actions.add_parser("rollback", help="go back to the version active before the current one")
    rollback.add_argument("--reason", default="")
    deactivate = actions.add_parser("deactivate", help="serve the base model without an adapter")
    deactivate.add_argument("--reason", default="")
    delete = actions.add_parser("delete", help="remove a version (not the active one)")
    delete.add_argument("version", help="v3 or 3")
    for action in (listing, show, activate, rollback, deactivate, delete):
        action.add_argument("--data-dir", help=f"the app's data folder (default: {config.DATA_DIR_HELP})")
    return parser


def _metrics_text(metrics: dict, limit: int = 4) -> str:
    items = []
    for key, value in list(metrics.items())[:limit]:
        items.append(f"{key}={value:.3g}" if isinstance(value, float) else f"{key}={value}")
    return " ".join(items) + (" ..." if len(metrics) > limit else "")


def _name(version: str | None) -> str:
    return version or "base model (no adapter)"


def _print_list(registry: Registry, as_json: bool) -> None:
    rows = registry.list()
    if as_json:
        print(json.dumps({"active": registry.active(), "versions": rows}, indent=2))
        return
    if not rows:
        print(f"no adapters in {registry.root}; the base model is served", file=sys.stderr)
        return
    print(f"  {'version':<8} {'created (UTC)':<19} {'method':<14} {'gate':<9} {'parent':<7} metrics")
    for row in rows:
        mark = "*" if row["active"] else " "
        if "error" in row:
            print(f"{mark} {row['version']:<8} {'(broken: ' + row['error'] + ')'}")
            continue
        created = (row["created_at"] or "")[:19].replace("T", " ")
        print(f"{mark} {row['version']:<8} {created:<19} {str(row['method'])[:14]:<14} "
              f"{str(row['gate']):<9} {str(row['parent'] or '-'):<7} {_metrics_text(row['metrics'])}")
    if registry.active() is None:
        print("(no active adapter: the base model is served)")


def run(args) -> int:
    """The `adapters` command. A user mistake exits 2 with one `error:` line on stderr."""
    try:
        registry = Registry.for_data_dir(args.data_dir)
        if args.action == "list":
            _print_list(registry, args.json)
        elif args.action == "show":
            print(json.dumps(registry.show(args.version), indent=2))
        elif args.action == "activate":
            was = registry.active()
            version = registry.activate(args.version, args.reason, force=args.force)
            print(f"active: {version} (was {_name(was)})")
        elif args.action == "rollback":
            was = registry.active()
            print(f"active: {_name(registry.rollback(args.reason))} (rolled back from {_name(was)})")
        elif args.action == "deactivate":
            was = registry.deactivate(args.reason)
            print(f"active: {_name(None)} (was {_name(was)})")
        elif args.action == "delete":
            version = normalize_version(args.version)
            registry.delete(version)
            print(f"deleted {version}")
    except (AdapterError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
