"""Differential check of docs/schema.md: tests/node/fold_spec.mjs, a JavaScript Yjs reader
written from the document alone, derives every memory exactly as the Python node does
(DESIGN.md item 9: a JavaScript Yjs client can read and capture memories)."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import random
import select
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import converged, link, wait_for
from subcog_crdt import ConversationsApi, Memory, NotFound, Session

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "node" / "fold_spec.mjs"
NS = "decisions"
EXAMPLES = int(os.environ.get("SUBCOG_EXAMPLES", "12"))  # raise for a deeper hunt


class SpecReader:
    """One long-lived ``fold_spec.mjs --lines`` process: a document in, its memories out."""

    def __init__(self, node: str) -> None:
        self.proc = subprocess.Popen(
            [node, str(SCRIPT), "--lines"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )

    def read(self, update: bytes, timeout: float = 30.0) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(base64.b64encode(update) + b"\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, "fold_spec.mjs did not answer"
        line = self.proc.stdout.readline()
        assert line, self.proc.stderr.read().decode() if self.proc.stderr else "node exited"
        out: dict[str, Any] = json.loads(line)
        return out

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


@pytest.fixture(scope="module")
def spec(node_js: str) -> Iterator[SpecReader]:
    reader = SpecReader(node_js)
    yield reader
    reader.close()


def _ms(t: datetime) -> int:
    return (t - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1)


def _instant(text: str | None) -> datetime | str | None:
    """An ``expires_at`` string as a datetime (the string itself if Python cannot)."""
    if text is None:
        return None
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return text


def differences(js: dict[str, Any], mems: list[Memory]) -> list[str]:
    """Every field where the JavaScript fold and the Python node disagree."""
    out = []
    py = {m.id: m for m in mems}
    for mid in sorted(set(js) ^ set(py)):
        out.append(f"{mid}: only in {'JS' if mid in js else 'Python'}")
    for mid in sorted(set(js) & set(py)):
        j, m = js[mid], py[mid]
        expires = j["expires_at"]
        pairs: dict[str, tuple[Any, Any]] = {
            "content": (j["content"], m.content),
            "tags": (tuple(j["tags"]), m.tags),
            "metadata": (j["metadata"], dict(m.metadata)),
            "domain": (j["domain"], m.domain),
            "status": (j["status"], m.status),
            "source": (j["source"], m.source),
            "expires_at": (_instant(expires), m.expires_at),
            "source_session": (j["source_session"], m.source_session),
            "captured_by": (tuple(j["captured_by"]), m.captured_by),
            "created_at": (j["created_at_ms"], _ms(m.created_at)),
            "updated_at": (j["updated_at_ms"], _ms(m.updated_at)),
            "updated_by": (j["updated_by"], m.updated_by),
            "version": (j["version"], m.version),
            "deleted": (j["deleted"], m.deleted),
            "clock": (j["stamp"], m.clock),
        }
        for name, (a, b) in pairs.items():
            if a != b:
                out.append(f"{mid}.{name}: JS {a!r} != Python {b!r}")
    return out


def assert_reads_alike(spec: SpecReader, api: ConversationsApi) -> None:
    doc = api._docs.get(NS)
    update = doc.doc.get_update() if doc is not None else b"\x00\x00"
    diff = differences(spec.read(update), api.memories(NS, include_deleted=True))
    assert not diff, "\n".join(diff)


# ---- random histories -----------------------------------------------------------------

CONTENTS = ["Use SQLite WAL", "use  sqlite wal", "USE SQLITE WAL ", "Prefer msgpack", "X y"]
TAGS = ["storage", "wal", " wal ", "perf", "db", "Storage"]
SESSIONS = ["alpha", "beta", "gamma:1", "Delta@host"]
OFFSETS = ["+00:00", "+02:00", "-05:30", "Z"]

capture_op = st.tuples(
    st.just("capture"),
    st.integers(0, 2),  # node
    st.integers(0, 3),  # session
    st.integers(0, len(CONTENTS) - 1),
    st.one_of(
        st.lists(st.sampled_from(TAGS), max_size=4),
        # many distinct tags, so a few captures of one fact reach the 256 bound
        st.integers(0, 9).map(lambda k: [f"t{64 * k + i}" for i in range(64)]),
        st.integers(0, 9).map(lambda k: [f"t{64 * k + i}" for i in range(64)]),
    ),
    st.dictionaries(
        st.sampled_from(["metadata", "domain", "status", "source", "expires_at"]),
        st.integers(0, 5),
        max_size=3,
    ),
)
update_op = st.tuples(
    st.just("update"),
    st.integers(0, 2),
    st.integers(0, 3),
    st.integers(0, 50),  # which memory
    st.dictionaries(
        st.sampled_from(
            ["content", "tags", "metadata", "domain", "status", "source", "expires_at"]
        ),
        st.integers(0, 5),
        min_size=1,
        max_size=4,
    ),
)
delete_op = st.tuples(st.just("delete"), st.integers(0, 2), st.integers(0, 3), st.integers(0, 50))
deliver_op = st.tuples(st.just("deliver"), st.integers(0, 2), st.integers(0, 2), st.integers(1, 4))
sync_op = st.tuples(st.just("sync"), st.integers(0, 2), st.integers(0, 2))
step = st.one_of(capture_op, capture_op, update_op, update_op, delete_op, deliver_op, sync_op)


def field_value(name: str, k: int) -> Any:
    """A value of field ``name`` (k picks one; some are null or clear the field)."""
    if name == "content":
        return CONTENTS[k % len(CONTENTS)] if k < 3 else f"updated text {k}"
    if name == "tags":
        return [TAGS[(k + i) % len(TAGS)] for i in range(k)]
    if name == "metadata":
        return {} if k == 0 else {"k": k, "nested": {"list": [k, None, "é"]}}
    if name == "expires_at":
        if k == 0:
            return None
        when = datetime(2030, 1, k, 12, 0, 0, 250000 * (k % 4), tzinfo=UTC)
        return when.isoformat().replace("+00:00", OFFSETS[k % len(OFFSETS)])
    return None if k == 0 else f"{name}-{k}"


class World:
    """2-3 in-memory nodes; each write's Yjs update is queued for every other node and
    delivered when the history says (in order from each writer, interleaved at random).
    In-order per writer: a node holding a later write of a writer without the earlier
    one does not converge over a link (test_unblocked_update_reaches_the_peer_that_sent
    _the_missing_one), which this test is not about."""

    def __init__(self, apis: list[ConversationsApi], sessions: list[list[Session]]) -> None:
        self.apis = apis
        self.sessions = sessions
        self.queues: dict[tuple[int, int], list[bytes]] = {
            (i, j): [] for i in range(len(apis)) for j in range(len(apis)) if i != j
        }

    def doc(self, i: int) -> Any:
        return self.apis[i]._docs.get(NS)

    async def write(self, i: int, op: tuple[Any, ...]) -> None:
        api = self.apis[i]
        doc = self.doc(i)
        before = doc.state_vector() if doc is not None else None
        sess = self.sessions[i][op[2] % len(SESSIONS)]
        try:
            if op[0] == "capture":
                _, _, _, c, tags, extra = op
                fields = {name: field_value(name, k) for name, k in extra.items()}
                await sess.capture(NS, CONTENTS[c], tags=tags, **fields)
            else:
                ids = [m.id for m in api.memories(NS, include_deleted=True)]
                if not ids:
                    return
                mid = ids[op[3] % len(ids)]
                if op[0] == "update":
                    fields = {name: field_value(name, k) for name, k in op[4].items()}
                    await sess.update(mid, **fields)
                else:
                    await sess.delete(mid)
        except NotFound:
            return  # an update or delete of a memory deleted here
        doc = self.doc(i)
        u = doc.diff(before) if before is not None else doc.diff()
        for j in range(len(self.apis)):
            if j != i:
                self.queues[(i, j)].append(u)

    def deliver(self, i: int, j: int, count: int) -> None:
        """The next ``count`` writes of node i that node j has not been sent."""
        q = self.queues.get((i, j), [])
        api = self.apis[j]
        doc = api._ensure_doc(NS)
        for u in q[:count]:
            api._propagate(doc, doc.apply_update(u))
        del q[:count]


async def sync_pair(a: ConversationsApi, b: ConversationsApi) -> None:
    """Link two nodes until they hold the same state, then cut the link."""
    la, lb = link(a, b)
    await wait_for(lambda: a.state_hash(NS) == b.state_hash(NS), what="pair sync")
    await la.close()
    await lb.close()


async def run_history(steps: list[tuple[Any, ...]], n: int, seed: int) -> list[ConversationsApi]:
    rng = random.Random(seed)
    apis = [ConversationsApi(listen=False, discovery=()) for _ in range(n)]
    for api in apis:
        await api.__aenter__()
    sessions = [
        [await api.register_session(name, subscribe=[NS]) for name in SESSIONS] for api in apis
    ]
    world = World(apis, sessions)
    for op in steps:
        if op[0] in ("capture", "update", "delete"):
            await world.write(op[1] % n, op)
        elif op[0] == "deliver":
            world.deliver(op[1] % n, op[2] % n, op[3])
        elif op[0] == "sync" and op[1] % n != op[2] % n:
            await sync_pair(apis[op[1] % n], apis[op[2] % n])
    # whatever is still queued, interleaved at random
    rest = [pair for pair, q in world.queues.items() for _ in q]
    rng.shuffle(rest)
    for i, j in rest:
        world.deliver(i, j, 1)
    return apis


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    n=st.integers(2, 3),
    steps=st.lists(step, min_size=4, max_size=40),
    seed=st.integers(0, 2**16),
)
def test_js_fold_from_schema_md_matches_python(
    spec: SpecReader, n: int, steps: list[tuple[Any, ...]], seed: int
) -> None:
    """Random histories (same facts from several sessions, tags, updates of every field,
    deletes, revives, concurrent writes delivered in random order): every node's document,
    read by the JavaScript fold written from docs/schema.md, gives the node's memories."""

    async def scenario() -> None:
        apis = await run_history(steps, n, seed)
        try:
            for api in apis:
                assert_reads_alike(spec, api)
            for a, b in itertools.pairwise(apis):
                link(a, b)
            if any(api.memories(NS, include_deleted=True) for api in apis):
                await wait_for(lambda: converged(apis, NS), what="convergence")
            for api in apis:
                assert_reads_alike(spec, api)
        finally:
            for api in apis:
                await api.__aexit__(None, None, None)

    asyncio.run(scenario())


# ---- the write direction: a JavaScript client capturing and updating --------------------


def js_write(
    node: str, tmp_path: Path, api: ConversationsApi, spec_: dict[str, Any]
) -> dict[str, Any]:
    """Run the writes ``spec_`` lists in fold_spec.mjs on the node's document (as a JS
    client holding that state would), apply the JS update to the node, return what JS
    wrote and the memories JS derives afterwards."""
    doc = api._ensure_doc(NS)
    state, out = tmp_path / "state.bin", tmp_path / "js-update.bin"
    state.write_bytes(doc.diff())
    done = subprocess.run(
        [node, str(SCRIPT), "write", str(state), str(out), json.dumps({"namespace": NS, **spec_})],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    api._propagate(doc, doc.apply_update(out.read_bytes()))
    result: dict[str, Any] = json.loads(done.stdout)
    return result


async def test_js_captures_pick_the_memory_python_picks(
    node_js: str, spec: SpecReader, tmp_path: Path
) -> None:
    """A JS client following "Memory ids" captures into the memory a Python capture of
    the same content would: the hash chain past a memory updated to other content, a
    memory an update moved this content to, a deleted one it revives, a new one."""
    async with (
        ConversationsApi(listen=False, discovery=()) as api,
        ConversationsApi(listen=False, discovery=()) as twin,
    ):
        s = await api.register_session("py-session", subscribe=[NS])
        moved_away = await s.capture(NS, "Use WAL", tags=["a"])
        await s.update(moved_away.id, content="Something else entirely")
        moved_here = await s.capture(NS, "Prefer msgpack")
        await s.update(moved_here.id, content="use   WAL", tags=["b"])
        gone = await s.capture(NS, "Gone fact", status="old")
        await s.delete(gone.id)
        chained = await s.capture(NS, "Chained fact")
        await s.update(chained.id, content="chained elsewhere")
        chained2 = await s.capture(NS, "CHAINED fact")  # next id on the chain
        assert chained2.id != chained.id
        # the twin holds the same state and answers with Python's own captures
        tdoc = twin._ensure_doc(NS)
        twin._propagate(tdoc, tdoc.apply_update(api._docs[NS].diff()))
        t = await twin.register_session("py-twin", subscribe=[])
        contents = ["use wal", "gone FACT", "chained  fact", "A brand new fact"]
        wrote = js_write(
            node_js,
            tmp_path,
            api,
            {
                "writes": [
                    {"op": "capture", "set": {"content": c, "tags": ["js"]}} for c in contents
                ]
            },
        )
        python_ids = [(await t.capture(NS, c)).id for c in contents]
        assert [w["id"] for w in wrote["writes"]] == python_ids
        assert python_ids[:3] == [moved_here.id, gone.id, chained2.id]
        revived = api.get(gone.id)
        assert not revived.deleted and revived.status == "old"
        assert revived.captured_by == ("py-session", "js-session")
        assert api.get(moved_here.id).captured_by == ("py-session", "js-session")
        assert_reads_alike(spec, api)
        assert not differences(wrote["memories"], api.memories(NS, include_deleted=True))


async def test_js_update_after_python_write_wins(
    node_js: str, spec: SpecReader, tmp_path: Path
) -> None:
    """A JS client that has seen a Python write and updates the memory as docs/schema.md
    shows (a new key, stamp from its clock, ``base`` = the newest stamp it saw) must
    win over that write: here its clock runs 1 s behind the node's (any two machines on
    a LAN; or the same machine within one millisecond, where the session id breaks the
    tie), and its update is silently ordered before the write it answers."""
    async with ConversationsApi(listen=False, discovery=()) as api:
        s = await api.register_session("py-session", subscribe=[NS])
        m = await s.capture(NS, "Use SQLite WAL", status="proposed")
        m = await s.update(m.id, status="reviewed")
        wrote = js_write(
            node_js,
            tmp_path,
            api,
            {
                "clock_offset_ms": -1000,
                "writes": [{"op": "update", "id": m.id, "set": {"status": "accepted"}}],
            },
        )
        assert_reads_alike(spec, api)  # JS and Python agree on the outcome...
        after = api.get(m.id)
        assert after.version == 3
        # ... which loses the JS write, though it saw everything it overrides
        assert (after.status, after.updated_by) == ("accepted", "js-session"), (
            f"JS update {wrote['writes'][0]['key']} (base {m.clock}) lost to the write it saw"
        )


# ---- entries a conforming writer never makes: every reader must ignore or read them alike --

MID = "0123456789abcdef0123"
S1, S2, S3 = "1790000000000000000", "1790000000001000000", "1790000000002000000"
CAPTURE = json.dumps({"v": 1, "op": "capture", "set": {"content": "fact", "tags": ["a"]}})


def entry_key(stamp: str = S1, session: str = "alpha", node: str = "aa", mid: str = MID) -> str:
    return f"{mid}/{stamp}/{session}/{node}"


def captured(value: str) -> list[tuple[str, str]]:
    """A capture of MID, then ``value`` as a later write of it."""
    return [(entry_key(), CAPTURE), (entry_key(S2), value)]


def updated(**fields: Any) -> list[tuple[str, str]]:
    return captured(json.dumps({"v": 1, "op": "update", "set": fields}))


def capture_of(**fields: Any) -> list[tuple[str, str]]:
    return [(entry_key(), json.dumps({"v": 1, "op": "capture", "set": fields}))]


# Each case: entries whose reading docs/schema.md fixes, or leaves open and the node
# settles (marked "doc:": the document should say it; fold_spec.mjs follows the node).
ALIKE: dict[str, list[tuple[str, str]]] = {
    "key of another shape": [(entry_key(mid=MID.upper()), CAPTURE), (entry_key() + "/x", CAPTURE)],
    "node id of 33 digits": [(entry_key(node="a" * 33), CAPTURE)],
    "session id of 128 and 129": [
        (entry_key(session="a" * 128), CAPTURE),
        (entry_key(S2, session="b" * 129), CAPTURE),
    ],
    "session id with a newline": [(entry_key(session="a\n"), CAPTURE)],
    "value not JSON / not an object": [(entry_key(), "{"), (entry_key(S2), "[1]")],
    "unknown op": captured('{"v":1,"op":"merge","set":{"status":"x"}}'),
    "NaN and Infinity": captured('{"v":1,"op":"update","set":{"metadata":{"a":NaN,"b":Infinity}}}'),
    "doc: 1e400 overflows": captured('{"v":1,"op":"update","set":{"metadata":{"a":1e400}}}'),
    "capture without content": capture_of(tags=["a"]),
    "content null / empty / NUL": [
        *capture_of(content=None),
        (entry_key(S2), json.dumps({"v": 1, "op": "capture", "set": {"content": "a\0b"}})),
    ],
    "doc: content of U+001C only": capture_of(content="\x1c"),
    "doc: content of U+0085 only": capture_of(content="\x85"),
    "doc: content of U+FEFF only": capture_of(content="\ufeff"),
    "content of 262,144 astral characters": capture_of(content="\U0001f600" * 262144),
    "doc: value over 1,114,112 UTF-16 units, within in code points": capture_of(
        content="\x01" * 160000 + "\U0001f600" * 102144
    ),
    "65 tags": updated(tags=[f"x{i}" for i in range(65)]),
    "tag of 129 / 128 astral": updated(tags=["x" * 129]) + updated(tags=["\U0001f600" * 128]),
    "doc: tag of whitespace only": capture_of(content="fact", tags=[" ", "b"]),
    "doc: tags trimmed as Python strips": capture_of(
        content="fact", tags=["\x1cx", "\ufeffy", "\xa0z\u3000", " z"]
    ),
    "status of 1,025 / 1,024 astral": [
        *updated(status="x" * 1025),
        (entry_key(S3), json.dumps({"v": 1, "op": "update", "set": {"status": "😀" * 1024}})),
    ],
    "domain a number": updated(domain=5),
    "doc: unknown field in set": updated(foo=1, status="x"),
    "doc: metadata null clears": updated(metadata=None),
    "metadata an array": updated(metadata=[1]),
    "doc: metadata measured with Python separators": updated(metadata={"k": "a" * 65528}),
    "metadata of 60,000 non-ASCII": updated(metadata={"k": "é" * 60000}),
    "lone surrogate in metadata key": captured(
        '{"v":1,"op":"update","set":{"metadata":{"\\ud800":1}}}'
    ),
    "bad base": [
        *captured('{"v":1,"op":"update","set":{"status":"s"},"base":"zz"}'),
        (entry_key(S3), '{"v":1,"op":"update","set":{"status":"t"},"base":5}'),
    ],
    "update without set, delete with set": [
        *captured('{"v":1,"op":"update"}'),
        (entry_key(S3), '{"v":1,"op":"delete","set":{"status":"gone"}}'),
    ],
    "delete with set null": captured('{"v":1,"op":"delete","set":null}'),
    "expires_at without offset / date only / a number": updated(expires_at="2030-01-01T00:00")
    + updated(expires_at="2030-01-01")
    + updated(expires_at=5),
    "expires_at not a date": updated(expires_at="2030-02-30T00:00:00Z")
    + updated(expires_at="2030-01-01T24:00:00Z")
    + updated(expires_at="0000-01-01T00:00:00Z"),
    "expires_at with a space, +hhmm, 7 digits": [
        *updated(expires_at="2030-01-01 00:00:00+00:00"),
        (
            entry_key(S3),
            json.dumps({"v": 1, "op": "update", "set": {"expires_at": "2030-01-01T00:00+0100"}}),
        ),
        *updated(expires_at="2030-01-01T00:00:00.1234567Z"),
    ],
    "doc: update and delete before the capture count in version": [
        (entry_key(S2), CAPTURE),
        (entry_key(S1, "beta"), json.dumps({"v": 1, "op": "update", "set": {"status": "x"}})),
        (entry_key("1789999999999000000", "beta"), '{"v":1,"op":"delete"}'),
    ],
    "update of a deleted memory leaves it deleted": [
        *captured('{"v":1,"op":"delete"}'),
        (entry_key(S3), json.dumps({"v": 1, "op": "update", "set": {"status": "after"}})),
    ],
    "capture of a live memory with other content sets nothing": captured(
        json.dumps({"v": 1, "op": "capture", "set": {"content": "other", "status": "x"}})
    ),
    "ties: session id, then node id": [
        (entry_key(), CAPTURE),
        (entry_key(S2, "b", "aa"), json.dumps({"v": 1, "op": "update", "set": {"status": "b"}})),
        (entry_key(S2, "a", "bb"), json.dumps({"v": 1, "op": "update", "set": {"status": "bb"}})),
        (entry_key(S2, "a", "b"), json.dumps({"v": 1, "op": "update", "set": {"status": "b2"}})),
    ],
}


def entries_update(entries: list[tuple[str, str]]) -> bytes:
    """A Yjs update holding ``entries`` as written by a raw Yjs client."""
    from pycrdt import Doc, Map

    doc: Doc[Any] = Doc()
    emap = doc.get("entries", type=Map)
    with doc.transaction():
        for key, value in entries:
            emap[key] = value
    update: bytes = doc.get_update()
    return update


async def read_by_node(update: bytes) -> list[Memory]:
    async with ConversationsApi(listen=False, discovery=()) as api:
        doc = api._ensure_doc(NS)
        api._propagate(doc, doc.apply_update(update))
        return api.memories(NS, include_deleted=True)


@pytest.mark.parametrize("case", sorted(ALIKE))
async def test_unusual_entries_read_alike(spec: SpecReader, case: str) -> None:
    """Entries no conforming writer makes (hostile, buggy, or a JS client's) are ignored
    or read by the JavaScript reader exactly as by the node ("so a buggy or hostile
    writer cannot make nodes disagree")."""
    update = entries_update(ALIKE[case])
    diff = differences(spec.read(update), await read_by_node(update))
    assert not diff, "\n".join(diff)


# Entries docs/schema.md refuses that the node accepts (bugs in the code): a JS reader
# following the document ignores them, every Python node reads them.
REFUSED: dict[str, list[tuple[str, str]]] = {
    # "`v` | schema version (1)": the node reads any v, or none (a future v2 entry would be
    # folded as v1 by this node)
    "v = 2": [(entry_key(), CAPTURE.replace('"v": 1', '"v": 2'))],
    "v = true": [(entry_key(), CAPTURE.replace('"v": 1', '"v": true'))],
    "v missing": [(entry_key(), CAPTURE.replace('"v": 1, ', ""))],
    # "every string | valid Unicode ... none is accepted anywhere"
    "lone surrogate in a top-level field": [
        (entry_key(), '{"v":1,"op":"capture","set":{"content":"fact"},"note":"\\ud800"}')
    ],
    # "`expires_at` (ISO 8601 with offset ...)": ISO 8601 offsets are hh:mm, minutes < 60
    "expires_at offset +05:99": updated(expires_at="2030-01-01T00:00:00+05:99"),
    "expires_at offset with seconds": updated(expires_at="2030-01-01T00:00:00+00:00:30"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
async def test_node_ignores_entries_the_schema_refuses(spec: SpecReader, case: str) -> None:
    """What docs/schema.md refuses (another schema version, a lone surrogate anywhere,
    an offset that is not ISO 8601) the node ignores too, as a JS reader does."""
    update = entries_update(REFUSED[case])
    diff = differences(spec.read(update), await read_by_node(update))
    assert not diff, "\n".join(diff)


async def test_tags_stop_at_256_and_captured_by_lists_each_capturer_once(
    spec: SpecReader,
) -> None:
    """Captures of a live memory add their new tags in order until it has 256 (the rest
    dropped) and each capturing session once, as the JavaScript fold does."""
    async with ConversationsApi(listen=False, discovery=()) as api:
        sessions = [await api.register_session(f"s{i}", subscribe=[]) for i in range(5)]
        for k, s in enumerate(sessions + sessions[:1]):
            m = await s.capture(NS, "One fact", tags=[f"t{64 * k + i}" for i in range(64)])
        assert m.tags == tuple(f"t{i}" for i in range(256))
        assert m.captured_by == tuple(s.id for s in sessions) and m.version == 6
        assert_reads_alike(spec, api)


async def test_unblocked_update_reaches_the_peer_that_sent_the_missing_one() -> None:
    """Node C holds A's update of a memory but not its capture (pending in Yjs); B holds
    the capture. Linked, B sends the capture, C integrates both, and B must get the
    update back: the two must converge."""
    nodes = [ConversationsApi(listen=False, discovery=()) for _ in range(3)]
    for api in nodes:
        await api.__aenter__()
    try:
        a, b, c = nodes
        s = await a.register_session("writer", subscribe=[NS])
        doc = a._ensure_doc(NS)
        sv0 = doc.state_vector()
        m = await s.capture(NS, "A fact")
        capture, sv1 = doc.diff(sv0), doc.state_vector()
        await s.update(m.id, status="reviewed")
        update = doc.diff(sv1)
        for api, u in ((b, capture), (c, update)):
            d = api._ensure_doc(NS)
            api._propagate(d, d.apply_update(u))
        assert c.memories(NS) == [] and b.get(m.id).status is None
        link(b, c)

        def status(api: ConversationsApi) -> list[str | None]:
            return [x.status for x in api.memories(NS)]

        await wait_for(lambda: status(c) == ["reviewed"], what="C integrates both")
        await wait_for(lambda: status(b) == ["reviewed"], what="B gets A's update back")
        assert b.state_hash(NS) == c.state_hash(NS) == a.state_hash(NS)
    finally:
        for api in nodes:
            await api.__aexit__(None, None, None)
