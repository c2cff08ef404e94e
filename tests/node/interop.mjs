// A JavaScript Yjs client that follows docs/schema.md: it reads memories from a
// subcog-crdt document and captures new ones, using nothing but yjs and node:crypto.
//
//   node interop.mjs read  <update file>                      -> JSON {id: memory}
//   node interop.mjs write <update file> <ns> <content> <out> -> writes its own update
import { createRequire } from 'node:module'
import { createHash } from 'node:crypto'
import { readFileSync, writeFileSync } from 'node:fs'

const require = createRequire(new URL('../../benchmarks/node/package.json', import.meta.url))
const Y = require('yjs')

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

function fold (writes) {
  writes.sort((a, b) => (a.stamp < b.stamp ? -1 : a.stamp > b.stamp ? 1
    : a.session < b.session ? -1 : a.session > b.session ? 1
      : a.node < b.node ? -1 : a.node > b.node ? 1 : 0))
  let m = null
  for (const w of writes) {
    if (w.op === 'capture') {
      if (m === null || m.deleted) {
        m = { ...(m || {}), ...w.set, deleted: false, captured_by: m ? m.captured_by : [] }
      } else if (w.set.tags) {
        m.tags = [...(m.tags || []), ...w.set.tags.filter((t) => !(m.tags || []).includes(t))]
      }
      if (!m.captured_by.includes(w.session)) m.captured_by.push(w.session)
    } else if (w.op === 'update' && m !== null) {
      Object.assign(m, w.set)
    } else if (w.op === 'delete' && m !== null) {
      m.deleted = true
    }
  }
  if (m) m.version = writes.length
  return m
}

const [cmd, file, ns, content, out] = process.argv.slice(2)
const doc = new Y.Doc()
Y.applyUpdate(doc, readFileSync(file))
const entries = doc.getMap('entries')

if (cmd === 'read') {
  const result = {}
  for (const [id, writes] of readWrites(entries)) result[id] = fold(writes)
  process.stdout.write(JSON.stringify(result))
} else if (cmd === 'write') {
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
  const before = Y.encodeStateVector(doc)
  const stamp = String(Date.now()).padStart(13, '0') + '000000'
  entries.set(`${id}/${stamp}/js-session/0a0b0c0d`,
    JSON.stringify({ v: 1, op: 'capture', set: { content, tags: ['from-js'] } }))
  writeFileSync(out, Y.encodeStateAsUpdate(doc, before))
  process.stdout.write(JSON.stringify({ id }))
}
