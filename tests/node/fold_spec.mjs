// A JavaScript Yjs reader (and writer) written from docs/schema.md alone: it derives every
// memory of a namespace document by following the document's text literally, so that
// tests/test_schema_differential.py can compare it with the Python node field by field.
//
//   node fold_spec.mjs [FILE|-]        read one Yjs update (the namespace document) from FILE
//                                      or stdin, print {memory id: memory} as JSON
//   node fold_spec.mjs --lines         one base64 update per stdin line; one JSON line out
//                                      per line in (many documents per Node process)
//   node fold_spec.mjs write STATE OUT SPEC
//                                      apply STATE, make the writes SPEC (JSON) lists as a
//                                      JavaScript client would, write the update to OUT,
//                                      print what was written
//
// Every choice the document left open when this was written is marked "OPEN:" below (docs/schema.md, "How the limits are read", now states each).

import { createRequire } from 'node:module'
import { createHash } from 'node:crypto'
import { readFileSync, writeFileSync } from 'node:fs'
import { createInterface } from 'node:readline'

// yjs is installed (pinned) under benchmarks/node, as for tests/test_yjs_interop.py
const require = createRequire(new URL('../../benchmarks/node/package.json', import.meta.url))
const Y = require('yjs')

// ---- keys: <memory id>/<stamp>/<session id>/<node id> -------------------------------------
const KEY = /^([0-9a-f]{20})\/([0-9]{13}[0-9a-f]{6})\/([A-Za-z0-9][A-Za-z0-9_.:@+-]{0,127})\/([0-9a-f]{1,32})$/
const STAMP = /^[0-9]{13}[0-9a-f]{6}$/
const FIELDS = ['content', 'tags', 'metadata', 'domain', 'status', 'source', 'expires_at']
const OPS = new Set(['capture', 'update', 'delete'])
// "RFC 3339 with an offset": YYYY-MM-DDTHH:MM:SS[.ffffff](Z|+HH:MM), a real date and
// time, an offset of at most 23:59.
const ISO_WITH_OFFSET = /^(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(?:\.\d{1,6})?(?:Z|[+-](\d{2}):(\d{2}))$/

function isoWithOffset (v) {
  const m = ISO_WITH_OFFSET.exec(v)
  if (!m) return false
  const [y, mo, d, h, mi, sec, oh, om] = m.slice(1).map((x) => (x === undefined ? 0 : Number(x)))
  const leap = y % 4 === 0 && (y % 100 !== 0 || y % 400 === 0)
  const days = [31, leap ? 29 : 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31][mo - 1]
  return y >= 1 && mo >= 1 && mo <= 12 && d >= 1 && d <= days && h <= 23 && mi <= 59 &&
    sec <= 59 && oh <= 23 && om <= 59
}

// Whitespace: OPEN -- the document does not say which characters "whitespace" (content
// "not only whitespace") and "trimmed" (tags) mean. JavaScript's \s and trim() differ from
// Python's str.isspace()/strip(): Python has U+001C-U+001F and U+0085, JavaScript has
// U+FEFF. The node uses Python's set, so it is spelt out here.
const WS = '\\t\\n\\v\\f\\r\\x1c-\\x20\\x85\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000'
const ONLY_WS = new RegExp(`^[${WS}]*$`)
const TRIM = new RegExp(`^[${WS}]+|[${WS}]+$`, 'g')
const pyStrip = (s) => s.replace(TRIM, '')

// "characters": OPEN whether code points or UTF-16 units; Python strings count code points
const chars = (s) => { let n = 0; for (const _ of s) n++; return n }
const LONE_SURROGATE = /[\ud800-\udbff](?![\udc00-\udfff])|(?<![\ud800-\udbff])[\udc00-\udfff]/

function validUnicode (v) {
  if (typeof v === 'string') return !LONE_SURROGATE.test(v)
  if (Array.isArray(v)) return v.every(validUnicode)
  if (v !== null && typeof v === 'object') {
    return Object.entries(v).every(([k, x]) => validUnicode(k) && validUnicode(x))
  }
  return true
}

const isObject = (v) => v !== null && typeof v === 'object' && !Array.isArray(v)
const optStr = (v) => v === null || (typeof v === 'string' && chars(v) <= 1024)

// The size of metadata: OPEN -- "a JSON object of at most 65,536 characters" does not say
// serialised how. The node counts Python's json.dumps(metadata, ensure_ascii=False): ", "
// and ": " separators, code points. (Floats cannot be counted exactly from JavaScript:
// Python writes 1.0 where JSON.parse gave 1.)
function pyJsonLength (v) {
  if (Array.isArray(v)) return 2 + v.reduce((n, x, i) => n + pyJsonLength(x) + (i ? 2 : 0), 0)
  if (isObject(v)) {
    return 2 + Object.entries(v).reduce(
      (n, [k, x], i) => n + chars(JSON.stringify(k)) + 2 + pyJsonLength(x) + (i ? 2 : 0), 0)
  }
  return chars(JSON.stringify(v))
}

// Non-finite numbers: OPEN -- JSON.parse reads 1e400 as Infinity; the node ignores such an
// entry (Python refuses infinities), so this reader does too.
function finite (v) {
  if (typeof v === 'number') return Number.isFinite(v)
  if (Array.isArray(v)) return v.every(finite)
  if (isObject(v)) return Object.values(v).every(finite)
  return true
}

// Limits: "What a node writes, and what it accepts from others". OPEN: whether a bad field
// drops the whole entry or only the field: the node drops the entry, as this does.
function checkSet (op, set) {
  if (!isObject(set)) return false
  if (op === 'capture' && !('content' in set)) return false
  for (const [name, v] of Object.entries(set)) {
    switch (name) {
      case 'content':
        if (typeof v !== 'string') return false
        if (chars(v) < 1 || chars(v) > 262144) return false
        if (ONLY_WS.test(v) || v.includes('\0')) return false
        break
      case 'tags':
        if (!Array.isArray(v) || v.length > 64) return false
        if (!v.every((t) => typeof t === 'string' && chars(t) >= 1 && chars(t) <= 128)) return false
        // OPEN: a tag that is only whitespace (empty once trimmed): the node ignores the entry
        if (v.some((t) => pyStrip(t) === '')) return false
        break
      case 'metadata':
        // OPEN: null (not an object) is accepted by the node, as {}
        if (v !== null && (!isObject(v) || pyJsonLength(v) > 65536)) return false
        break
      case 'domain': case 'status': case 'source':
        if (!optStr(v)) return false
        break
      case 'expires_at':
        if (v !== null && !(typeof v === 'string' && isoWithOffset(v))) return false
        break
      default:
        return false // OPEN: a field `set` does not list: the node ignores the entry
    }
  }
  return true
}

// "then trimmed; duplicates dropped" (first occurrence kept)
function cleanTags (tags) {
  const out = []
  for (const t of tags) {
    const s = pyStrip(t)
    if (!out.includes(s)) out.push(s)
  }
  return out
}

// One entry -> a write, or null if every node ignores it.
export function parseEntry (key, value) {
  const k = KEY.exec(key)
  if (!k) return null
  if (typeof value !== 'string') return null // "a JSON string (a Yjs string, not a nested map)"
  if (chars(value) > 1114112) return null // OPEN: "characters" = code points, as the node counts
  let w
  try { w = JSON.parse(value) } catch { return null }
  if (!isObject(w) || w.v !== 1 || !OPS.has(w.op)) return null
  // "every string ... none is accepted anywhere" (so: top-level fields this does not read too)
  if (!validUnicode(w) || !finite(w)) return null
  const set = w.set === undefined && w.op !== 'capture' ? {} : w.set // OPEN: is `set` optional?
  if (!checkSet(w.op, set)) return null
  if (w.base !== undefined && !(typeof w.base === 'string' && STAMP.test(w.base))) return null // OPEN
  return { id: k[1], stamp: k[2], session: k[3], node: k[4], op: w.op, set, base: w.base ?? null }
}

const cmp = (a, b) => (a < b ? -1 : a > b ? 1 : 0)
// "Sort a memory's writes by (stamp, session id, node id)"
const order = (a, b) => cmp(a.stamp, b.stamp) || cmp(a.session, b.session) || cmp(a.node, b.node)

function applyFields (m, set) {
  for (const name of FIELDS) {
    if (!(name in set)) continue
    const v = set[name]
    m[name] = name === 'tags' ? cleanTags(v) : name === 'metadata' ? structuredClone(v ?? {}) : v
  }
}

// "Deriving a memory": fold the sorted writes.
export function fold (writes) {
  writes = [...writes].sort(order)
  let m = null
  let early = 0
  for (const w of writes) {
    const ms = Number(w.stamp.slice(0, 13)) // OPEN: *_at are the stamp's wall-clock ms
    if (m === null) {
      // OPEN: an update or delete ordered before the memory's first capture changes
      // nothing, but "version is the number of writes" counts it (as the node does)
      if (w.op !== 'capture') { early += 1; continue }
      m = {
        id: w.id, content: null, tags: [], metadata: {}, domain: null, status: null,
        source: null, expires_at: null, source_session: w.session, captured_by: [w.session],
        created_at_ms: ms, deleted: false, version: early,
      }
      applyFields(m, w.set)
    } else if (w.op === 'capture' && m.deleted) {
      // revive: set replaces, the rest kept; source_session, created_at, captured_by "go on"
      applyFields(m, w.set)
      m.deleted = false
      if (!m.captured_by.includes(w.session)) m.captured_by.push(w.session)
    } else if (w.op === 'capture') {
      if (!m.captured_by.includes(w.session)) m.captured_by.push(w.session)
      for (const t of cleanTags(w.set.tags ?? [])) {
        if (m.tags.length >= 256) break
        if (!m.tags.includes(t)) m.tags.push(t)
      }
    } else if (w.op === 'update') {
      applyFields(m, w.set) // OPEN: an update of a deleted memory leaves it deleted
    } else {
      m.deleted = true
    }
    m.version += 1
    m.updated_at_ms = ms
    m.updated_by = w.session
    m.stamp = w.stamp
  }
  return m
}

export function readEntries (doc) {
  const byId = new Map()
  for (const [key, value] of doc.getMap('entries')) {
    const w = parseEntry(key, value)
    if (w === null) continue
    if (!byId.has(w.id)) byId.set(w.id, [])
    byId.get(w.id).push(w)
  }
  return byId
}

export function readMemories (doc) {
  const out = {}
  for (const [id, writes] of readEntries(doc)) {
    const m = fold(writes)
    if (m !== null) out[id] = m
  }
  return out
}

function docOf (update) {
  const doc = new Y.Doc()
  Y.applyUpdate(doc, update)
  return doc
}

// ---- writing: "Memory ids" and the JS example -------------------------------------------
const normalise = (s) => s.split(/\s+/).filter(Boolean).join(' ').toLowerCase()
const sha20 = (s) => createHash('sha256').update(s, 'utf8').digest('hex').slice(0, 20)

export function captureId (namespace, content, memories) {
  const norm = normalise(content)
  const chain = []
  let id = sha20(namespace + '\0' + norm)
  while (memories[id] !== undefined) {
    const m = memories[id]
    if (!m.deleted && normalise(m.content) === norm) return id // same content on the way
    chain.push(id)
    id = sha20(id + '\0' + norm)
  }
  // OPEN: "a live memory whose content an update set to this content" -- we take every
  // live memory with this content (its id is on another chain), the smallest id
  const moved = Object.values(memories)
    .filter((m) => !m.deleted && normalise(m.content) === norm).map((m) => m.id).sort()
  if (moved.length) return moved[0]
  const dead = chain.find((c) => memories[c].deleted)
  return dead ?? id
}

function makeStamper (nowMs) {
  // the document's nextStamp(base), with Date.now() replaceable to model a clock behind
  let last = ''
  const fmt = (ms, c) => String(ms).padStart(13, '0') + c.toString(16).padStart(6, '0')
  return (base = '') => {
    const floor = base > last ? base : last
    const now = fmt(nowMs(), 0)
    if (now > floor) return (last = now)
    const ms = Number(floor.slice(0, 13)); const c = parseInt(floor.slice(13), 16) + 1
    return (last = c > 0xffffff ? fmt(ms + 1, 0) : fmt(ms, c))
  }
}

function write (statePath, outPath, spec) {
  const doc = docOf(readFileSync(statePath))
  const before = Y.encodeStateVector(doc)
  const entries = doc.getMap('entries')
  const skew = spec.clock_offset_ms ?? 0
  const nextStamp = makeStamper(() => Date.now() + skew)
  const node = spec.node ?? 'abcdef0123456789'
  const done = []
  for (const op of spec.writes) {
    const memories = readMemories(doc)
    const session = op.session ?? 'js-session'
    let id = op.id
    const set = { ...(op.set ?? {}) }
    if (op.op === 'capture') {
      id = captureId(spec.namespace, set.content, memories)
      if (!('tags' in set)) set.tags = []
    }
    const value = { v: 1, op: op.op }
    if (op.op !== 'delete') value.set = set
    if (memories[id]) value.base = memories[id].stamp // "the newest stamp ... the writer had seen"
    const stamp = nextStamp(value.base ?? '')
    const key = `${id}/${stamp}/${session}/${node}`
    entries.set(key, JSON.stringify(value))
    done.push({ id, key })
  }
  writeFileSync(outPath, Y.encodeStateAsUpdate(doc, before))
  return { writes: done, memories: readMemories(doc) }
}

// ---- main -----------------------------------------------------------------------------
const args = process.argv.slice(2)
if (args[0] === '--lines') {
  const rl = createInterface({ input: process.stdin, terminal: false })
  for await (const line of rl) {
    if (!line.trim()) continue
    process.stdout.write(JSON.stringify(readMemories(docOf(Buffer.from(line, 'base64')))) + '\n')
  }
} else if (args[0] === 'write') {
  const [statePath, outPath, spec] = args.slice(1)
  process.stdout.write(JSON.stringify(write(statePath, outPath, JSON.parse(spec))) + '\n')
} else {
  const src = args[0] === undefined || args[0] === '-' ? 0 : args[0]
  process.stdout.write(JSON.stringify(readMemories(docOf(readFileSync(src)))) + '\n')
}
