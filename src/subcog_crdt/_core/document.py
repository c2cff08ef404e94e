"""One namespace: its pycrdt document and the memories derived from it.

Writes go in as new keys of the root map (see ``subcog_crdt._core.schema``); what comes
out is events. Local writes know what they wrote; remote updates are read with the small
decoder in ``subcog_crdt._core.ydecode`` (pycrdt's observers would convert every value
of every transaction, local ones included). The update bytes of every transaction are
collected in ``NamespaceDoc.outbox`` for storage and peers to take.
"""

from __future__ import annotations

import bisect
import hashlib
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from pycrdt import Doc, Map, Subscription, TransactionEvent

from subcog_crdt._core.events import Conflict, Deleted, Event, Updated, new_captured
from subcog_crdt._core.gcpause import gc_paused
from subcog_crdt._core.hlc import STAMP_LEN, Hlc, stamp_after, stamp_datetime, valid_stamp
from subcog_crdt._core.memory import (
    FoldState,
    Memory,
    captured_memory,
    find_conflicts,
    first_capture,
    fold,
    fold_state,
)
from subcog_crdt._core.recall import RecallIndex, tokenize
from subcog_crdt._core.schema import (
    ENTRIES,
    MAX_ENTRY,
    MAX_SEEN,
    Write,
    copy_json,
    decode_write,
    encode_write,
    first_memory_id,
    memory_id_chain,
    normalise,
    prepare_content,
    prepare_fields,
    write_key,
)
from subcog_crdt._core.ydecode import (
    Decoded,
    MapInsert,
    UpdateDecodeError,
    decode_state_vector,
    one_entry_update,
    read_update,
)
from subcog_crdt._errors import ConflictError, InvalidArgument, NotFound, ProtocolError

__all__ = ["LOCAL", "NamespaceDoc"]

log = logging.getLogger(__name__)

LOCAL = "local"


def _always() -> bool:
    return True


def _key_order(key: str) -> tuple[str, str, str]:
    """A write key's ``(stamp, session, node)``: the order writes are folded in. Keys are
    kept sorted by it, so a memory needs no second list."""
    _, at, session, node = key.split("/", 3)
    return (at, session, node)


_MARK_EVERY = 16
_SMALL_UPDATE = 2048
"""A peer's update below this many bytes is applied without pausing the cyclic GC (the
pause is for batches: enabling and disabling it costs more than a live write saves)."""


def _arrival_order(key: Any) -> tuple[str, str, str]:
    """The fold order of an inserted key (junk first): integrating the entries of an update
    in this order makes most of them land after the memory's latest write."""
    if isinstance(key, str) and key.count("/") >= 3:
        return _key_order(key)
    return ("", "", "")


def _position(m: _Mem, key: str) -> int:
    """Where ``key`` is in ``m.keys`` (-1: not there), by bisection: a history can be
    long, and its keys are sorted by order."""
    keys = m.keys
    if not keys:
        return -1
    i = bisect.bisect_left(keys, _arrival_order(key), key=_key_order)
    return i if i < len(keys) and keys[i] == key else -1


class _Mem:
    """What a node keeps in Python per memory: keys of its writes (sorted by order) and a
    few derived flags. Values are read back from the document when needed."""

    __slots__ = (
        "deferred",
        "deleted",
        "doc",
        "exists",
        "folded",
        "keys",
        "marks",
        "normh",
        "resolved",
    )

    def __init__(self, doc: int, resolved: bool = True) -> None:
        # A tuple, not a list, for a memory written once (most): a tuple of str is
        # untracked by the cyclic GC, and with 100k memories every object the collector
        # must walk costs on every full pass. A list once written again: appending to a
        # long history must not copy it.
        self.keys: tuple[str, ...] | list[str] = ()
        self.resolved = resolved
        """False after a fast load: only ``keys`` is known until ``_resolve``."""
        self.exists = False
        self.deleted = False
        self.normh = 0
        self.doc = doc
        self.deferred: list[Write] | None = None
        self.folded: FoldState | None = None
        """Its writes folded (kept for memories with several writes; None: fold them from
        the document when needed). Whatever changes ``keys`` sets or clears it."""
        self.marks: list[FoldState] | None = None
        """Checkpoints: ``marks[j]`` is the fold of ``keys[: (j + 1) * _MARK_EVERY]``, so a
        write that arrives before later ones refolds at most that many plus the tail.
        Only valid with ``folded``; None: rebuilt when needed."""


_Once = tuple[str, int, int]
"""A memory written once, by a capture, live (most of them), as ``(key, doc, normh)``: a
tuple of str and int is untracked by the cyclic GC, where a ``_Mem`` is walked on every
full collection (~25 ms per pass at 100k memories, against ~2 ms for the tuples, and a
bulk load runs several passes). Thawed into a ``_Mem`` when anything reads or changes it
(``NamespaceDoc._mem``)."""


def _unpack(once: _Once) -> _Mem:
    key, doc, normh = once
    m = _Mem(doc)
    m.keys = (key,)
    m.exists = True
    m.normh = normh
    return m


def _once(m: _Mem) -> bool:
    """Whether ``m`` can be kept as a ``_Once``: resolved, live, one write (so a capture:
    an update or delete alone leaves a memory that does not exist), nothing folded."""
    return (
        m.resolved
        and m.exists
        and not m.deleted
        and len(m.keys) == 1
        and m.folded is None
        and m.marks is None
        and not m.deferred
    )


def _at_end_of_time(m: _Mem) -> bool:
    """Whether the memory's newest write is stamped at the end of time (only a hostile or
    broken writer does that): no later write can be stamped, so a capture must not pick
    it. Decided by its writes alone, so every node that holds them picks alike."""
    return bool(m.keys) and stamp_after(_key_order(m.keys[-1])[0]) is None


class NamespaceDoc:
    """A namespace's document, derived memories, recall index and update outbox."""

    def __init__(
        self,
        namespace: str,
        *,
        node_id: str,
        hlc: Hlc,
        next_cursor: Callable[[], int],
        homes: dict[str, NamespaceDoc] | None = None,
    ) -> None:
        self.namespace = namespace
        self._homes = {} if homes is None else homes
        """Memory id -> the document that holds it: shared by a node's documents, so a
        lookup by id asks one of them, not every namespace."""
        self.node_id = node_id
        self._hlc = hlc
        self._next_cursor = next_cursor
        self._pdoc: Doc[Any] = Doc()
        self._entries: Map[Any] = self._pdoc.get(ENTRIES, type=Map)
        self._ymap = self._entries.integrated  # pycrdt's native map and doc (see _insert)
        self._ydoc = self._pdoc._doc
        self._own_client = self._pdoc.client_id
        # Peers' updates derived and published but not yet given to pycrdt (apply_update
        # with defer=True); every read of the pycrdt document applies them first.
        self._unapplied: list[bytes] = []
        self._replaying = False
        # Per remote client, a clock pycrdt may be holding items back below (see
        # _note_held); and keys in the map that derive nothing (junk, overwritten).
        self._held: dict[int, int] = {}
        self._ignored: set[str] = set()
        self.outbox: list[bytes] = []
        self._mems: dict[str, _Mem | _Once] = {}
        self._by_doc: list[str] = []
        # Content hash -> the memories an update gave that content ("moved here"); a
        # capture of it joins the smallest live one, so running and restarted nodes agree
        # whatever the order of arrival, deletes and later moves.
        self._moved: dict[int, set[str]] = {}
        self._pending: list[MapInsert] = []
        self.released = 0
        """How many held-back writes later updates let in (they came from elsewhere)."""
        self._tainted = False
        self._resolve_cursor = 0
        self.max_stamp = ""
        """The newest stamp seen at load (the clock resumes after it)."""
        # The state vector as far as remote updates go, tracked from decoded updates so the
        # common case need not ask pycrdt (None: unknown, ask).
        self._sv: dict[int, int] | None = None
        self._hash_cache: str | None = None
        self._n_writes = 0
        # Memories waiting to be indexed, each once with its latest text (a memory
        # written many times, captured by many sessions, is tokenized once): the text, or
        # (text, tags). Documents from _fresh_base on are in _fresh by number (None: none
        # waiting), older ones in _to_index. A bulk load appends to a list: one object for
        # the cyclic GC to walk per memory, where a dict by number and a queue held three.
        self._to_index: dict[int, str | tuple[str, Any]] = {}
        self._fresh: list[str | tuple[str, Any] | None] = []
        self._fresh_base = 0
        self._changed_docs: set[int] = set()
        self.index = RecallIndex()
        self.on_local_update: Callable[[str, bytes], None] | None = None
        """Called with every local transaction's update (during its commit: it must not
        touch the document), or a single write's just before it (``_send_ahead``)."""
        self.has_audience: Callable[[], bool] = _always
        """Whether ``on_local_update`` has anyone to hand a write to now (if not, a write
        is not encoded ahead of pycrdt for nobody)."""
        self._local_txn = 0
        # This document's own next clock, while known exactly (None: ask pycrdt), and the
        # update a local write handed to peers before pycrdt made it (see _send_ahead).
        self._own_clock: int | None = None
        self._ahead: bytes | None = None
        self._sub: Subscription | None = self._pdoc.observe(self._on_transaction)

    @property
    def doc(self) -> Doc[Any]:
        """The pycrdt document, with every update received so far applied."""
        if self._unapplied:
            self.catch_up()
        return self._pdoc

    @property
    def entries(self) -> Map[Any]:
        """The document's root map (see ``doc``)."""
        if self._unapplied:
            self.catch_up()
        return self._entries

    def close(self) -> None:
        """Stop observing the document. pycrdt holds the observer on the Rust side, out
        of the cyclic collector's sight, so without this a closed node (which the
        observer reaches) is never freed."""
        if self._sub is not None:
            self.doc.unobserve(self._sub)
            self._sub = None

    # -- document plumbing -------------------------------------------------------------

    def _on_transaction(self, event: TransactionEvent) -> None:
        update = event.update
        if len(update) > 2:  # b"\x00\x00" is an empty update
            self._hash_cache = None  # any change, a write we ignore (junk) included
            if self._replaying:
                return  # deferred updates: in the outbox since they were received
            self.outbox.append(update)
            ahead = self._ahead
            if ahead is not None:
                self._ahead = None
                if update == ahead:
                    assert self._own_clock is not None
                    self._own_clock += 1
                    return  # peers have it
                # Not expected (the key was free, the clock counted exactly): peers get
                # pycrdt's update too, and the clock is asked for again.
                log.warning("a local write of %s was sent ahead as other bytes", self.namespace)
            self._own_clock = None  # another transaction: count again
            if self._local_txn and self.on_local_update is not None:
                # Hand a local write to peers the moment it exists, before the derived
                # state and events are built: that work is off the propagation path.
                self.on_local_update(self.namespace, update)

    def take_outbox(self) -> list[bytes]:
        out, self.outbox = self.outbox, []
        return out

    def state_vector(self) -> bytes:
        return self.doc.get_state()

    def diff(self, state_vector: bytes | None = None) -> bytes:
        """The updates the holder of ``state_vector`` misses (everything if None)."""
        if state_vector is None:
            return self.doc.get_update()
        return self.doc.get_update(state_vector)

    def state_hash(self) -> str:
        """Equal on two nodes iff they hold the same entries (computed on demand: it reads
        every entry, so it is for checks and diagnostics, not hot paths)."""
        if self._hash_cache is None:
            items = sorted(self.entries.items())  # junk too: it is part of the state
            if not items:
                self._hash_cache = "0" * 64
            else:
                h = hashlib.blake2b(digest_size=32)
                for key, value in items:
                    h.update(f"{key}\x00{value}\x00".encode())
                self._hash_cache = h.hexdigest()
        return self._hash_cache

    # -- reading -----------------------------------------------------------------------

    def _read(self, key: str) -> Write | None:
        return decode_write(key, self._entry(key))

    def _entry(self, key: str) -> Any:
        """``entries.get(key)`` through pycrdt's native map: ``Map.get`` opens four nested
        Python transactions (~10 us here, against ~1 us). Inside a transaction (a batch,
        ``resolve_some``) the read joins it. A value that is not a primitive comes
        back as pycrdt's native object, which no decoder accepts, as before."""
        outer = self._pdoc._txn
        if outer is not None:  # opened through ``doc``: nothing left unapplied
            try:
                return self._ymap.get(outer._txn, key)
            except ValueError:  # pycrdt: "Key error"
                return None
        with self.doc.transaction() as txn:
            try:
                return self._ymap.get(txn._txn, key)
            except ValueError:
                return None

    def _mem(self, memory_id: str) -> _Mem | None:
        """A memory's derived state, resolving it first if it was loaded lazily."""
        m = self._mems.get(memory_id)
        if m is None:
            return None
        if isinstance(m, tuple):
            return self._thaw(memory_id, m)
        if not m.resolved:
            self._resolve(memory_id, m)
        return m

    def _thaw(self, memory_id: str, once: _Once) -> _Mem:
        m = self._mems[memory_id] = _unpack(once)
        return m

    def _view(self, memory_id: str) -> _Mem | None:
        """``_mem`` for reading only: a memory kept as a ``_Once`` stays one (reading
        every memory must not bring back an object per memory for the GC to walk)."""
        m = self._mems.get(memory_id)
        if isinstance(m, tuple):
            return _unpack(m)
        return self._mem(memory_id)

    def has(self, memory_id: str) -> bool:
        if isinstance(self._mems.get(memory_id), tuple):
            return True
        m = self._mem(memory_id)
        return m is not None and m.exists

    def _resolve(self, mid: str, m: _Mem) -> None:
        """Derive a lazily loaded memory's flags from its writes in the document."""
        m.resolved = True
        writes = []
        for key in m.keys:
            w = decode_write(key, self._entry(key))
            if w is not None:
                writes.append(w)
            else:
                self._ignored.add(key)
        if len(writes) == 1 and writes[0].op == "capture":
            # Most memories: one capture, so live, with its own content and tags (what
            # fold would say, without building the Memory).
            w = writes[0]
            m.keys = (w.key,)
            m.folded = m.marks = None
            m.exists = True
            m.normh = hash(normalise(w.changes["content"]))
            self._queue_index(m.doc, w.changes["content"], w.changes.get("tags"))
            self.index.set_live(m.doc, True)
            return
        self._derive(mid, m, writes, indexed=False)

    def _derive(self, mid: str, m: _Mem, writes: list[Write], *, indexed: bool) -> None:
        """Set a memory's derived state from its decoded writes as the map holds them now:
        at a restart, or again after a hostile overwrite (``indexed``: its earlier words
        are in the recall index and must be replaced)."""
        writes.sort(key=lambda w: w.order)
        m.keys = tuple(w.key for w in writes)
        st = fold_state(writes)
        m.folded = st if len(writes) > 1 else None
        m.marks = None
        mem = st.memory(self.namespace)
        if mem is None:
            m.exists = m.deleted = False
            m.deferred = writes or None  # orphans: their capture has not arrived
            self._set_normh(m, mid, 0)
            self.index.set_live(m.doc, False)
            if indexed:  # its earlier words must go, as a restarted node never had them
                self._queue_index(m.doc, "", None)
                self._changed_docs.add(m.doc)
            return
        m.exists = True
        m.deleted = mem.deleted
        normh = hash(normalise(mem.content))
        self._set_normh(m, mid, normh)
        if st.moved:
            self._note_moved(normh, mid)
        else:  # (its content update may have been removed by a hostile writer)
            self._forget_moved(normh, mid)
        self._queue_index(m.doc, mem.content, mem.tags)
        if indexed:
            self._changed_docs.add(m.doc)
        self.index.set_live(m.doc, not mem.deleted)

    def _rederive(self, keys: list[str]) -> None:
        """Derive again the memories whose integrated entries were overwritten or removed:
        from the values the map holds now (what ``_resolve`` reads after a restart),
        dropping entries that no longer decode. No events: a restarted node has none."""
        by_mid: dict[str, list[str]] = {}
        for k in keys:
            if isinstance(k, str):
                by_mid.setdefault(k[:20], []).append(k)
        for mid, ks in by_mid.items():
            m = self._mems.get(mid)
            if isinstance(m, tuple):
                m = self._thaw(mid, m)
            if m is None or not m.resolved:
                continue  # unknown here, or resolved later from the map anyway
            # What a restart would group under this id: its keys and the replaced ones.
            candidates = dict.fromkeys([*m.keys, *ks])
            writes = [w for k in candidates if (w := decode_write(k, self._entry(k))) is not None]
            self._derive(mid, m, writes, indexed=True)

    def _set_normh(self, m: _Mem, mid: str, normh: int) -> bool:
        """Record a memory's content hash; if it changed, forget the old content's
        "moved here" record. True if it changed."""
        if normh == m.normh:
            return False
        before = m.normh
        m.normh = normh
        if before:
            self._forget_moved(before, mid)
        return True

    def _note_moved(self, normh: int, mid: str) -> None:
        """Remember that an update gave ``mid`` this content."""
        ids = self._moved.get(normh)
        if ids is None:
            self._moved[normh] = {mid}
        else:
            ids.add(mid)

    def _forget_moved(self, normh: int, mid: str) -> None:
        ids = self._moved.get(normh)
        if ids is not None:
            ids.discard(mid)
            if not ids:
                del self._moved[normh]

    def _moved_here(self, normh: int) -> str | None:
        """The smallest live memory an update gave this content, if any."""
        live = []
        for mid in self._moved.get(normh, ()):
            m = self._mem(mid)
            live_here = m is not None and m.exists and not m.deleted and m.normh == normh
            if live_here and m is not None and not _at_end_of_time(m):
                live.append(mid)
        return min(live) if live else None

    def resolve_all(self) -> None:
        self.resolve_some(None)

    def resolve_some(self, budget: int | None) -> bool:
        """Resolve lazily loaded memories (all, or about ``budget``); True when none is
        left. Cheap to call repeatedly: it resumes where it stopped."""
        mems = self._mems
        order = self._by_doc
        i = self._resolve_cursor
        end = len(order) if budget is None else min(len(order), i + budget)
        if i >= end:
            return i >= len(order)
        with self.doc.transaction():  # one for every read below (see _entry)
            while i < end:
                mid = order[i]
                m = mems[mid]
                if not isinstance(m, tuple) and not m.resolved:
                    self._resolve(mid, m)
                    if _once(m):
                        mems[mid] = (m.keys[0], m.doc, m.normh)
                i += 1
        self._resolve_cursor = i
        return i >= len(order)

    @property
    def holds_back(self) -> int:
        """Writes received whose earlier updates are missing (pycrdt holds them back)."""
        return len(self._pending)

    @property
    def background_work(self) -> bool:
        """Whether resolving or indexing is still pending."""
        return bool(self._to_index) or bool(self._fresh) or self._resolve_cursor < len(self._by_doc)

    def writes(self, memory_id: str) -> list[Write]:
        m = self._view(memory_id)
        if m is None:
            return []
        out = []
        for key in m.keys:
            w = self._read(key)
            if w is not None:
                out.append(w)
        return out

    def get(self, memory_id: str) -> Memory | None:
        m = self._view(memory_id)
        if m is None or not m.exists:
            return None
        if m.folded is not None:
            return m.folded.memory(self.namespace)
        return fold(self.namespace, self.writes(memory_id))

    def write(self, key: str) -> Write | None:
        """One write of a memory, by its key (None if the memory has no such write)."""
        m = self._view(key[:20]) if isinstance(key, str) else None
        if m is None or _position(m, key) < 0:
            return None
        return self._read(key)

    def memory_at(self, key: str) -> Memory | None:
        """The memory as it was once write ``key`` was folded (None if it has no such
        write, or was not captured then). From the nearest checkpoint: a sync that
        rebuilds the events of a long history must not refold it per event."""
        m = self._view(key[:20]) if isinstance(key, str) else None
        i = -1 if m is None else _position(m, key)
        if m is None or i < 0:
            return None
        if m.folded is not None and m.marks is None:
            m.folded = self._fold_from(m, len(m.keys))  # the same fold, with checkpoints
        marks = m.marks or []
        k = min((i + 1) // _MARK_EVERY, len(marks))
        st = marks[k - 1].copy() if k else FoldState()
        self._fold_keys(st, m.keys, k * _MARK_EVERY, i + 1, None)
        return st.memory(self.namespace)

    def memory_ids(self, include_deleted: bool = False) -> Iterator[str]:
        for mid in list(self._mems):
            if isinstance(self._mems[mid], tuple):
                yield mid  # live, by definition
                continue
            m = self._mem(mid)
            assert m is not None
            if m.exists and (include_deleted or not m.deleted):
                yield mid

    def live_version(self, memory_id: str) -> Memory:
        """The memory if it is live; else NotFound."""
        mem = self.get(memory_id)
        if mem is None:
            raise NotFound(f"no memory {memory_id!r} in namespace {self.namespace!r}")
        if mem.deleted:
            raise NotFound(f"memory {memory_id!r} is deleted")
        return mem

    # -- local writes ------------------------------------------------------------------

    def capture(
        self, session: str, content: str, fields: dict[str, Any]
    ) -> tuple[Memory, list[Event]]:
        changes = prepare_fields({"content": content, **fields})
        return self._capture_prepared(session, changes)

    def capture_many(
        self, session: str, items: Iterable[tuple[str, dict[str, Any]]]
    ) -> tuple[list[Memory], list[Event]]:
        memories: list[Memory] = []
        events: list[Event] = []
        # A batch makes a few objects per capture and no reference cycles (gcpause).
        with gc_paused():
            prepared = [
                prepare_fields({"content": c, **f}) if f else prepare_content(c) for c, f in items
            ]
            self._local_txn += 1
            try:
                with self.doc.transaction(origin=LOCAL) as txn:
                    self._capture_batch(session, prepared, txn._txn, memories, events)
            finally:
                self._local_txn -= 1
        return memories, events

    def _capture_batch(
        self,
        session: str,
        prepared: list[dict[str, Any]],
        txn: Any,
        memories: list[Memory],
        events: list[Event],
    ) -> None:
        """``_capture_prepared`` for each item, inside the batch's transaction ``txn``
        (pycrdt's native one). A content never seen here, whose first id is unused (a
        batch is mostly those), is written inline: what ``_local_write`` and
        ``_integrate`` do for it, without their general cases (~35 % of a capture's
        Python time went to calls between them). Anything else takes the general path."""
        ns = self.namespace
        node = self.node_id
        mems = self._mems
        moved = self._moved
        homes = self._homes
        by_doc = self._by_doc
        new_doc = self.index.new_doc
        fresh = self._fresh
        fresh_base = self._fresh_base
        insert = self._ymap.insert
        now = self._hlc.now
        next_cursor = self._next_cursor
        for changes in prepared:
            content = changes["content"]
            norm = normalise(content)
            normh = hash(norm)
            mid = first_memory_id(ns, norm)
            if mid in mems or normh in moved:
                mem, evs = self._capture_prepared(session, changes)
                memories.append(mem)
                events.extend(evs)
                continue
            at = now()
            key = f"{mid}/{at}/{session}/{node}"
            insert(txn, key, encode_write("capture", "", changes))
            self._n_writes += 1
            doc = new_doc()
            by_doc.append(mid)
            homes[mid] = self
            mems[mid] = (key, doc, normh)
            tags = changes.get("tags")
            if doc - fresh_base == len(fresh):  # (_queue_index, for the next number)
                fresh.append((content, tags) if tags else content)
            else:
                self._queue_index(doc, content, tags)
            mem = captured_memory(ns, mid, at, session, changes)
            memories.append(mem)
            events.append(
                new_captured(ns, next_cursor(), mem.updated_at, session, node, key, mid, mem)
            )

    def _capture_prepared(
        self, session: str, changes: dict[str, Any]
    ) -> tuple[Memory, list[Event]]:
        norm = normalise(changes["content"])
        normh = hash(norm)
        first = first_memory_id(self.namespace, norm)
        if first not in self._mems and normh not in self._moved:
            # The common case: content never seen here, its first id unused.
            return self._local_write(first, "capture", session, changes, normh)
        # Walk the id chain up to the first unused id: a live memory with this content on
        # it wins; else one whose content an update moved here (smallest id: the same on
        # every node); else the first deleted one on the chain is revived; else a new id.
        mid: str | None = None
        revivable: str | None = None
        unused = ""
        for candidate in memory_id_chain(self.namespace, norm, first):
            m = self._mem(candidate)
            if m is not None and _at_end_of_time(m):
                continue  # no write can follow its newest: as if other content held it
            if m is None or not m.exists:
                unused = candidate
                break
            if m.deleted:
                if revivable is None:
                    revivable = candidate
            elif m.normh == normh:
                mid = candidate
                break
        if mid is None and self._moved:
            mid = self._moved_here(normh)
        if mid is None:
            if revivable is None:
                return self._local_write(unused, "capture", session, changes, normh)
            mid = revivable
        m = self._mem(mid)
        if m is not None and m.exists and not m.deleted:
            # The same fact again: record who captured it, change nothing else.
            claim = {"content": changes["content"]}
            if changes.get("tags"):
                claim["tags"] = changes["tags"]
            changes = claim
        return self._local_write(mid, "capture", session, changes)

    def update(
        self,
        session: str,
        memory_id: str,
        fields: dict[str, Any],
        expected_version: int | None = None,
    ) -> tuple[Memory, list[Event]]:
        if not fields:
            raise InvalidArgument("update needs at least one field to change")
        changes = prepare_fields(fields)
        self._check_version(memory_id, expected_version)
        return self._local_write(memory_id, "update", session, changes)

    def delete(
        self, session: str, memory_id: str, expected_version: int | None = None
    ) -> tuple[Memory, list[Event]]:
        self._check_version(memory_id, expected_version)
        return self._local_write(memory_id, "delete", session, {})

    def _check_version(self, memory_id: str, expected: int | None) -> None:
        """NotFound unless live; ConflictError if ``expected`` is given and stale."""
        current = self.live_version(memory_id)
        if expected is not None and expected != current.version:
            raise ConflictError(
                f"memory {memory_id!r} is at version {current.version}, not {expected}",
                memory_id=memory_id,
                expected=expected,
                actual=current.version,
            )

    def _local_write(
        self, mid: str, op: str, session: str, changes: dict[str, Any], normh: int = 0
    ) -> tuple[Memory, list[Event]]:
        m = self._mem(mid)
        base = _key_order(m.keys[-1])[0] if m is not None and m.keys else ""
        at = self._hlc.now()
        if at <= base:  # its newest write is beyond how far our clock follows (MAX_DRIFT_MS)
            after = stamp_after(base)
            if after is None:
                raise ConflictError(
                    f"memory {mid!r} has a write stamped at the end of time ({base}): "
                    "no later write can win over it; capture the content anew",
                    memory_id=mid,
                )
            at = after
        key = write_key(mid, at, session, self.node_id)
        # Captures never conflict; an update or delete records what its writer had seen.
        seen = self._seen(m) if op != "capture" and m is not None else None
        value = encode_write(op, base, changes, seen)
        if seen is not None and (len(seen) > MAX_SEEN or len(value) > MAX_ENTRY):
            # Readers would ignore the entry: record base alone (the older rule) instead.
            seen = None
            value = encode_write(op, base, changes)
        self._local_txn += 1
        try:
            if (
                self.on_local_update is not None
                and self._pdoc._txn is None
                and self.has_audience()
                # (pycrdt would insert after the item there: other bytes, same item id)
                and not self._holds_key(key)
            ):
                self._send_ahead(key, value)
            self._insert(key, value)
        finally:
            self._local_txn -= 1
            self._ahead = None
        w = Write(key, mid, at, session, self.node_id, op, base, changes, seen)
        events, mem = self._integrate(w, value, normh=normh)
        assert mem is not None  # a local write always applies to a known memory
        return mem, events

    def _send_ahead(self, key: str, value: str) -> None:
        """Hand peers the update of one entry before pycrdt's transaction makes it (~9 us
        of a propagated write): encoded as yrs encodes it, from this document's own next
        clock. The commit compares (_on_transaction): equal, the clock moves on; not, pycrdt's
        update follows it and the clock is asked for again."""
        clock = self._own_clock
        if clock is None:
            sv = decode_state_vector(self.doc.get_state())
            clock = self._own_clock = sv.get(self._own_client, 0)
        try:
            update = one_entry_update(self._own_client, clock, ENTRIES, key, value)
        except UnicodeEncodeError:
            return  # (a lone surrogate): pycrdt's own update goes, as for any write
        assert self.on_local_update is not None
        self._ahead = update
        try:
            self.on_local_update(self.namespace, update)
        except Exception:
            # Some peer may have it: the write must now be made as sent. (Before, the
            # commit ran the hand-over; its error is not the writer's either.)
            log.exception("handing a local write of %s to peers failed", self.namespace)

    def _seen(self, m: _Mem) -> dict[str, str]:
        """Per node, the newest stamp of the memory's updates and deletes folded here
        (``Write.seen``; captures never conflict): kept by its fold, or read."""
        if m.folded is not None:
            return dict(m.folded.seen)
        seen: dict[str, str] = {}
        for key in m.keys:  # (a memory written once, or not folded yet: rare)
            w = self._read(key)
            if w is not None and w.op != "capture" and w.at > seen.get(w.node, ""):
                seen[w.node] = w.at
        return seen

    def _insert(self, key: str, value: str) -> None:
        """Set one entry. ``Map.__setitem__`` opens two nested pycrdt transactions and
        type-checks the value: ~9 us here, against ~5 us for this."""
        self._native_txn(self._ymap.insert, key, value)

    def _native_txn(self, op: Callable[..., None], *args: Any) -> None:
        """Run ``op(txn, *args)`` in pycrdt's native transaction, skipping its Python
        wrapper (a few us per write). The commit still runs the document's observers, and
        their errors are raised as pycrdt would. Inside a batch's transaction the operation
        joins it. (pycrdt 0.14 internals; the version is pinned in pyproject.)"""
        outer = self._pdoc._txn
        if outer is not None:  # opened through ``doc``: nothing left unapplied
            op(outer._txn, *args)
            return
        if self._unapplied:
            self.catch_up()
        txn = self._ydoc.create_transaction()
        try:
            op(txn, *args)
            txn.commit()
        finally:
            txn.drop()
        if self._pdoc._exceptions:
            errors = tuple(self._pdoc._exceptions)
            self._pdoc._exceptions.clear()
            raise ExceptionGroup("observer callback error", errors)

    @property
    def unapplied(self) -> int:
        """How many updates ``catch_up`` has still to give pycrdt."""
        return len(self._unapplied)

    def catch_up(self) -> None:
        """Give pycrdt the updates ``apply_update(defer=True)`` held (one transaction).
        They are in the derived state, the events and the outbox already."""
        pending, self._unapplied = self._unapplied, []
        if not pending:
            return
        self._replaying = True
        try:
            txn = self._ydoc.create_transaction()
            try:
                for update in pending:
                    self._ydoc.apply_update(txn, update)
                txn.commit()
            finally:
                txn.drop()
        except Exception:
            # Not expected: a deferred update has the one form the decoder reads exactly
            # (Decoded.canonical). Its writes are derived already; pycrdt's state vector
            # is asked for from now on.
            log.exception("pycrdt refused updates of %s derived already", self.namespace)
            self._sv = None
            self._tainted = True
        finally:
            self._replaying = False
        for exc in self._pdoc._exceptions:  # another observer's (a test's, say)
            log.error("observer of %s failed: %r", self.namespace, exc)
        self._pdoc._exceptions.clear()

    # -- remote updates ----------------------------------------------------------------

    def apply_update(self, update: bytes, defer: bool = False) -> list[Event]:
        """Apply a Yjs update from a peer; return the events of the writes it brought.
        Raises ``ProtocolError`` (and changes nothing) if the bytes are not an update.

        ``defer``: the common live update (one new entry, next in its writer's clocks) is
        derived and put in the outbox now, and given to pycrdt by ``catch_up`` (the caller
        calls it soon; any read of the document does first). Its events then reach their
        subscribers without waiting for pycrdt (~15 us of a propagated capture)."""
        if len(update) < _SMALL_UPDATE:  # a live write or two: too few objects to matter
            return self._apply_update(update, defer)
        with gc_paused():  # a peer's batch: like a local one (capture_many)
            return self._apply_update(update, defer)

    def _apply_update(self, update: bytes, defer: bool = False) -> list[Event]:
        try:
            decoded = read_update(update, ENTRIES)
        except UpdateDecodeError as exc:
            raise ProtocolError(f"invalid Yjs update for {self.namespace!r}: {exc}") from exc
        sv = self._sv
        if defer and decoded.canonical and self._defers(decoded, sv):
            assert sv is not None
            client, _, end = decoded.blocks[0]
            sv[client] = end
            self._unapplied.append(update)
            self.outbox.append(update)  # what pycrdt's transaction would have put there
            self._hash_cache = None
            ins = decoded.inserts[0]
            return self._absorb_one(ins.key, ins.value)  # (what _absorb does with one)
        fast = (
            decoded.simple
            and not self._tainted  # pycrdt may hold a hostile item back: apply it watched
            and not self._pending
            and not self._held
            and sv is not None
            # The tracked clocks are remote ones: items claiming this node's own client id
            # (at clocks it used: pycrdt ignores them) need the real state vector.
            and all(
                start <= sv.get(client, 0) and client != self._own_client
                for client, start, _ in decoded.blocks
            )
        )
        # What we held before: an item at a clock below it is one we have (a duplicate),
        # or a different item claiming the same id, which Yjs ignores and so must we.
        if fast:
            assert sv is not None
            before = {client: sv.get(client, 0) for client, _, _ in decoded.blocks}
        else:
            before = decode_state_vector(self.doc.get_state())
        fresh = [i for i in decoded.inserts if i.clock >= before.get(i.client, 0)]
        # New items under keys the map holds: Yjs keeps one of them by client id, not the
        # one we derived (a conforming writer never reuses a key; a hostile one can).
        overwrite = self._overwrites(fresh)
        fast = fast and not overwrite
        # An update that may overwrite or remove entries, or any update once one did
        # (pycrdt may have held items back that this one releases): watch which keys
        # change, so the memories they belong to are derived from what the map now holds,
        # as on a node restarted from it.
        changed: dict[str, str] = {}
        watch = None
        if decoded.unknown or decoded.deletes or overwrite or self._tainted:

            def on_change(event: Any) -> None:
                for key, change in event.keys.items():
                    changed[key] = str(change.get("action"))

            watch = self.entries.observe(on_change)
        try:
            self._native_txn(self._ydoc.apply_update, update)
        except Exception as exc:  # pycrdt raises plain exceptions for bad bytes
            raise ProtocolError(f"invalid Yjs update for {self.namespace!r}: {exc}") from exc
        finally:
            if watch is not None:
                self.entries.unobserve(watch)
        if fast:
            # Every struct continues what we had and depends on nothing else, so all of it
            # was integrated: no need to ask pycrdt for the state vector.
            assert sv is not None
            for client, _, end in decoded.blocks:
                if end > sv.get(client, 0):
                    sv[client] = end
            return self._absorb(fresh, False, known_integrated=True)
        self._sv = None
        events = self._absorb(fresh, decoded.unknown or decoded.deletes or overwrite)
        if changed:
            events.extend(self._settle(changed))
        self._note_held(decoded.blocks)
        return events

    def _overwrites(self, fresh: list[MapInsert]) -> bool:
        """Whether new items set keys the map holds, or one key twice."""
        if len(fresh) == 1:
            return self._holds_key(fresh[0].key)
        keys = {i.key for i in fresh}
        return len(keys) != len(fresh) or any(self._holds_key(k) for k in keys)

    def _holds_key(self, key: str) -> bool:
        """Whether the map holds ``key``, as far as the derived state tells (the writes
        of every memory, and the entries ignored)."""
        return self._holds_write(key) or key in self._ignored

    def _holds_write(self, key: str) -> bool:
        """Whether ``key`` is one of a memory's writes here."""
        m = self._mems.get(key[:20])
        if m is None:
            return False
        if isinstance(m, tuple):
            return m[0] == key
        if not m.resolved:  # its keys may hold junk, not in key order
            return key in m.keys
        return _position(m, key) >= 0

    def _note_held(self, blocks: list[tuple[int, int, int]]) -> None:
        """After an update pycrdt applied itself: note the clocks it may be holding back
        (items waiting for others), and forget those it now has. While it holds any, no
        update takes the fast path or is deferred: one could release them, and the
        outbox must then get pycrdt's account of what changed, not the bytes received."""
        sv = self._sv
        held = self._held
        if not held and sv is not None and all(end <= sv.get(c, 0) for c, _, end in blocks):
            return  # everything integrated (sv was just read from pycrdt)
        sv = decode_state_vector(self._pdoc.get_state())
        for client, _, end in blocks:
            if end > sv.get(client, 0):
                held[client] = max(held.get(client, 0), end)
        for client, end in list(held.items()):
            if sv.get(client, 0) >= end:
                del held[client]
        if not held and not self._pending:
            self._sv = dict(sv)

    def _defers(self, decoded: Decoded, sv: dict[int, int] | None) -> bool:
        """Whether pycrdt will integrate all of a canonical one-entry update, as it is:
        its one item comes right after what the document holds of its writer (not a
        duplicate, nothing missing), and nothing could hold it back or make it ask
        more of the document than the decoder did."""
        client, start, _ = decoded.blocks[0]
        return (
            sv is not None
            and not self._tainted
            and not self._pending
            and not self._held
            and client != self._own_client
            and sv.get(client, 0) == start
            and not self._holds_key(decoded.inserts[0].key)
        )

    def _settle(self, changed: dict[str, str]) -> list[Event]:
        """After a watched apply: integrate entries it added that the decoder could not
        see (released by pycrdt from an earlier update), and derive again the memories
        whose entries it overwrote or removed."""
        events: list[Event] = []
        replaced = []
        # In fold order, not pycrdt's (hash) order: the events' memory snapshots must not
        # depend on it (and most entries then fold onto what is folded already).
        for key, action in sorted(changed.items(), key=lambda kv: (_arrival_order(kv[0]), kv[0])):
            if action == "add":  # one already integrated is a duplicate to _absorb_one
                n = self._n_writes
                events.extend(self._absorb_one(key, self._entry(key)))
                if self._n_writes != n:  # pycrdt held it back: it came earlier, from elsewhere
                    self.released += 1
                continue
            self._tainted = True
            if self._holds_write(key):
                replaced.append(key)
            else:
                # It held no write (junk): what it holds now is new here, as if added.
                events.extend(self._absorb_one(key, self._entry(key)))
        if replaced:
            self._rederive(replaced)
        return events

    def _absorb(
        self, inserts: list[MapInsert], unknown: bool, known_integrated: bool = False
    ) -> list[Event]:
        if unknown:
            # Someone overwrote or removed entries: from now on check every value against
            # the document instead of trusting the update's bytes.
            self._tainted = True
        if not inserts and not unknown and not self._pending:
            return []
        if len(inserts) > 1:
            # In fold order (a catch-up holds several writers' writes of one memory,
            # interleaved): most then fold onto what is folded, not refold the memory.
            inserts = sorted(inserts, key=lambda i: _arrival_order(i.key))
        events: list[Event] = []
        if known_integrated:
            for ins in inserts:
                events.extend(self._absorb_one(ins.key, ins.value))
            return events
        held, self._pending = self._pending, []
        with self.doc.transaction():  # one transaction for all reads below
            sv = decode_state_vector(self.doc.get_state())
            self._sv = dict(sv)  # our own client's clock is never consulted
            ready: list[tuple[MapInsert, bool]] = []
            for ins in held:
                if ins.clock >= sv.get(ins.client, 0):
                    self._pending.append(ins)
                else:
                    # integrated since: but was it this item? check the document
                    ready.append((ins, True))
            for ins in inserts:
                if ins.clock >= sv.get(ins.client, 0):
                    self._pending.append(ins)  # waits for a missing earlier update
                    continue
                ready.append((ins, False))
            if held and len(ready) > 1:
                # Released writes and new ones together, in fold order (a released
                # write may come after one this update brought).
                ready.sort(key=lambda r: _arrival_order(r[0].key))
            for ins, verify in ready:
                n = self._n_writes
                events.extend(self._absorb_one(ins.key, ins.value, verify=verify))
                if verify and self._n_writes != n:
                    self.released += 1
        if self._pending:
            self._sv = None
        return events

    def _absorb_one(self, key: str, value: Any, verify: bool = False) -> list[Event]:
        w = decode_write(key, value)
        if w is None:
            if isinstance(key, str):
                log.debug("ignoring non-conforming entry %r in %s", key[:80], self.namespace)
                self._ignored.add(key)
            return []
        m = self._mem(w.memory_id)
        if m is not None and _position(m, key) >= 0:
            return []  # duplicate delivery
        if (verify or self._tainted) and self._entry(key) != value:
            self._ignored.add(key)
            return []  # overwritten, removed or never this value: not a write to trust
        self._hlc.observe_valid(w.at)  # (decode_write checked it)
        events, _ = self._integrate(w, value)
        return events

    def load(self, updates: Iterable[bytes]) -> None:
        """Load stored state (a snapshot and the updates after it) into a fresh document,
        without emitting events. Used once, at open.

        Only keys are read here; a memory written once is resolved (its value read and
        checked) on first use, so a restart costs little more than pycrdt's own load.
        Memories with several writes are resolved now, since an update may have moved
        their content (which capture dedupe must know)."""
        if self._n_writes:
            raise RuntimeError("load() is for a fresh document")
        self._sv = None
        with self.doc.transaction(origin="load"):
            for update in updates:
                self.doc.apply_update(update)
        self.outbox.clear()
        mems = self._mems
        by_doc = self._by_doc
        groups: dict[str, list[str]] = {}
        top = top_key = ""
        n = 0
        for key in self.entries.keys():  # noqa: SIM118 (pycrdt's Map iterates keys only via keys())
            if key[20:21] != "/":
                continue  # not a write key: ignored, as decode_write would
            mid = key[:20]
            ks = groups.get(mid)
            if ks is None:
                groups[mid] = [key]
            else:
                ks.append(key)
            n += 1
            stamp = key[21 : 21 + STAMP_LEN]
            if stamp > top and valid_stamp(stamp):  # raw keys: junk must not count
                top, top_key = stamp, key
        first = self.index.new_docs(len(groups))
        homes = self._homes
        several: list[tuple[str, _Mem]] = []
        for i, (mid, ks) in enumerate(groups.items(), first):
            m = mems[mid] = _Mem(i, resolved=False)
            m.keys = tuple(ks)
            by_doc.append(mid)
            homes[mid] = self
            if len(ks) > 1:
                several.append((mid, m))
        self._n_writes = n
        self.max_stamp = self._resume_stamp(top, top_key)
        with self.doc.transaction():  # one for every read below (see _entry)
            for mid, m in several:
                self._resolve(mid, m)

    def _resume_stamp(self, top: str, top_key: str) -> str:
        """The newest stamp the clock resumes after at a restart: of an entry that is a
        write, and one the clock follows (``Hlc.follows``), as a running node followed
        only such stamps. Usually the newest key's; junk or a far-future entry make it
        look further (rare: a hostile or broken writer)."""
        if not top or (self._hlc.follows(top) and self._is_write(top_key)):
            return top
        keys = [k for k in self.entries.keys() if k[20:21] == "/"]  # noqa: SIM118
        keys.sort(key=lambda k: k[21 : 21 + STAMP_LEN], reverse=True)
        for key in keys:
            stamp = key[21 : 21 + STAMP_LEN]
            if valid_stamp(stamp) and self._hlc.follows(stamp) and self._is_write(key):
                return stamp
        return ""

    def _is_write(self, key: str) -> bool:
        return decode_write(key, self._entry(key)) is not None

    # -- integration -------------------------------------------------------------------

    def _integrate(
        self, w: Write, value: str, emit: bool = True, normh: int = 0
    ) -> tuple[list[Event], Memory | None]:
        """Add one write to the derived state; return its events and the memory after."""
        mid = w.memory_id
        m = self._mem(mid)
        self._n_writes += 1
        order = (w.at, w.session, w.node)
        if m is None or not m.keys:
            # New here; or known only by entries that no longer decode (junk under this
            # id, seen at a restart or after an overwrite): then its first valid write,
            # from a clean slate.
            if m is None:
                doc = self.index.new_doc()
                self._by_doc.append(mid)
                self._homes[mid] = self
                if w.op == "capture":
                    # The common case, kept short: a brand-new memory, kept as a _Once.
                    content = w.changes["content"]
                    self._mems[mid] = (w.key, doc, normh or hash(normalise(content)))
                    self._queue_index(doc, content, w.changes.get("tags"))
                    ns = self.namespace
                    new = captured_memory(ns, mid, w.at, w.session, w.changes)
                    if not emit:
                        return [], new
                    # What _events_for makes of it (no later write to show it before).
                    at = new.updated_at
                    cursor = self._next_cursor()
                    ev = new_captured(ns, cursor, at, w.session, w.node, w.key, mid, new)
                    return [ev], new
                m = self._mems[mid] = _Mem(doc)
            else:
                m.deleted = False
                m.deferred = None
                self._set_normh(m, mid, 0)
                self._changed_docs.add(m.doc)  # it may hold words of an earlier content
            m.keys = (w.key,)
            m.folded = m.marks = None
            refolded = False
            if w.op == "capture":
                mem: Memory | None = first_capture(self.namespace, w)
                m.exists = True
                m.normh = normh or hash(normalise(w.changes["content"]))
                self._queue_index(m.doc, w.changes["content"], w.changes.get("tags"))
                if not emit:
                    return [], mem
                assert mem is not None
                return self._events_for(w, mem, []), mem
            st = fold_state([w])
        elif order > _key_order(m.keys[-1]):
            # After every write it has (local writes, and remote ones arriving in order):
            # fold just this one onto what is folded already.
            st = m.folded if m.folded is not None else self._fold_from(m, 0)
            st.step(w)
            refolded = False
            if type(m.keys) is list:
                m.keys.append(w.key)
            else:
                m.keys = [*m.keys, w.key]
            marks = m.marks
            if marks is not None and len(m.keys) == (len(marks) + 1) * _MARK_EVERY:
                marks.append(st.copy())
        else:
            # Before some write it has (concurrent writes arriving out of order): fold
            # again from the last checkpoint before it.
            keys = list(m.keys)
            i = bisect.bisect(keys, order, key=_key_order)
            keys.insert(i, w.key)
            m.keys = keys
            if m.folded is None:
                m.marks = None
            st = self._fold_from(m, i)
            refolded = True
        m.folded = st if len(m.keys) > 1 else None
        mem = st.memory(self.namespace)
        if mem is not None:
            was_live = m.exists and not m.deleted
            m.exists = True
            m.deleted = mem.deleted
            normh = hash(normalise(mem.content))
            changed = self._set_normh(m, mid, normh)
            # The same rule as at a restart (_resolve): content set by an update is
            # "moved here", whether or not this write changed it.
            if st.moved:
                self._note_moved(normh, mid)
            # Words change with the content, a write's tags, or a write that lands before
            # later ones (a delete there makes a later capture revive with its own tags).
            # And with a delete or a revival: a deleted memory's words do not count in
            # the ranking's statistics (flush_index indexes it with none).
            if (
                changed
                or refolded
                or ("tags" in w.changes and w.op != "delete")
                or was_live == mem.deleted
            ):
                self._queue_index(m.doc, mem.content, mem.tags)
                self._changed_docs.add(m.doc)
            self.index.set_live(m.doc, not mem.deleted)
        if not emit:
            return [], mem
        if mem is None:
            # An update or delete whose capture has not arrived yet: hold its event so
            # subscribers see Captured first.
            if m.deferred is None:
                m.deferred = []
            m.deferred.append(w)
            return [], None
        if m.deferred:
            held, m.deferred = m.deferred, None
            events: list[Event] = []
            # Compare each pair of writes once, as a node that got them in order would.
            held_keys = {h.key for h in held}
            seen = [y for y in self._writes_except(m, w.key) if y.key not in held_keys]
            # The capture that made the memory exist first (subscribers see a memory's
            # Captured before anything else of it), then the held writes in order.
            later = sorted(held if w.op == "capture" else [*held, w], key=lambda x: x.order)
            for x in [w, *later] if w.op == "capture" else later:
                events.extend(self._events_for(x, mem, seen))
                seen.append(x)
            return events, mem
        if w.op == "capture":  # captures never conflict: nothing to compare
            return self._events_for(w, mem, []), mem
        return self._events_for(w, mem, self._writes_after(m, self._unseen_after(m, w), w.key)), mem

    def _queue_index(self, doc: int, content: str, tags: Any) -> None:
        entry = (content, tags) if tags else content
        i = doc - self._fresh_base
        if i < 0:
            self._to_index[doc] = entry
            return
        fresh = self._fresh
        if i < len(fresh):
            fresh[i] = entry
        else:
            if i > len(fresh):
                fresh.extend([None] * (i - len(fresh)))
            fresh.append(entry)

    def flush_index(self, budget: int | None = None) -> int:
        """Index pending memories (all, or about ``budget``); return how many remain.
        Indexing is deferred so a write does not pay for it; recall flushes first, so
        results are always current. (The order does not matter: a ranking depends on
        the words indexed, not on the order they went in.)"""
        pending = self._to_index
        fresh = self._fresh
        left = len(pending) + len(fresh)
        take = left if budget is None else min(budget, left)
        entry: str | tuple[str, Any] | None
        for _ in range(take):
            if pending:
                doc, entry = pending.popitem()
            else:
                entry = fresh.pop()
                if entry is None:
                    continue
                doc = self._fresh_base + len(fresh)
            if isinstance(entry, tuple):
                self._index_doc(doc, *entry)
            else:
                self._index_doc(doc, entry, None)
        if not fresh:
            self._fresh_base = len(self._by_doc)
        return len(pending) + len(fresh)

    def _index_doc(self, doc: int, content: str, tags: Any) -> None:
        index = self.index
        m = self._mems[self._by_doc[doc]]
        live = isinstance(m, tuple) or (m.exists and not m.deleted)
        index.set_live(doc, live)
        # Only live memories' words count (N, document frequencies, mean length): a
        # deleted one has none, so deletions do not sway the ranking.
        tokens = tokenize(content) if live else []
        if tags and live:
            for tag in tags:
                tokens.extend(tokenize(tag))
        if doc in self._changed_docs:
            index.replace(doc, tokens)
        else:
            index.add(doc, tokens)

    def _fold_from(self, m: _Mem, i: int) -> FoldState:
        """Fold ``m.keys`` again from the last checkpoint at or before index ``i`` (the
        writes before it are unchanged), keeping checkpoints as it goes."""
        marks = m.marks if m.marks is not None else []
        del marks[i // _MARK_EVERY :]  # those include index i or later
        m.marks = marks
        st = marks[-1].copy() if marks else FoldState()
        self._fold_keys(st, m.keys, len(marks) * _MARK_EVERY, len(m.keys), marks)
        return st

    def _fold_keys(
        self,
        st: FoldState,
        keys: Sequence[str],
        start: int,
        stop: int,
        marks: list[FoldState] | None,
    ) -> None:
        """Fold the writes of ``keys[start:stop]`` onto ``st``; with ``marks``, append a
        checkpoint at every multiple of ``_MARK_EVERY``."""
        for n in range(start, stop):
            w = self._read(keys[n])
            if w is not None:
                st.step(w)
            if marks is not None and (n + 1) % _MARK_EVERY == 0:
                marks.append(st.copy())

    def _unseen_after(self, m: _Mem, w: Write) -> str:
        """A stamp at or before which ``w``'s writer had seen every write of the memory:
        only writes after it can conflict with ``w``. With ``seen``, the oldest of what
        it had seen from each node that wrote the memory (a node it had seen nothing of
        makes it "")."""
        seen = w.seen
        if seen is None:
            return w.base
        nodes = m.folded.seen if m.folded is not None else self._seen(m)
        return min(
            (seen.get(n, "") for n, top in nodes.items() if n != w.node and seen.get(n, "") < top),
            default=w.base,
        )

    def _writes_after(self, m: _Mem, stamp: str, key: str) -> list[Write]:
        """The writes stamped after ``stamp``, but ``key``: the only ones a write whose
        ``base`` is ``stamp`` can conflict with (see find_conflicts). Keys are sorted by
        stamp first, so they are a tail, usually empty."""
        out = []
        for k in reversed(m.keys):
            if _key_order(k)[0] <= stamp:
                break
            if k != key:
                w = self._read(k)
                if w is not None:
                    out.append(w)
        out.reverse()
        return out

    def _writes_except(self, m: _Mem, key: str) -> list[Write]:
        out = []
        for k in m.keys:
            if k != key:
                w = self._read(k)
                if w is not None:
                    out.append(w)
        return out

    def _events_for(self, w: Write, mem: Memory, others: list[Write]) -> list[Event]:
        ns = self.namespace
        # the memory already holds the datetime of its latest write (usually this one)
        at = mem.updated_at if mem.clock == w.at else stamp_datetime(w.at)
        cursor = self._next_cursor()
        if w.op == "capture":  # captures merge: they never conflict
            m = self._mems.get(w.memory_id)
            if isinstance(m, _Mem) and m.keys and m.keys[-1] != w.key:
                # Later writes are folded already (it arrived late, or held back behind
                # them): the event carries the memory as of this write, as sync() does.
                mem = self.memory_at(w.key) or mem
            return [new_captured(ns, cursor, at, w.session, w.node, w.key, w.memory_id, mem)]
        common: dict[str, Any] = {
            "namespace": ns,
            "cursor": cursor,
            "at": at,
            "source_session": w.session,
            "node_id": w.node,
            "write_id": w.key,
            "memory_id": w.memory_id,
        }
        out: list[Event] = []
        if w.op == "update":
            out.append(Updated(changes=copy_json(w.changes), **common))
        else:
            out.append(Deleted(**common))
        for c in find_conflicts(w, others):
            out.append(
                Conflict(
                    cursor=self._next_cursor(),
                    namespace=self.namespace,
                    at=stamp_datetime(c.winner.at),
                    source_session=c.winner.session,
                    node_id=c.winner.node,
                    write_id=c.loser.key,
                    memory_id=w.memory_id,
                    winner=c.winner.public(),
                    loser=c.loser.public(),
                    fields=c.fields,
                )
            )
        return out

    # -- recall ------------------------------------------------------------------------

    def tokens_of(self, doc: int) -> list[str] | None:
        """A memory's current words, deleted or not (what a fresh index would hold)."""
        mem = self.get(self._by_doc[doc])
        if mem is None:
            return None
        tokens = tokenize(mem.content)
        for tag in mem.tags:
            tokens.extend(tokenize(tag))
        return tokens

    def search(
        self, query: str, limit: int, tags: frozenset[str] = frozenset()
    ) -> list[tuple[float, Memory]]:
        hits, built = self._search(query, limit, tags)
        out: list[tuple[float, Memory]] = []
        for score, mid in hits:
            mem = built[mid] if mid in built else self.get(mid)
            if mem is not None and not mem.deleted:
                out.append((score, mem))
        return out

    def search_ids(
        self, query: str, limit: int, tags: frozenset[str] = frozenset()
    ) -> list[tuple[float, str]]:
        """The best ``limit`` matches as (score, memory id), without building the
        memories (a recall over many namespaces builds only those it returns)."""
        return self._search(query, limit, tags)[0]

    def _search(
        self, query: str, limit: int, tags: frozenset[str]
    ) -> tuple[list[tuple[float, str]], dict[str, Memory | None]]:
        """The hits, and the memories a tags filter built on the way."""
        accept: Callable[[int], bool] | None = None
        built: dict[str, Memory | None] = {}
        by_doc = self._by_doc

        def accept_tags(doc: int) -> bool:
            mid = by_doc[doc]
            mem = built[mid] = self.get(mid)
            return mem is not None and not mem.deleted and tags.issubset(mem.tags)

        if tags:
            accept = accept_tags
        self.resolve_all()
        self.flush_index()
        hits = self.index.search(query, limit, self.tokens_of, accept, by_doc.__getitem__)
        return [(score, by_doc[doc]) for score, doc in hits], built
