"""Chaos on a LAN of real node processes: nothing acknowledged is lost under kill -9 and
partitions, and every node converges to the same memories.

Three hosts of a :class:`~support.netns.NetnsLan`, one ``tests/support/noderun.py`` node
each, with a mesh secret and mDNS discovery only (inside the namespaces), its own SQLite
data dir and a fixed port (restarts keep the url peers redial). Every node runs the
chaos write loop of noderun (own captures, captures of contents every node captures,
updates of its own register and of shared memories) and prints ``ack`` once a write
returned. A seeded chaos loop kills nodes with SIGKILL and restarts them on their data
dir (also while cut off, so that only their own store holds their latest writes), pulls
hosts' cables (their bridge port goes down) and plugs them back, and cuts the path between
two hosts only (blackhole routes), so that the third must relay what the pair missed. At
the end every acknowledged write must be on every node, and all nodes must hold the same.

Pacing is by acks ("wait until node X acknowledged k more writes"), never by sleeping.
Rerun a failing case with ``SUBCOG_CHAOS_SEED=<seed from the failure message>``.
"""

from __future__ import annotations

import os
import random
import secrets
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from support.netns import Host, NetnsLan
from support.nodeproc import NodeProc, stop_all
from test_lan import LanNode, start_nodes
from test_processes import free_port

SEED_ENV = "SUBCOG_CHAOS_SEED"
FACTS, REGS = "d", "r"  # noderun's CHAOS_FACTS and CHAOS_REGS
# The rounds: each action this many times, in a seeded random order.
ACTIONS = {"kill": 2, "partition": 3, "both": 2, "isolated-kill": 2, "pair-cut": 2}
SHARED = 5  # contents every node captures ("shared fact 0".."shared fact 4")
PACE = (4, 16)  # acks a node makes between two chaos steps (drawn per step)
LOOP_PAUSE = "0.02"  # seconds between loop iterations: keeps the data set small
LOOP_MAX = "50000"  # a bound on each lifetime's loop; never reached in a passing run
# Deadlines are bounds against hangs on a loaded machine, never claims about speed.
STEP_TIMEOUT = 30.0  # a node acks k more writes; a peer drops an unplugged host (~3 s)
CONVERGE_TIMEOUT = 60.0  # all nodes hold the same once everything is healed


def is_ack(m: dict[str, Any]) -> bool:
    return "ack" in m


@dataclass(eq=False)
class Member:
    """One host of the LAN and the node lifetimes it ran."""

    host: Host
    data_dir: Path
    port: int
    node: LanNode | None = None
    gen: int = 0
    lives: list[tuple[int, LanNode]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.host.name

    @property
    def session(self) -> str:
        return f"s-{self.host.name}"  # what test_lan.start_nodes registers

    @property
    def alive(self) -> LanNode:
        assert self.node is not None, f"{self.name} is down"
        return self.node


class Chaos:
    """The LAN, its members, and a log of what was done (for failure messages)."""

    def __init__(self, lan: NetnsLan, procs: list[NodeProc], tmp: Path, seed: int) -> None:
        self.lan = lan
        self.procs = procs
        self.tmp = tmp
        self.seed = seed
        self.rng = random.Random(seed)
        self.secret = f"chaos-secret-{secrets.token_hex(8)}"
        self.members = [
            Member(h, tmp / f"data-{h.name}", free_port())  # any port is free in a netns
            for h in lan.hosts
        ]
        self.unplugged: set[str] = set()
        self.log: list[str] = []
        self._t0 = time.monotonic()

    def note(self, what: str) -> None:
        self.log.append(f"{time.monotonic() - self._t0:5.1f}s {what}")

    # -- nodes ----------------------------------------------------------------------------

    def start(self, members: list[Member]) -> None:
        """Start a new lifetime of each member's node, on its data dir and port; its
        stderr goes to ``life-<lifetime>/<host>.stderr``."""
        for m in members:
            m.gen += 1
            logs = self.tmp / f"life-{m.gen}"
            logs.mkdir(exist_ok=True)
            (node,) = start_nodes(
                self.procs, [m.host], self.secret, logs,
                "--data-dir", str(m.data_dir), "--port", str(m.port),
                "--subscribe", "",  # no event lines: only acks matter here
                "--chaos-loop", "--loop-tag", f"{m.gen:03d}", "--shared", str(SHARED),
                "--loop-pause", LOOP_PAUSE, "--loop-max", LOOP_MAX,
            )  # fmt: skip
            m.node = node
            m.lives.append((m.gen, node))
        self.note(f"started {[f'{m.name}#{m.gen}' for m in members]}")

    def kill(self, m: Member) -> None:
        """SIGKILL the node mid-loop; keep every complete line it printed before dying."""
        node = m.alive
        acks = node.count(is_ack)
        node.kill()
        node.drain()
        m.node = None
        self.note(f"killed {m.name}#{m.gen} after {acks} acks seen live, {node.count(is_ack)} read")

    def acks_more(self, m: Member, k: int) -> None:
        """Wait until ``m``'s node acknowledged ``k`` more writes (the loop's pace)."""
        node = m.alive
        target = node.count(is_ack) + k

        def done() -> bool:
            bad = [x for x in node.lines if "loop_error" in x or "loop_stopped" in x]
            assert not bad, f"{m.name}#{m.gen}: write loop ended: {bad}"
            return node.count(is_ack) >= target

        node.wait_until(done, STEP_TIMEOUT, f"{k} more acks from {m.name}#{m.gen}")

    def hashes(self, m: Member) -> dict[str, Any]:
        """The node's state hash per namespace, and its peers."""
        return m.alive.ask("hashes", STEP_TIMEOUT, cmd="hashes", ns=[FACTS, REGS])

    def dropped(self, gone: Member, by: list[Member]) -> None:
        """Wait until every node of ``by`` has dropped its link to ``gone`` (so the
        links are really lost, and healing needs reconnecting and anti-entropy)."""
        node_id = gone.alive.node_id
        by[0].alive.wait_until(
            lambda: all(node_id not in self.hashes(o)["peers"] for o in by),
            STEP_TIMEOUT,
            f"{gone.name} dropped by {[o.name for o in by]}",
        )
        self.note(f"{gone.name} dropped by {[o.name for o in by]}")

    # -- cables ---------------------------------------------------------------------------

    def _port(self, m: Member, state: str) -> None:
        # The host's veth peer in the bridge namespace is p<index> (see NetnsLan): taking
        # it down is pulling the cable at the switch. The host keeps its address and
        # routes (its lan0 just loses carrier); frames are dropped, TCP gets no answer.
        port = f"p{int(m.name[1:])}"
        subprocess.run(
            ["ip", "-n", self.lan.bridge_netns, "link", "set", port, state],
            check=True,
            timeout=15,
        )

    def _route(self, m: Member, other: Member, op: str) -> None:
        subprocess.run(
            ["ip", "-n", m.host.netns, "route", op, "blackhole", f"{other.host.address}/32"],
            check=True,
            timeout=15,
        )

    def cut_pair(self, a: Member, c: Member) -> None:
        """Cut only the path between ``a`` and ``c`` (each drops what it would send to the
        other), both still reach the third host: a partial partition."""
        self._route(a, c, "add")
        self._route(c, a, "add")
        self.note(f"cut {a.name} <-> {c.name}")

    def join_pair(self, a: Member, c: Member) -> None:
        self._route(a, c, "del")
        self._route(c, a, "del")
        self.note(f"joined {a.name} <-> {c.name}")

    def missing(self, m: Member, ids: list[str]) -> list[str]:
        """Those of ``ids`` that are not live memories on the node."""
        return list(m.alive.ask("missing", STEP_TIMEOUT, cmd="missing", ids=ids)["missing"])

    def relayed(self, src: Member, dst: Member) -> None:
        """Wait until ``dst`` holds every capture ``src`` acknowledged so far."""
        ids = [x["id"] for x in list(src.alive.lines) if x.get("ack") == "capture"]
        left: list[str] = []

        def done() -> bool:
            left[:] = self.missing(dst, ids)
            return not left

        try:
            dst.alive.wait_until(done, STEP_TIMEOUT, f"{src.name}'s captures on {dst.name}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {len(left)} of {len(ids)} missing") from None
        self.note(f"{dst.name} holds all {len(ids)} captures of {src.name}#{src.gen}")

    def unplug(self, m: Member) -> None:
        self._port(m, "down")
        self.unplugged.add(m.name)
        self.note(f"unplugged {m.name}")

    def replug(self, m: Member) -> None:
        self._port(m, "up")
        self.unplugged.discard(m.name)
        self.note(f"replugged {m.name}")

    # -- rounds ---------------------------------------------------------------------------

    def pace(self) -> int:
        return self.rng.randint(*PACE)

    def round(self, no: int, action: str) -> None:
        if action == "kill":
            victim = self.rng.choice(self.members)
            others = [m for m in self.members if m is not victim]
            self.note(f"round {no}: kill {victim.name}")
            self.acks_more(victim, self.pace())  # the kill lands mid-loop, anywhere
            self.kill(victim)
            self.acks_more(self.rng.choice(others), self.pace())  # writes while it is down
            self.start([victim])
        elif action == "partition":
            cut = self.rng.choice(self.members)
            others = [m for m in self.members if m is not cut]
            long = self.rng.random() < 0.5
            self.note(f"round {no}: partition {cut.name} ({'long' if long else 'short'})")
            if long:
                self.wait_meshed([cut])  # links to lose: healing must reconnect
            self.unplug(cut)
            self.acks_more(cut, self.pace())  # writes on both sides of the cut
            self.acks_more(self.rng.choice(others), self.pace())
            if long:  # else the cable is back before the heartbeat notices: TCP resumes
                self.dropped(cut, others)
            self.replug(cut)
        elif action == "isolated-kill":
            # Writes made while cut off exist only in the victim's store when it dies:
            # after the restart, its data dir alone must still hold every one it acked.
            victim = self.rng.choice(self.members)
            others = [m for m in self.members if m is not victim]
            self.note(f"round {no}: kill {victim.name} while it is cut off")
            self.wait_meshed([victim])
            self.unplug(victim)
            self.dropped(victim, others)  # its links are gone: nobody else has its writes
            node, mark = victim.alive, victim.alive.count(is_ack)
            self.acks_more(victim, self.pace())
            self.kill(victim)
            self.note(f"{victim.name} had acked {node.count(is_ack) - mark} cut off")
            self.start([victim])
            self.acks_more(victim, self.pace())
            self.replug(victim)
        elif action == "pair-cut":
            # The third node relays between the two cut off from each other. What was
            # in flight on the lost link, and what the relay held back while the pair
            # still listed each other as linked, must reach them through the relay
            # (resync after a lost link) before the pair is joined again.
            a, c = self.rng.sample(self.members, 2)
            (relay,) = [m for m in self.members if m not in (a, c)]
            self.note(f"round {no}: cut {a.name} <-> {c.name}, {relay.name} relays")
            self.wait_meshed()
            self.cut_pair(a, c)
            self.dropped(a, [c])
            self.dropped(c, [a])
            self.acks_more(a, self.pace())
            self.acks_more(c, self.pace())
            self.relayed(a, c)
            self.relayed(c, a)
            self.join_pair(a, c)
        else:
            assert action == "both", action
            victim, cut = self.rng.sample(self.members, 2)
            (third,) = [m for m in self.members if m not in (victim, cut)]
            long = self.rng.random() < 0.5
            self.note(
                f"round {no}: kill {victim.name} while {cut.name} is cut off"
                f" ({'long' if long else 'short'})"
            )
            self.unplug(cut)
            self.acks_more(victim, self.pace())
            self.kill(victim)
            self.acks_more(cut, self.pace())
            self.acks_more(third, self.pace())
            self.start([victim])  # comes back while cut is still cut off
            if long:
                self.dropped(cut, [third, victim])
            self.replug(cut)

    # -- the end ----------------------------------------------------------------------------

    def heal_and_stop(self) -> None:
        """Plug every cable, start every dead node, let each lifetime ack some writes (the
        last lifetime must update its register), then stop the loops cleanly."""
        for m in self.members:
            if m.name in self.unplugged:
                self.replug(m)
        dead = [m for m in self.members if m.node is None]
        if dead:
            self.start(dead)
        for m in self.members:
            self.acks_more(m, PACE[0])
        for m in self.members:
            m.alive.send(cmd="stop-loop")
        for m in self.members:
            m.alive.expect(lambda x: "loop_stopped" in x, STEP_TIMEOUT, "loop stopped")
        self.note("healed; loops stopped")

    def wait_meshed(self, members: list[Member] | None = None) -> None:
        """Each of ``members`` (default: all) is linked to both others (found by mDNS)."""
        ids = {m.alive.node_id for m in self.members}
        for m in members or self.members:
            want = sorted(ids - {m.alive.node_id})

            def linked(m: Member = m, want: list[str] = want) -> bool:
                return bool(self.hashes(m)["peers"] == want)

            m.alive.wait_until(linked, STEP_TIMEOUT, f"{m.name} linked to both others")
        self.note(f"meshed: {[m.name for m in members or self.members]}")

    def converge(self) -> None:
        """Wait until all nodes report the same (non-empty) state hash per namespace."""
        last: list[dict[str, Any]] = []

        def same() -> bool:
            last[:] = [self.hashes(m) for m in self.members]
            hs = [tuple(h["hashes"][ns] for ns in (FACTS, REGS)) for h in last]
            return len(set(hs)) == 1 and "0" * 64 not in hs[0]

        try:
            self.members[0].alive.wait_until(same, CONVERGE_TIMEOUT, "same state hashes")
        except AssertionError as exc:
            detail = {m.name: h for m, h in zip(self.members, last, strict=True)}
            raise AssertionError(f"{exc}; last replies: {detail}") from None

    def dump(self, m: Member, ns: str) -> dict[str, dict[str, Any]]:
        """Every memory of ``ns`` on the node (deleted ones too), by id."""
        reply = m.alive.ask("dump", STEP_TIMEOUT, cmd="dump", ns=ns)
        return {x["id"]: x for x in reply["memories"]}

    def context(self) -> str:
        """Seed, what was done, and the warnings the nodes logged."""
        notes: list[str] = []
        for log in sorted(self.tmp.glob("life-*/*.stderr")):
            lines = log.read_text(errors="replace").splitlines()
            bad = [x for x in lines if any(w in x for w in ("ERROR", "Traceback", "WARNING"))]
            if bad:
                notes.append(f"  {log.relative_to(self.tmp)}: {len(bad)} lines, last: {bad[-3:]}")
            if any("Traceback" in x for x in lines):  # the exception that ended it
                notes.append(f"  {log.relative_to(self.tmp)} ends: {lines[-1][:500]}")
        return (
            f"chaos seed {self.seed} (rerun: {SEED_ENV}={self.seed}); logs in {self.tmp}\n"
            "actions:\n  " + "\n  ".join(self.log) + "\nnode stderr:\n" + "\n".join(notes)
        )


def all_lines(m: Member) -> Iterator[tuple[int, dict[str, Any]]]:
    for gen, node in m.lives:
        for line in list(node.lines):
            yield gen, line


def check_outcome(chaos: Chaos) -> tuple[int, list[str]]:
    """Every acknowledged write on every node; all nodes equal; dedupe and last-writer
    rules hold. Returns the number of acknowledged captures checked and what is wrong."""
    members = chaos.members
    dumps = {m.name: {ns: chaos.dump(m, ns) for ns in (FACTS, REGS)} for m in members}
    first = members[0].name
    problems: list[str] = []

    # No command failed and no loop broke, in any lifetime.
    for m in members:
        for gen, line in all_lines(m):
            if "error" in line or "loop_error" in line:
                problems.append(f"{m.name}#{gen} printed {line}")

    # Every node lists the same memories, field for field.
    for m in members[1:]:
        for ns in (FACTS, REGS):
            a, b = dumps[first][ns], dumps[m.name][ns]
            if a != b:
                only_a = sorted(set(a) - set(b))[:5]
                only_b = sorted(set(b) - set(a))[:5]
                differ = [i for i in set(a) & set(b) if a[i] != b[i]][:5]
                problems.append(
                    f"{ns}: {first} and {m.name} differ: only on {first} {only_a}, "
                    f"only on {m.name} {only_b}, different {[(a[i], b[i]) for i in differ]}"
                )

    # Every acknowledged capture is a live memory on every node, captured by its session.
    acked = 0
    lost: list[str] = []
    shared_ids: dict[str, set[str]] = {}
    shared_sessions: dict[str, set[str]] = {}
    tried: set[str] = set()
    for m in members:
        for gen, line in all_lines(m):
            if line.get("try") == "capture":
                tried.add(line["content"])
            if line.get("ack") != "capture":
                continue
            acked += 1
            content = line["content"]
            if content.startswith("shared fact "):
                shared_ids.setdefault(content, set()).add(line["id"])
                shared_sessions.setdefault(content, set()).add(m.session)
            for holder in members:
                mem = dumps[holder.name][line["ns"]].get(line["id"])
                if (
                    mem is None
                    or mem["deleted"]
                    or mem["content"] != content
                    or m.session not in mem["captured_by"]
                ):
                    lost.append(f"{m.name}#{gen} capture {content!r} ({line['id']}) on "
                                f"{holder.name}: {mem}")  # fmt: skip
    if lost:
        problems.append(f"{len(lost)} acknowledged captures lost: {lost[:20]}")

    # Same content from several nodes is one memory, captured by each of their sessions.
    if len(shared_ids) != SHARED:
        problems.append(f"shared contents acked: {sorted(shared_ids)}")
    for content, ids in shared_ids.items():
        if len(ids) != 1:
            problems.append(f"{content!r} became {len(ids)} memories: {sorted(ids)}")
            continue
        (mid,) = ids
        mem = dumps[first][FACTS].get(mid)
        if mem is not None and not shared_sessions[content] <= set(mem["captured_by"]):
            problems.append(
                f"{content!r}: captured_by {mem['captured_by']} lacks "
                f"{sorted(shared_sessions[content] - set(mem['captured_by']))}"
            )
    if len({s for ss in shared_sessions.values() for s in ss}) < len(members):
        problems.append(f"not every node captured a shared content: {shared_sessions}")

    # No duplicates and nothing from nowhere: live contents are unique and were written.
    for ns in (FACTS, REGS):
        live = [x["content"] for x in dumps[first][ns].values() if not x["deleted"]]
        dup = [c for c, n in Counter(live).items() if n > 1]
        if dup:
            problems.append(f"{ns}: contents held by several live memories: {dup[:10]}")
        phantom = sorted(set(live) - tried)
        if phantom:
            problems.append(f"{ns}: memories nobody captured: {phantom[:10]}")

    # Each register ends at its session's last acknowledged update (its last lifetime
    # stopped cleanly, so that is its last write), on every node.
    for m in members:
        gen, last_node = m.lives[-1]
        ups = [x for x in last_node.lines if x.get("ack") == "update" and x["ns"] == REGS]
        tries = sum(1 for x in last_node.lines if "try" in x)
        acks = last_node.count(is_ack)
        if not ups or tries != acks:
            problems.append(f"{m.name}#{gen}: {len(ups)} register acks, {tries} tries/{acks}")
            continue
        reg = dumps[first][REGS].get(ups[-1]["id"])
        if reg is None or reg["status"] != ups[-1]["status"]:
            problems.append(f"{m.name}: register is {reg}, last acked {ups[-1]['status']}")

    # Every acknowledged write of a memory is folded into it, and nothing more than was
    # tried: its version (its number of writes) lies between the two counts.
    by_content = {x["content"]: i for ns in (FACTS, REGS) for i, x in dumps[first][ns].items()}
    acked_n: Counter[str] = Counter()
    tried_n: Counter[str] = Counter()
    for m in members:
        for _, line in all_lines(m):
            if "ack" in line:
                acked_n[line["id"]] += 1
            elif "try" in line:
                tried_n[line.get("id") or by_content.get(line["content"], "?")] += 1
    for ns in (FACTS, REGS):
        for mid, mem in dumps[first][ns].items():
            if not acked_n[mid] <= mem["version"] <= tried_n[mid]:
                problems.append(
                    f"{ns} {mem['content']!r}: version {mem['version']}, but "
                    f"{acked_n[mid]} writes acked and {tried_n[mid]} tried"
                )

    # A shared memory's status is one that some node tried to write.
    statuses = {x["status"] for m in members for _, x in all_lines(m) if x.get("try") == "update"}
    for mid in {i for ids in shared_ids.values() for i in ids}:
        mem = dumps[first][FACTS].get(mid)
        if mem is not None and mem["status"] is not None and mem["status"] not in statuses:
            problems.append(f"shared {mid}: status {mem['status']!r} nobody wrote")

    return acked, problems


@pytest.fixture
def procs(netns_lan: NetnsLan) -> Iterator[list[NodeProc]]:
    """Node processes, stopped before the LAN (and whatever still runs in it) goes."""
    started: list[NodeProc] = []
    yield started
    stop_all(started)


def test_chaos_nothing_acknowledged_is_lost_and_all_converge(
    netns_lan: NetnsLan, procs: list[NodeProc], tmp_path: Path
) -> None:
    """The library's core promise under crashes and partitions, end to end: SQLite
    durability before the ack, anti-entropy and relaying after lost links, mDNS
    discovery and redialling after restarts, dedupe of concurrent same-content captures,
    last-writer-wins registers."""
    seed = int(os.environ.get(SEED_ENV) or secrets.randbits(32))
    chaos = Chaos(netns_lan, procs, tmp_path, seed)
    started = time.monotonic()
    try:
        chaos.start(chaos.members)
        chaos.wait_meshed()  # the chaos starts from a formed mesh
        actions = [a for a, n in ACTIONS.items() for _ in range(n)]
        chaos.rng.shuffle(actions)
        for no, action in enumerate(actions):
            chaos.round(no, action)
        chaos.heal_and_stop()
        problems: list[str] = []
        # Discovery and redialling recovered every link; all hold the same. If not, still
        # say exactly which writes are missing where.
        for step in (chaos.wait_meshed, chaos.converge):
            try:
                step()
            except AssertionError as exc:
                problems.append(str(exc))
        acked, more = check_outcome(chaos)
        problems += more
        assert not problems, "\n".join(problems)
    except Exception as exc:  # any failure: say how to replay it and what the nodes logged
        what = str(exc) if isinstance(exc, AssertionError) else f"{type(exc).__name__}: {exc}"
        raise AssertionError(f"{what}\n{chaos.context()}") from exc
    # Secondary: the run did real work (it is not a claim about speed).
    lifetimes = sum(len(m.lives) for m in chaos.members)
    took = time.monotonic() - started
    print(f"chaos seed {seed}: {acked} acked captures, {lifetimes} lifetimes, {took:.1f}s")
    print("  " + "\n  ".join(chaos.log))
    kills = ACTIONS["kill"] + ACTIONS["both"] + ACTIONS["isolated-kill"]
    assert lifetimes == len(chaos.members) + kills, chaos.context()
