"""The ``subcog-crdt`` command line (``python -m subcog_crdt``).

Every command that opens a node opens its own, as an agent process would: ``run`` keeps
one in the foreground, the one-shot commands (``capture``, ``recall``, ``sync``,
``peers``, ``sessions``) open a short-lived one that joins the mesh, settles with its
peers, acts, settles again and closes. Results go to stdout (text, or JSON with
``--json``), progress and logs to stderr.

The mesh secret is never an argument (argv is visible to every user in ``ps``): it comes
from ``$SUBCOG_MESH_SECRET`` or ``--secret-file``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from datetime import datetime
from typing import Any

from subcog_crdt._api import ConversationsApi, PeerInfo
from subcog_crdt._core.events import Captured, Conflict, Deleted, Event, Lagged, Updated
from subcog_crdt._errors import SubcogError
from subcog_crdt._plain import (
    batch_plain,
    event_plain,
    lagged_plain,
    memory_plain,
    peer_plain,
    session_plain,
)
from subcog_crdt._session import Session
from subcog_crdt._sessions import SessionInfo

__all__ = ["SECRET_ENV", "main"]

PROG = "subcog-crdt"
SECRET_ENV = "SUBCOG_MESH_SECRET"
_PEER_POLL = 0.2
"""Seconds between two looks at the peer list in ``run`` (the node has no peer-change
notification; a look is a cheap copy of a dict's values)."""
_MCP_HINT = "pip install 'subcog-crdt[mcp]'"

log = logging.getLogger("subcog_crdt.cli")


class CliError(Exception):
    """A failure reported as one ``subcog-crdt: error: ...`` line, exit status 1."""


# -- output ------------------------------------------------------------------------------


def _out(line: str) -> None:
    # Flushed per line: a reader on a pipe (a test, ``| grep``) sees each line at once.
    print(line, flush=True)


def _out_json(obj: Any) -> None:
    _out(json.dumps(obj, ensure_ascii=False))


def _err(line: str) -> None:
    print(f"{PROG}: {line}", file=sys.stderr, flush=True)


def _one_line(text: str) -> str:
    """Text on one line: a memory's newlines and tabs would break line-per-record output."""
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")


def _event_line(ev: Event) -> str:
    who = f"{ev.source_session}@{ev.node_id}" if ev.source_session else f"@{ev.node_id}"
    head = f"{ev.cursor}\t{ev.kind}\t{ev.namespace}\t{ev.memory_id}\t{who}"
    if isinstance(ev, Captured):
        return f"{head}\t{_one_line(ev.memory.content)}"
    if isinstance(ev, Updated):
        changes = event_plain(ev)["changes"]
        return f"{head}\t{_one_line(json.dumps(changes, ensure_ascii=False))}"
    if isinstance(ev, Conflict):
        return f"{head}\t{ev.winner.session} won over {ev.loser.session}"
    if isinstance(ev, Deleted):
        return head
    return head  # a kind added later: its common fields still say what happened


def _peer_line(p: PeerInfo) -> str:
    return f"{p.node_id}\t{p.url or '-'}\t{p.user_id}\t{','.join(p.namespaces)}"


def _session_line(s: SessionInfo) -> str:
    where = "local" if s.is_local else "remote"
    return f"{s.id}\t{s.user_id}\t{s.node_id}\t{where}\t{','.join(s.subscriptions)}"


# -- the node ----------------------------------------------------------------------------


def _read_secret(args: argparse.Namespace) -> bytes | None:
    """``--secret-file`` (surrounding whitespace stripped: a file ending in a newline
    holds the same secret as one without), else ``$SUBCOG_MESH_SECRET``, else None."""
    if args.secret_file is not None:
        try:
            with open(args.secret_file, "rb") as f:
                secret = f.read().strip()
        except OSError as exc:
            raise CliError(f"cannot read --secret-file: {exc}") from None
        if not secret:
            raise CliError(f"--secret-file {args.secret_file} is empty")
        return secret
    env = os.environ.get(SECRET_ENV)
    if env is None:
        return None
    if not env.strip():
        raise CliError(f"${SECRET_ENV} is set but empty")
    return env.strip().encode()


def _discovery(args: argparse.Namespace) -> tuple[str, ...]:
    if args.no_discovery:
        return ()
    # mDNS runs only with a secret anyway (the library's rule); --no-mdns keeps a node
    # with a secret to this machine's registry.
    return ("local",) if args.no_mdns else ("local", "mdns")


def _node(args: argparse.Namespace, *, transient: bool = True) -> ConversationsApi:
    """The command's node: ``transient`` unless it serves for as long as it runs
    (``run``, ``mcp``)."""
    return ConversationsApi(
        data_dir=args.data_dir,
        user_id=args.user_id,
        mesh_secret=_read_secret(args),
        host=args.host,
        port=args.port,
        peers=args.peer,
        discovery=_discovery(args),
        durability=args.durability,
        discovery_dir=args.discovery_dir,
        transient=transient,
    )


async def _settle(api: ConversationsApi, args: argparse.Namespace) -> list[PeerInfo]:
    if args.verbose or sys.stderr.isatty():
        _err(f"syncing with peers (up to {args.wait:g} s)...")
    confirmed = await api.settle(timeout=args.wait)
    log.info("settled with %d peer(s)", len(confirmed))
    return confirmed


def _default_session() -> str:
    return f"cli-{os.getpid()}"


# -- one-shot commands -------------------------------------------------------------------


async def _capture(args: argparse.Namespace) -> int:
    async with _node(args) as api:
        await _settle(api, args)
        session = await api.register_session(args.session)
        mem = await session.capture(args.namespace, args.content, tags=args.tag)
        # The capture is in this node only until a peer confirms it: an in-memory node
        # about to exit must not report success for a memory nobody keeps. Another
        # one-shot command's node confirms too, but exits as this one does.
        confirmed = [p for p in await _settle(api, args) if not p.transient]
        if api.data_dir is None and not confirmed:
            raise CliError(
                "not stored anywhere: no peer reachable (that keeps it); pass --data-dir "
                "to keep it locally"
            )
        if not confirmed:
            _err(f"stored in {api.data_dir} only: no peer reachable")
        if args.json:
            _out_json(memory_plain(mem))
        else:
            _out(mem.id)
    return 0


async def _recall(args: argparse.Namespace) -> int:
    async with _node(args) as api:
        await _settle(api, args)
        hits = api.recall(
            args.query, namespaces=args.namespace or None, tags=args.tag, limit=args.limit
        )
        if args.json:
            _out_json([memory_plain(m) for m in hits])
        else:
            for m in hits:
                _out(f"{m.id}\t{m.namespace}\t{_one_line(m.content)}")
    return 0


async def _sync(args: argparse.Namespace) -> int:
    async with _node(args) as api:
        await _settle(api, args)
        # Registered after settling: a session new to this node starts at the present,
        # which is then everything the peers had, not whatever part of it came first.
        session: Session = await api.register_session(
            args.session, subscribe=args.subscribe or None
        )
        if not session.subscriptions:
            _err(f"session {args.session!r} subscribes to nothing: pass --subscribe NS")
        batch = await session.sync(since=args.since, include_own=args.include_own, limit=args.limit)
        if args.json:
            _out_json(batch_plain(batch))
        else:
            for ev in batch.events:
                _out(_event_line(ev))
            _err(f"{len(batch.events)} event(s), cursor {batch.cursor}")
        if batch.more:
            _err(f"more events after cursor {batch.cursor}: run again")
        if not batch.complete:
            _err("incomplete: older events were pruned; recall current memories instead")
    return 0


async def _peers(args: argparse.Namespace) -> int:
    async with _node(args) as api:
        await _settle(api, args)
        peers = sorted(api.peers(), key=lambda p: p.node_id)
        if args.json:
            _out_json([peer_plain(p) for p in peers])
        else:
            for p in peers:
                _out(_peer_line(p))
    return 0


async def _sessions(args: argparse.Namespace) -> int:
    async with _node(args) as api:
        await _settle(api, args)
        infos = api.sessions.list()
        if args.json:
            _out_json([session_plain(s) for s in infos])
        else:
            for s in infos:
                _out(_session_line(s))
    return 0


# -- long-running commands ---------------------------------------------------------------


def _stop_on_signals() -> asyncio.Event:
    """An event set by SIGINT or SIGTERM: the command then shuts its node down cleanly
    (instead of KeyboardInterrupt landing wherever the loop happens to be)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


def _show(as_json: bool, obj: dict[str, Any], line: str) -> None:
    """One line of the live view: ``obj`` with ``--json``, else ``line``."""
    if as_json:
        _out_json(obj)
    else:
        _out(line)


async def _watch_mesh(api: ConversationsApi, as_json: bool) -> None:
    """Show peers and other nodes' sessions as they come and go."""
    peers: dict[str, PeerInfo] = {}
    sessions: dict[tuple[str, str], SessionInfo] = {}
    while True:
        now = {p.node_id: p for p in api.peers()}
        for p in (now[k] for k in sorted(now.keys() - peers.keys())):
            joined = {"type": "peer_joined", **peer_plain(p)}
            _show(as_json, joined, f"peer joined\t{_peer_line(p)}")
        for p in (peers[k] for k in sorted(peers.keys() - now.keys())):
            _show(as_json, {"type": "peer_left", **peer_plain(p)}, f"peer left\t{p.node_id}")
        peers = now
        listed = {(s.node_id, s.id): s for s in api.sessions.list() if not s.is_local}
        for s in (listed[k] for k in sorted(listed.keys() - sessions.keys())):
            joined = {"type": "session_joined", **session_plain(s)}
            _show(as_json, joined, f"session joined\t{_session_line(s)}")
        for s in (sessions[k] for k in sorted(sessions.keys() - listed.keys())):
            left = {"type": "session_left", "id": s.id, "node_id": s.node_id}
            _show(as_json, left, f"session left\t{s.id}\t{s.node_id}")
        sessions = listed
        await asyncio.sleep(_PEER_POLL)


async def _watch_events(session: Session, as_json: bool) -> None:
    async for item in session.events():
        if isinstance(item, Lagged):
            if as_json:
                _out_json(lagged_plain(item))
            else:
                _out(f"lagged\t{item.dropped} event(s) dropped; sync --since {item.cursor}")
        elif as_json:
            _out_json(event_plain(item))
        else:
            _out(_event_line(item))


async def _run(args: argparse.Namespace) -> int:
    stop = _stop_on_signals()
    async with _node(args, transient=False) as api:
        # A session only when asked for: each one registered on a durable node is kept
        # there (its cursor), and a node without subscriptions has no events to show.
        session = None
        if args.subscribe or args.session is not None:
            session = await api.register_session(
                args.session or _default_session(), subscribe=args.subscribe or None
            )
        # Printed once the session is in place: from this line on, events are shown.
        if args.json:
            _out_json({"type": "node", "node_id": api.node_id, "url": api.url})
        else:
            _out(f"node\t{api.node_id}\t{api.url}")
        tasks = [asyncio.create_task(_watch_mesh(api, args.json))]
        if session is not None:
            tasks.append(asyncio.create_task(_watch_events(session, args.json)))
        _err("running; Ctrl-C to stop")
        try:
            done, _ = await _first(stop.wait(), *tasks)
            for t in done:
                t.result()  # a watcher that failed: report it (the stop event cannot fail)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    _err("stopped")
    return 0


async def _first(
    stop: Coroutine[Any, Any, Any], *tasks: asyncio.Task[None]
) -> tuple[set[asyncio.Future[Any]], set[asyncio.Future[Any]]]:
    """Wait until the stop signal comes or a watcher ends (it only ends by failing)."""
    waiter: asyncio.Future[Any] = asyncio.ensure_future(stop)
    try:
        done, pending = await asyncio.wait({waiter, *tasks}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
    return done - {waiter}, pending


async def _mcp(args: argparse.Namespace) -> int:
    if importlib.util.find_spec("mcp") is None:
        return _missing_mcp()
    try:
        from subcog_crdt.mcp_server import serve_stdio
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] == "mcp":
            return _missing_mcp()
        raise
    stop = _stop_on_signals()
    async with _node(args, transient=False) as api:
        server = asyncio.create_task(
            serve_stdio(api, session_id=args.session, subscribe=args.subscribe or None)
        )
        done, _ = await _first(stop.wait(), server)
        if done:
            server.result()  # the client closed stdin
            return 0
        # A signal while the client keeps stdin open. The SDK reads stdin in a thread
        # that no cancellation stops (nor would the interpreter's exit: it joins that
        # thread), so: close the node (its writes stored, its registry entry gone), then
        # leave at once.
        server.cancel()
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(0)


def _missing_mcp() -> int:
    _err(f"error: the mcp command needs the MCP SDK: {_MCP_HINT}")
    return 2


def _demo(args: argparse.Namespace) -> int:
    from subcog_crdt import demo

    return asyncio.run(demo.main())


# -- arguments ---------------------------------------------------------------------------


def _parsed(text: str, kind: type[int] | type[float], what: str) -> Any:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None


def _port(text: str) -> int:
    port: int = _parsed(text, int, "a port number")
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0 to 65535 (0: any free one), not {port}")
    return port


def _seconds(text: str) -> float:
    value: float = _parsed(text, float, "a number of seconds")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"seconds must be > 0, not {text}")
    return value


def _positive(text: str) -> int:
    value: int = _parsed(text, int, "an integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, not {value}")
    return value


def _since(text: str) -> str | int | datetime:
    """``last``, a cursor, or an ISO 8601 date-time (without an offset: local time)."""
    if text == "last":
        return text
    with contextlib.suppress(ValueError):
        return int(text)
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not 'last', a cursor or an ISO date-time: {text!r}"
        ) from None
    return at if at.tzinfo is not None else at.astimezone()


def _node_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("node options")
    g.add_argument(
        "--data-dir",
        metavar="PATH",
        help="keep memories, events and session cursors here (default: in memory only; "
        "one process per directory)",
    )
    g.add_argument("--host", help="listen address (default 127.0.0.1; 0.0.0.0 with a secret)")
    g.add_argument("--port", type=_port, default=0, help="listen port (default 0: any free one)")
    g.add_argument(
        "--peer",
        metavar="URL",
        action="append",
        default=[],
        help="a peer to keep connected, ws://HOST:PORT (repeatable)",
    )
    g.add_argument(
        "--no-discovery", action="store_true", help="find no peers (use --peer to name them)"
    )
    g.add_argument(
        "--no-mdns",
        action="store_true",
        help="with a secret, find peers on this machine only (no multicast on the LAN)",
    )
    g.add_argument(
        "--discovery-dir",
        metavar="PATH",
        help="the same-machine registry directory (default under $XDG_RUNTIME_DIR)",
    )
    g.add_argument(
        "--durability",
        choices=("process", "fsync"),
        default="process",
        help="with --data-dir: a write survives a killed process (process) or also power "
        "loss (fsync)",
    )
    g.add_argument("--user-id", help="who runs the sessions (default: the OS user)")
    g.add_argument(
        "--secret-file",
        metavar="PATH",
        help=f"read the mesh secret from this file (else ${SECRET_ENV}; without a secret "
        "the node stays on this machine)",
    )
    # Refused with a message, not left unknown: "--secret" would otherwise be a typo
    # away from a usage line, and the user should learn where the secret goes.
    g.add_argument("--secret", help=argparse.SUPPRESS)
    g.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    return p


def _oneshot_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument(
        "--wait",
        metavar="SECONDS",
        type=_seconds,
        default=3.0,
        help="how long to wait for peers to sync before and after acting (default 3)",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    return p


_EPILOG = f"""\
The mesh secret is read from ${SECRET_ENV} or --secret-file, never from the command
line. Exit status: 0 done, 1 error, 2 bad arguments."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        allow_abbrev=False,
        description="Real-time, serverless memory sync for parallel AI-agent sessions.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    node, oneshot = _node_options(), _oneshot_options()

    run = sub.add_parser(
        "run",
        allow_abbrev=False,
        parents=[node],
        help="run a node in the foreground, showing peers and events",
        description="Run a node until Ctrl-C or SIGTERM, printing its id and URL, then "
        "peers joining and leaving and the events of the subscribed namespaces.",
    )
    run.add_argument("--session", metavar="ID", help="session id (default: cli-<pid>)")
    run.add_argument(
        "--subscribe",
        metavar="NS",
        action="append",
        default=[],
        help="show events of this namespace (repeatable; default: only peers)",
    )
    run.add_argument("--json", action="store_true", help="print JSON lines")
    run.set_defaults(handler=_run)

    sub.add_parser(
        "demo", allow_abbrev=False, help="three in-process nodes capturing at once, converging"
    ).set_defaults(handler=None)

    cap = sub.add_parser(
        "capture",
        allow_abbrev=False,
        parents=[node, oneshot],
        help="capture a memory; prints its id",
        description="Capture a memory and wait until a peer has stored it. Without "
        "--data-dir, fails (exit 1) if no peer confirms: the memory would be lost.",
    )
    cap.add_argument("namespace", metavar="NAMESPACE")
    cap.add_argument("content", metavar="CONTENT")
    cap.add_argument("--tag", action="append", default=[], help="a tag (repeatable)")
    cap.add_argument("--session", metavar="ID", default="cli", help="session id (default: cli)")
    cap.set_defaults(handler=_capture)

    rec = sub.add_parser(
        "recall",
        allow_abbrev=False,
        parents=[node, oneshot],
        help="search memories (id, namespace, content per line)",
    )
    rec.add_argument("query", metavar="QUERY")
    rec.add_argument(
        "--namespace",
        metavar="NS",
        action="append",
        default=[],
        help="search this namespace (repeatable; default: all)",
    )
    rec.add_argument(
        "--tag", action="append", default=[], help="only memories with this tag (repeatable)"
    )
    rec.add_argument("--limit", type=_positive, default=10, help="at most N hits (default 10)")
    rec.set_defaults(handler=_recall)

    syn = sub.add_parser(
        "sync",
        allow_abbrev=False,
        parents=[node, oneshot],
        help="print a session's events since last time, a cursor or a date-time",
        description="Print the events of a session's subscriptions. --since last "
        "continues where this session's previous sync stopped; that position is kept "
        "only with --data-dir (without it every run is a new node and 'last' finds "
        "nothing). A session new to the node starts at the present.",
    )
    syn.add_argument("--session", metavar="ID", required=True, help="session id")
    syn.add_argument(
        "--subscribe",
        metavar="NS",
        action="append",
        default=[],
        help="set the session's subscriptions (repeatable; default: those stored with --data-dir)",
    )
    syn.add_argument(
        "--since",
        type=_since,
        default="last",
        metavar="last|CURSOR|DATETIME",
        help="'last' (default; needs --data-dir to persist across runs), a cursor, or "
        "an ISO 8601 date-time (local time without an offset)",
    )
    syn.add_argument("--include-own", action="store_true", help="include this session's own writes")
    syn.add_argument("--limit", type=_positive, default=1000, help="at most N events")
    syn.set_defaults(handler=_sync)

    sub.add_parser(
        "peers", allow_abbrev=False, parents=[node, oneshot], help="list the peers a node links to"
    ).set_defaults(handler=_peers)
    sub.add_parser(
        "sessions",
        allow_abbrev=False,
        parents=[node, oneshot],
        help="list the sessions of the mesh's nodes",
    ).set_defaults(handler=_sessions)

    mcp = sub.add_parser(
        "mcp",
        allow_abbrev=False,
        parents=[node],
        help="serve MCP over stdio for an agent",
        description=f"Run an MCP server on stdin/stdout (needs {_MCP_HINT}).",
    )
    mcp.add_argument(
        "--session",
        metavar="ID",
        help="register this session at start (default: none; the agent calls "
        "subcog_session_register)",
    )
    mcp.add_argument("--subscribe", metavar="NS", action="append", default=[], help="(repeatable)")
    mcp.set_defaults(handler=_mcp)
    return parser


# -- entry -------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        return _demo(args)
    if args.secret is not None:
        parser.error(
            "the mesh secret is never taken on the command line (other users see it in "
            f"ps): set ${SECRET_ENV} or use --secret-file"
        )
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO if args.verbose else logging.WARNING,
        format=f"{PROG}: %(levelname)s %(name)s: %(message)s",
    )
    handler: Callable[[argparse.Namespace], Coroutine[Any, Any, int]] = args.handler
    try:
        return asyncio.run(handler(args))
    except (SubcogError, CliError) as exc:
        _err(f"error: {exc}")
        return 1
    except KeyboardInterrupt:  # a one-shot command interrupted: its node closed on the way
        return 130
    except BrokenPipeError:
        # The reader went (``| head``): nothing more to say, and nowhere to say it. Point
        # stdout at /dev/null so that the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
