"""The `paychan` command line."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="paychan", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="a client and a pay-per-call service, end to end")
    demo.add_argument("--calls", type=int, default=300, help="paid calls to make (300)")
    demo.add_argument("--price", type=int, default=3, help="price of one call (3)")
    demo.add_argument("--json", action="store_true", help="print a machine-readable summary")
    demo.add_argument("--data", default=None,
                      help="keep the ledger and nodes here (default: a temporary folder)")
    from paychan import node_cli
    node_cli.add_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "node":
        return node_cli.main(args)
    if args.command == "demo":
        from paychan.demo import main as demo_main
        return demo_main(args.calls, args.price, args.json, args.data)
    return 2


if __name__ == "__main__":
    sys.exit(main())
