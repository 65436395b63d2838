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
    add_ledger_parser(sub)
    add_hub_parser(sub)
    args = parser.parse_args(argv)
    try:
        return _dispatch(args)
    except KeyboardInterrupt:
        # Ctrl-C in a command that runs to its end (`node pay`, `demo`): what it opened was
        # closed on the way out (its stores are durable at every commit); say so in one line.
        verb = getattr(args, "verb", None)
        print(f"paychan {args.command}{' ' + verb if verb else ''}: interrupted", file=sys.stderr)
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    from paychan import node_cli
    if args.command == "hub":
        return hub_serve(args)
    if args.command == "ledger":
        return ledger_main(args)
    if args.command == "node":
        return node_cli.main(args)
    if args.command == "demo":
        from paychan.demo import main as demo_main
        return demo_main(args.calls, args.price, args.json, args.data)
    return 2


def add_ledger_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`paychan ledger serve`: the embedded ledger in its own process, over HTTP."""
    ledger = sub.add_parser("ledger", help="run the settlement ledger as a server")
    verbs = ledger.add_subparsers(dest="verb", required=True)
    serve = verbs.add_parser("serve", help="serve a durable ledger over HTTP until SIGTERM")
    serve.add_argument("--data", required=True, help="the ledger's data folder (LMDB)")
    serve.add_argument("--port", type=int, required=True, help="TCP port to listen on")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    serve.add_argument("--virtual-clock", action="store_true",
                       help="a clock that only POST /advance moves (tests and simulations)")
    serve.add_argument("--network-id", default="paychan-dev",
                       help="the network id channels must name (paychan-dev)")


def ledger_main(args: argparse.Namespace) -> int:
    import logging

    from paychan.actors import ledger_server
    from paychan.protocol.errors import PaychanError
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # pykka logs every exception an actor returns to its caller, with a traceback, at INFO;
    # a refused transaction is answered to its sender and is not news for the server's log.
    logging.getLogger("pykka").setLevel(logging.WARNING)
    try:
        return ledger_server.run(args.data, args.host, args.port, args.virtual_clock,
                                 args.network_id)
    except PaychanError as exc:
        print(f"paychan ledger serve: {exc}", file=sys.stderr)
        return 1


def add_hub_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`paychan hub serve`: the encrypted-chat hub, a store-and-forward WebSocket relay."""
    hub = sub.add_parser("hub", help="the encrypted-chat hub that relays envelopes")
    verbs = hub.add_subparsers(dest="verb", required=True)
    serve = verbs.add_parser("serve", help="relay sealed envelopes between nodes (GET /ws)")
    serve.add_argument("--data", required=True, help="the hub's data folder (queued envelopes)")
    serve.add_argument("--port", type=int, required=True, help="TCP port (0: any free one)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    serve.add_argument("--url", action="append", default=[],
                       help="another URL nodes dial this hub by, e.g. http://hub.example:9000 "
                            "(repeatable); logins must be signed for one of the hub's URLs")
    serve.add_argument("--max-queue", type=int, default=1024,
                       help="envelopes kept per offline recipient (1024)")


def hub_serve(args: argparse.Namespace) -> int:
    """Serve until SIGTERM or SIGINT; queued envelopes stay in --data for the next start."""
    import asyncio
    import logging

    from paychan.actors.hub import serve
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(args.data, args.host, args.port, args.url, args.max_queue))
    return 0


if __name__ == "__main__":
    sys.exit(main())
