"""The document schema: names, normalisation, memory ids and the entry codec.

One pycrdt ``Doc`` per namespace holds one root ``Y.Map`` named ``entries``. Every write
(capture, update, delete) is a new key ``<memory id>/<stamp>/<session>/<node>`` whose value
is a JSON string. Keys never collide (a node's clock is strictly increasing), so Yjs never
has to pick between two values for one key, which is how nested maps lose data. See
``docs/schema.md``.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any, Final, NamedTuple, cast

from subcog_crdt._core.hlc import valid_stamp
from subcog_crdt._errors import InvalidArgument, InvalidNamespace

__all__ = [
    "ENTRIES",
    "FIELDS",
    "MAX_CONTENT",
    "SCHEMA_VERSION",
    "Write",
    "check_content",
    "check_names",
    "check_namespace",
    "check_session_id",
    "check_tags",
    "check_unicode",
    "copy_json",
    "decode_write",
    "encode_write",
    "first_memory_id",
    "memory_id_chain",
    "normalise",
    "prepare_fields",
    "write_key",
]

SCHEMA_VERSION: Final = 1
ENTRIES: Final = "entries"
MAX_CONTENT: Final = 256 * 1024
MAX_TAGS: Final = 64
MAX_MEMORY_TAGS: Final = 256
"""Tags one memory keeps: captures of a live memory add theirs up to this many (the rest
are dropped, alike on every node), so a fact captured by many sessions stays small."""
MAX_TAG: Final = 128
MAX_METADATA: Final = 64 * 1024
MAX_TEXT: Final = 1024
"""The longest ``domain``, ``status`` or ``source``."""
MAX_ENTRY: Final = 4 * MAX_CONTENT + MAX_METADATA
"""The longest entry value (characters of JSON) any node accepts; a longer one is ignored.
JSON escapes a character in at most 6 (``\\u0001``), so content dense in control characters
can exceed it: a local write whose entry would is refused (see ``prepare_fields``)."""
# The most an entry's JSON can take besides its content: framing (op, base, field names)
# and every other field at its limit, each character escaped to 6.
_OTHER_MAX: Final = (
    512
    + MAX_TAGS * (6 * MAX_TAG + 3)
    + MAX_METADATA
    + 3 * (6 * MAX_TEXT + 2)
    + 64  # expires_at, an ISO 8601 string made by datetime.isoformat()
)
_CONTENT_FITS: Final = (MAX_ENTRY - _OTHER_MAX) // 6 - 2
"""Content up to this many characters fits in an entry whatever it holds (checked with no
encoding); only longer content has its entry measured."""
OPS: Final = ("capture", "update", "delete")
# Fields a write may set. ``deleted`` is derived from the op, never set directly.
FIELDS: Final = (
    "content",
    "tags",
    "metadata",
    "domain",
    "status",
    "source",
    "expires_at",
)

_NAMESPACE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}\Z")
_SESSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@+-]{0,127}\Z")
_NODE = re.compile(r"[0-9a-f]{1,32}\Z")
_KEY = re.compile(
    r"([0-9a-f]{20})/([0-9]{13}[0-9a-f]{6})/([A-Za-z0-9][A-Za-z0-9_.:@+-]{0,127})/([0-9a-f]{1,32})\Z"
)


def check_namespace(name: object) -> str:
    if not isinstance(name, str) or not _NAMESPACE.match(name):
        raise InvalidNamespace(f"invalid namespace {name!r}: expected [a-z0-9][a-z0-9_.-]{{0,63}}")
    return name


def check_session_id(session_id: object) -> str:
    if not isinstance(session_id, str) or not _SESSION.match(session_id):
        raise InvalidArgument(
            f"invalid session id {session_id!r}: expected 1-128 of [A-Za-z0-9_.:@+-],"
            " starting with a letter or digit"
        )
    return session_id


def check_unicode(what: str, text: str) -> str:
    """``text`` if it can be stored: every document string is UTF-8, which a lone surrogate
    (``"\\ud800"``, e.g. from a bad decode) cannot be encoded to."""
    if not text.isascii():
        try:
            text.encode()
        except UnicodeEncodeError as exc:
            raise InvalidArgument(
                f"{what} is not valid Unicode text: {text[exc.start : exc.end]!r} at"
                f" {exc.start} is a lone surrogate"
            ) from None
    return text


def check_names(
    what: str, value: object, check: Callable[[object], str] | None = None
) -> list[str]:
    """A collection of strings given where one is expected (``["a", "b"]``, a set, a
    tuple...), each passed through ``check`` if given. A str is refused rather than read
    character by character."""
    if isinstance(value, str | bytes | bytearray):
        raise InvalidArgument(
            f"{what} must be a collection of str, not a single {type(value).__name__}"
        )
    try:
        items = list(cast("Iterable[Any]", value))
    except TypeError:
        raise InvalidArgument(
            f"{what} must be a collection of str, not {type(value).__name__}"
        ) from None
    if check is not None:
        return [check(item) for item in items]
    for item in items:
        if not isinstance(item, str):
            raise InvalidArgument(f"{what} must hold only str, not {item!r}")
    return items


def check_bool(what: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgument(f"{what} must be True or False, not {value!r}")
    return value


def check_content(content: object) -> str:
    if not isinstance(content, str):
        raise InvalidArgument(f"content must be a str, not {type(content).__name__}")
    if not content or content.isspace():  # (strip() would copy the text to say so)
        raise InvalidArgument("content is empty")
    if len(content) > MAX_CONTENT:
        raise InvalidArgument(f"content is {len(content)} characters; the limit is {MAX_CONTENT}")
    if "\x00" in content:
        raise InvalidArgument("content contains a NUL character")
    if not content.isascii():
        check_unicode("content", content)
    # A str subclass (numpy.str_, Markup, a StrEnum member) is stored as the plain str it
    # holds: what every node, and this one after a restart, reads back.
    return content if type(content) is str else str.__str__(content)


def check_tags(tags: object) -> list[str]:
    if isinstance(tags, str) or not isinstance(tags, _TAG_COLLECTIONS):
        raise InvalidArgument(f"tags must be a list of strings, not {type(tags).__name__}")
    out: list[str] = []
    for tag in tags:
        if not isinstance(tag, str) or not tag.strip() or len(tag) > MAX_TAG:
            raise InvalidArgument(f"invalid tag {tag!r}: a non-empty str of at most {MAX_TAG}")
        tag = tag.strip()
        if not tag.isascii():
            check_unicode("a tag", tag)
        if tag not in out:
            out.append(tag)
    if len(out) > MAX_TAGS:
        raise InvalidArgument(f"{len(out)} tags; the limit is {MAX_TAGS}")
    return sorted(out) if isinstance(tags, _SETS) else out


_TAG_COLLECTIONS: Final = (list, tuple, set, frozenset)  # tuples: no union built per call
_SETS: Final = (set, frozenset)


def _check_optional_str(name: str, value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > MAX_TEXT:
        raise InvalidArgument(f"{name} must be a str of at most {MAX_TEXT} characters or None")
    if not value.isascii():
        check_unicode(name, value)
    return value if type(value) is str else str.__str__(value)


def prepare_fields(fields: dict[str, Any], *, measure: bool = True) -> dict[str, Any]:
    """Validate writable fields and bring them into their stored (JSON) form.

    Everything that could make the write fail later is checked here, before anything is
    written (a batch prepares all its items first): types, limits, text that UTF-8 cannot
    encode, and (with ``measure``) the size of the entry the fields make: at most
    ``MAX_ENTRY``. (A received entry was measured as it is: no ``measure``.)"""
    out: dict[str, Any] = {}
    if len(fields) <= 2 and fields.keys() <= _CONTENT_AND_TAGS:
        # the common capture: content and a (usually short) list of tags
        if "content" in fields:
            out["content"] = check_content(fields["content"])
        if "tags" in fields:
            tags = fields["tags"]
            out["tags"] = [] if tags == [] else check_tags(tags)
        if measure and len(out.get("content", "")) > _CONTENT_FITS:
            _measure(out)
        return out
    _prepare_rest(fields, out)
    if measure and len(out.get("content", "")) > _CONTENT_FITS:
        _measure(out)
    return out


_CONTENT_AND_TAGS: Final = frozenset({"content", "tags"})


def prepare_content(content: object) -> dict[str, Any]:
    """``prepare_fields({"content": content})``: a capture of bare content (what a batch
    mostly holds), without building the fields twice."""
    out = {"content": check_content(content)}
    if len(out["content"]) > _CONTENT_FITS:
        _measure(out)
    return out


def _measure(out: dict[str, Any]) -> None:
    """Refuse fields whose entry would exceed ``MAX_ENTRY`` (framed as the longest op,
    with a base): every node would ignore it."""
    size = len(encode_write("capture", "0" * 19, out))
    if size > MAX_ENTRY:
        raise InvalidArgument(
            f"the write would be {size} characters of JSON (content escapes to more than it"
            f" holds); the limit is {MAX_ENTRY}"
        )


def _prepare_rest(fields: dict[str, Any], out: dict[str, Any]) -> None:
    """``prepare_fields`` beyond content and tags, field by field, into ``out``."""
    for name, value in fields.items():
        if name == "content":
            out[name] = check_content(value)
        elif name == "tags":
            out[name] = check_tags(value)
        elif name == "metadata":
            if value is None:
                value = {}
            if not isinstance(value, dict):
                raise InvalidArgument("metadata must be a dict")
            try:
                encoded = json.dumps(value, ensure_ascii=False, allow_nan=False)
            except (TypeError, ValueError, RecursionError) as exc:
                raise InvalidArgument(f"metadata is not JSON-serialisable: {exc}") from exc
            if len(encoded) > MAX_METADATA:
                raise InvalidArgument(
                    f"metadata is {len(encoded)} characters of JSON; the limit is {MAX_METADATA}"
                )
            if not encoded.isascii():  # every key and value, at any depth
                check_unicode("metadata", encoded)
            out[name] = json.loads(encoded)  # a private copy, JSON-shaped
        elif name == "expires_at":
            if isinstance(value, datetime):
                if value.tzinfo is None:
                    raise InvalidArgument("expires_at must be timezone-aware")
                out[name] = _rfc3339(value.isoformat())
            elif value is None:
                out[name] = None
            elif isinstance(value, str):
                if not _RFC3339.match(value):
                    raise InvalidArgument(
                        f"expires_at {value!r} is not an RFC 3339 time with an offset "
                        "(YYYY-MM-DDTHH:MM:SS[.ffffff](Z|+HH:MM))"
                    )
                try:
                    parsed = datetime.fromisoformat(value)
                except ValueError as exc:
                    raise InvalidArgument(f"expires_at {value!r} is not a valid time") from exc
                out[name] = parsed.isoformat()
            else:
                raise InvalidArgument("expires_at must be a datetime, an RFC 3339 string or None")
        elif name in ("domain", "status", "source"):
            out[name] = _check_optional_str(name, value)
        else:
            raise InvalidArgument(f"unknown field {name!r}; writable fields: {', '.join(FIELDS)}")


_RFC3339: Final = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]{1,6})?"
    r"(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])\Z"
)
"""``expires_at`` as every reader (JavaScript's ``Date`` too) parses it alike: RFC 3339,
an offset of whole minutes. (``datetime.fromisoformat`` alone also takes week dates,
the basic format, offsets such as ``+05:99`` or with seconds.)"""


def _rfc3339(text: str) -> str:
    if not _RFC3339.match(text):
        raise InvalidArgument(f"expires_at {text!r}: its offset must be whole minutes")
    return text


def _collapsed_ascii(s: str) -> bool:
    """An ASCII string with single spaces as its only whitespace, none at either end.
    (``in`` is a memchr per character: ~0.3 us in all, against ~1 us for isprintable().)"""
    return (
        "  " not in s
        and s[:1] != " "
        and s[-1:] != " "
        # ASCII whitespace as str.split() sees it, besides the space
        and "\n" not in s
        and "\t" not in s
        and "\r" not in s
        and "\x0b" not in s
        and "\x0c" not in s
        and "\x1c" not in s
        and "\x1d" not in s
        and "\x1e" not in s
        and "\x1f" not in s
    )


def normalise(content: str) -> str:
    """The form used for dedupe: whitespace collapsed, case folded."""
    if content.isascii() and _collapsed_ascii(content):
        # casefold() is lower() on ASCII: this skips splitting the text into words (the
        # slow part, ~2.5 us for 300 bytes) when that would change nothing.
        return content.lower()
    return " ".join(content.split()).casefold()


def first_memory_id(namespace: str, norm: str) -> str:
    """The first id of ``memory_id_chain`` (what almost every capture uses)."""
    return hashlib.sha256(f"{namespace}\x00{norm}".encode()).hexdigest()[:20]


def memory_id_chain(namespace: str, norm: str, first: str | None = None) -> Any:
    """Yield candidate ids for a normalised content: a deterministic chain of hashes, so
    every node picks the same id for the same content without talking to the others.
    ``first`` is ``first_memory_id`` if the caller has it already."""
    # SHA-256 because every JavaScript runtime has it (WebCrypto, node:crypto).
    h = first or first_memory_id(namespace, norm)
    while True:
        yield h
        h = hashlib.sha256(f"{h}\x00{norm}".encode()).hexdigest()[:20]


def write_key(memory_id: str, at: str, by: str, node: str) -> str:
    return f"{memory_id}/{at}/{by}/{node}"


class Write(NamedTuple):
    """One write to a memory, as stored: the unit of history and of conflict resolution.
    (A named tuple: writes are made at every capture, and tuples are cheap to build.)"""

    key: str
    memory_id: str
    at: str
    """The write's hybrid-logical-clock stamp."""
    session: str
    node: str
    op: str
    """``capture``, ``update`` or ``delete``."""
    base: str
    """The latest stamp of this memory that the writer had seen ("" for none)."""
    changes: dict[str, Any]
    seen: dict[str, str] | None = None
    """Of an update or delete: per node, the newest stamp of this memory's updates and
    deletes from that node that the writer had folded (None: not recorded; ``base``
    stands in)."""

    def saw(self, other: Write) -> bool:
        """Whether this write's writer had folded ``other`` when it wrote (a node's own
        earlier writes always: it makes them one after another)."""
        if other.node == self.node and other.at <= self.at:
            return True
        if self.seen is not None:
            return self.seen.get(other.node, "") >= other.at
        return self.base >= other.at

    @property
    def order(self) -> tuple[str, str, str]:
        """Later-by-clock wins; ties break by session id, then node id."""
        return (self.at, self.session, self.node)

    def public(self) -> Write:
        """A copy to hand out: a caller changing its ``changes`` (a tags list, nested
        metadata) must not change what the node derives from the write."""
        seen = None if self.seen is None else dict(self.seen)
        return self._replace(changes=copy_json(self.changes), seen=seen)


def copy_json(value: Any) -> Any:
    """A copy of JSON-shaped data (dicts and lists copied at every depth)."""
    t = type(value)
    if t is dict:
        return {k: copy_json(v) for k, v in value.items()}
    if t is list:
        return [copy_json(v) for v in value]
    return value


def encode_write(
    op: str, base: str, changes: dict[str, Any], seen: dict[str, str] | None = None
) -> str:
    # Same bytes as json.dumps({"v":..,"op":..,"set":..,"base":..}) with compact
    # separators, built by hand for the common field types: this runs on every write.
    if not base and op == "capture":
        # a first capture of bare content (Session.capture sends tags=[] along)
        content = changes.get("content")
        if type(content) is str and next(iter(changes)) == "content":
            if len(changes) == 1:
                return _CAPTURE_HEAD + _encode_str(content) + "}}"
            if len(changes) == 2 and changes.get("tags") == []:
                return _CAPTURE_HEAD + _encode_str(content) + ',"tags":[]}}'
    parts = []
    for name, value in changes.items():
        if isinstance(value, str):
            enc = _encode_str(value)
        elif value is None:
            enc = "null"
        elif isinstance(value, list) and all(isinstance(x, str) for x in value):
            enc = "[" + ",".join(map(_encode_str, value)) + "]"
        else:
            enc = _ENCODER.encode(value)
        parts.append(f'"{name}":{enc}')
    tail = f',"base":"{base}"' if base else ""
    # An empty map says something too (no update seen: concurrent with every one), where
    # no map falls back to base. Node ids and stamps: nothing to escape.
    if seen is not None:
        tail += ',"seen":{' + ",".join(f'"{n}":"{t}"' for n, t in sorted(seen.items())) + "}"
    return f'{{"v":{SCHEMA_VERSION},"op":"{op}","set":{{{",".join(parts)}}}{tail}}}'


_CAPTURE_HEAD = f'{{"v":{SCHEMA_VERSION},"op":"capture","set":{{"content":'
_TAGS_TAIL = ',"tags":[]}}'
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
# (json.decoder's string scanner, C where available; not in typeshed)
_scan_string: Callable[[str, int, bool], tuple[str, int]] = json.decoder.scanstring  # type: ignore[attr-defined]
_encode_str: Callable[[str], str] = (
    getattr(json.encoder, "c_encode_basestring", None) or json.encoder.py_encode_basestring
)


def decode_write(key: object, value: object) -> Write | None:
    """Parse one stored entry; ``None`` if it is not a valid write (it is then ignored by
    every node alike, so a hostile or buggy writer cannot make nodes disagree)."""
    if not isinstance(key, str) or not isinstance(value, str):
        return None
    km = _KEY.match(key)
    if km is None:
        return None
    if len(value) > MAX_ENTRY:
        return None
    mid, at, by, node = km.groups()
    changes = _plain_capture(value)
    if changes is not None:
        return Write(key, mid, at, by, node, "capture", "", changes)
    return _decode_json(key, mid, at, by, node, value)


def _plain_capture(value: str) -> dict[str, Any] | None:
    """The fields of a first capture of bare content in the exact form encode_write makes
    (most entries), without building the whole object; ``None`` for anything else.

    Safe on any input: the part between the fixed head and tail must parse as exactly one
    JSON string, so the whole value is then exactly that canonical object."""
    if not value.startswith(_CAPTURE_HEAD):
        return None
    if value.endswith(_TAGS_TAIL):
        end, tags = len(value) - len(_TAGS_TAIL), True
    elif value.endswith("}}"):
        end, tags = len(value) - 2, False
    else:
        return None
    start = len(_CAPTURE_HEAD)
    if value[start : start + 1] != '"':
        return None
    try:
        # The string's own scanner (json.loads' wrapper, two regex passes and a slice
        # copy cost as much again); it must end exactly where the tail begins.
        content, stop = _scan_string(value, start + 1, True)
    except ValueError:
        return None
    if stop != end:
        return None
    try:
        check_content(content)
    except InvalidArgument:
        return None  # invalid: the general path rejects it the same way
    return {"content": content, "tags": []} if tags else {"content": content}


def _utf8(obj: Any) -> bool:
    try:
        json.dumps(obj, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return False
    return True


def _decode_json(key: str, mid: str, at: str, by: str, node: str, value: str) -> Write | None:
    try:
        obj = json.loads(value)
    except (ValueError, RecursionError):  # deep nesting raises RecursionError
        return None
    if not isinstance(obj, dict) or type(obj.get("v")) is not int or obj["v"] != SCHEMA_VERSION:
        return None  # another schema version's entry (or none): not for this reader
    if "\\u" in value and not _utf8(obj):
        return None  # a lone surrogate, even in a field this reader does not use
    op = obj.get("op")
    changes = obj.get("set", {})
    base = obj.get("base", "")
    if op not in OPS or not isinstance(changes, dict) or not isinstance(base, str):
        return None
    if base and not valid_stamp(base):
        return None
    try:
        changes = prepare_fields(changes, measure=False) if changes else {}
    except (InvalidArgument, RecursionError):
        return None
    if op == "capture" and "content" not in changes:
        return None
    seen = obj.get("seen")
    if "seen" in obj and not _valid_seen(seen):
        return None
    return Write(key, mid, at, by, node, op, base, changes, seen)


MAX_SEEN: Final = 4096
"""Nodes one write's ``seen`` may name."""


def _valid_seen(seen: Any) -> bool:
    return (
        isinstance(seen, dict)
        and len(seen) <= MAX_SEEN
        and all(isinstance(n, str) and _NODE.match(n) and valid_stamp(t) for n, t in seen.items())
    )
