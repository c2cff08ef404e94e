// A JavaScript Yjs client that follows docs/schema.md: it reads memories from a
// subcog-crdt document, captures new ones and updates existing ones, using nothing but
// yjs and node:crypto.
//
//   node interop.mjs read   <update file>                               -> JSON {id: memory}
//   node interop.mjs write  <update file> <out> <ns> <content> [fields] -> JSON {id}
//   node interop.mjs update <update file> <out> <id> <fields>           -> JSON {id}
//
// write and update write the update they made (from the given state) to <out>.
//
// [fields] / <fields>: a JSON object of further `set` fields (metadata, domain, status,
// source, expires_at). Read memories carry every field of docs/schema.md; created_at_ms
// and updated_at_ms are the wall-clock milliseconds of the stamps, expires_at is read as a
// date (ISO 8601 in UTC) or null.
import { createRequire } from 'node:module'
import { createHash } from 'node:crypto'
import { readFileSync, writeFileSync } from 'node:fs'

const require = createRequire(new URL('../../benchmarks/node/package.json', import.meta.url))
const Y = require('yjs')

const SESSION = 'js-session'
const NODE = '0a0b0c0d'
const normalise = (s) => s.split(/\s+/).filter(Boolean).join(' ').toLowerCase()
const sha20 = (s) => createHash('sha256').update(s, 'utf8').digest('hex').slice(0, 20)

function readWrites (entries) {
  const byId = new Map()
  for (const [key, value] of entries) {
    const parts = key.split('/')
    if (parts.length !== 4) continue
    let w
    try { w = JSON.parse(value) } catch { continue }
    const [id, stamp, session, node] = parts
    if (!byId.has(id)) byId.set(id, [])
    byId.get(id).push({ id, stamp, session, node, ...w })
  }
  return byId
}

const stampMs = (stamp) => Number(stamp.slice(0, 13))

function fold (writes) {
  writes.sort((a, b) => (a.stamp < b.stamp ? -1 : a.stamp > b.stamp ? 1
    : a.session < b.session ? -1 : a.session > b.session ? 1
      : a.node < b.node ? -1 : a.node > b.node ? 1 : 0))
  let m = null
  for (const w of writes) {
    if (w.op === 'capture') {
      if (m === null) {
        m = { ...w.set, deleted: false, captured_by: [], source_session: w.session,
          created_at_ms: stampMs(w.stamp) }
      } else if (m.deleted) {
        // a revive: the fields in `set` replace, the others keep their values
        m = { ...m, ...w.set, deleted: false }
      } else if (w.set.tags) {
        const have = m.tags || []
        m.tags = [...have, ...w.set.tags.filter((t) => !have.includes(t))].slice(0, 256)
      }
      if (!m.captured_by.includes(w.session)) m.captured_by.push(w.session)
    } else if (w.op === 'update' && m !== null) {
      Object.assign(m, w.set)
    } else if (w.op === 'delete' && m !== null) {
      m.deleted = true
    }
  }
  if (m === null) return null
  const last = writes[writes.length - 1]
  m.version = writes.length
  m.updated_by = last.session
  m.updated_at_ms = stampMs(last.stamp)
  m.stamp = last.stamp
  m.tags = m.tags || []
  m.metadata = m.metadata || {}
  for (const f of ['domain', 'status', 'source']) m[f] = m[f] ?? null
  m.expires_at = m.expires_at ? new Date(m.expires_at).toISOString() : null
  return m
}

// A stamp later than every stamp in the document (a hybrid logical clock's next value):
// 13 digits of ms + 6 hex of a counter, so the write sorts after all it has seen.
function nextStamp (entries) {
  let newest = ''
  for (const key of entries.keys()) {
    const stamp = key.split('/')[1]
    if (stamp && stamp > newest) newest = stamp
  }
  const now = Date.now()
  if (!newest || now > stampMs(newest)) return String(now).padStart(13, '0') + '000000'
  const counter = parseInt(newest.slice(13), 16) + 1
  return newest.slice(0, 13) + counter.toString(16).padStart(6, '0')
}

const [cmd, file, ...rest] = process.argv.slice(2)
const doc = new Y.Doc()
Y.applyUpdate(doc, readFileSync(file))
const entries = doc.getMap('entries')

function writeEntry (id, write, out) {
  const before = Y.encodeStateVector(doc)
  entries.set(`${id}/${nextStamp(entries)}/${SESSION}/${NODE}`, JSON.stringify(write))
  writeFileSync(out, Y.encodeStateAsUpdate(doc, before))
}

if (cmd === 'read') {
  const result = {}
  for (const [id, writes] of readWrites(entries)) result[id] = fold(writes)
  process.stdout.write(JSON.stringify(result))
} else if (cmd === 'write') {
  const [out, ns, content, fields] = rest
  const norm = normalise(content)
  const live = readWrites(entries)
  // walk the id chain: a live memory with this content, else the first free id
  let id = sha20(`${ns}\0${norm}`)
  for (;;) {
    const writes = live.get(id)
    if (!writes) break
    const m = fold(writes)
    if (!m || m.deleted || normalise(m.content) === norm) break
    id = sha20(`${id}\0${norm}`)
  }
  const set = { content, tags: ['from-js'], ...JSON.parse(fields || '{}') }
  writeEntry(id, { v: 1, op: 'capture', set }, out)
  process.stdout.write(JSON.stringify({ id }))
} else if (cmd === 'update') {
  const [out, id, fields] = rest
  const writes = readWrites(entries).get(id)
  if (!writes) throw new Error(`no memory ${id}`)
  const base = fold(writes).stamp // the newest write of it seen here
  writeEntry(id, { v: 1, op: 'update', set: JSON.parse(fields), base }, out)
  process.stdout.write(JSON.stringify({ id }))
} else {
  throw new Error(`unknown command ${cmd}`)
}
