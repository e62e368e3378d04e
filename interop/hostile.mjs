#!/usr/bin/env node
// A hostile libp2p peer of another implementation (js-libp2p: TCP, Noise, yamux).
//
// Dials one multiaddr and, on each protocol id given, opens N streams that each carry one
// malformed frame (random bytes, bad varint or 4-byte length headers, truncated frames,
// oversized headers, msgpack / protobuf of the wrong shape), then reports how each stream
// ended and whether the daemon still answers a ping. Nothing but the given address is dialed.
//
//   node interop/hostile.mjs --addr /ip4/127.0.0.1/tcp/4001/p2p/12D3... \
//        --frames 1000 --protocol /meshsub/1.1.0 --protocol /sogni/jobs/1.0.0 [--all]
//        [--seed 1] [--concurrency 32] [--wait-ms 1500]
//
// --all adds every protocol the daemon announced over identify. Prints one JSON object.

import './node20.mjs'
import { noise } from '@chainsafe/libp2p-noise'
import { yamux } from '@chainsafe/libp2p-yamux'
import { identify } from '@libp2p/identify'
import { ping } from '@libp2p/ping'
import { tcp } from '@libp2p/tcp'
import { multiaddr } from '@multiformats/multiaddr'
import { createLibp2p } from 'libp2p'
import { parseArgs } from 'node:util'

const { values: args } = parseArgs({
  options: {
    addr: { type: 'string' },
    protocol: { type: 'string', multiple: true, default: [] },
    all: { type: 'boolean', default: false },
    frames: { type: 'string', default: '100' },
    seed: { type: 'string', default: '1' },
    concurrency: { type: 'string', default: '32' },
    'wait-ms': { type: 'string', default: '1500' }
  }
})
if (!args.addr) {
  console.error('usage: hostile.mjs --addr MULTIADDR [--protocol ID]... [--all] [--frames N]')
  process.exit(2)
}
const frames = Number(args.frames)
const concurrency = Number(args.concurrency)
const waitMs = Number(args['wait-ms'])

// --- deterministic randomness (mulberry32) -----------------------------------------------
let state = Number(args.seed) >>> 0
function rand () {
  state = (state + 0x6d2b79f5) >>> 0
  let t = state
  t = Math.imul(t ^ (t >>> 15), t | 1)
  t ^= t + Math.imul(t ^ (t >>> 7), t | 61)
  return ((t ^ (t >>> 14)) >>> 0) / 4294967296
}
const randInt = (n) => Math.floor(rand() * n)
const randBytes = (n) => Uint8Array.from({ length: n }, () => randInt(256))
const concat = (...parts) => {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0))
  let at = 0
  for (const p of parts) { out.set(p, at); at += p.length }
  return out
}
const be32 = (n) => Uint8Array.of((n >>> 24) & 255, (n >>> 16) & 255, (n >>> 8) & 255, n & 255)
const uvarint = (n) => {
  const out = []
  while (n >= 0x80) { out.push((n & 0x7f) | 0x80); n = Math.floor(n / 128) }
  out.push(n)
  return Uint8Array.from(out)
}
const text = (s) => new TextEncoder().encode(s)
const msgpackStr = (s) => concat(Uint8Array.of(0xa0 | s.length), text(s))

// Each kind is one malformed frame; `close` says whether we half-close after it (a truncated
// frame then ends mid-body).
const KINDS = [
  ['random', () => randBytes(1 + randInt(256))],
  ['varint_random', () => { const b = randBytes(1 + randInt(200)); return concat(uvarint(b.length), b) }],
  ['varint_huge', () => Uint8Array.of(0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f)],
  ['varint_truncated', () => concat(uvarint(4096), randBytes(1 + randInt(64)))],
  ['frame_random', () => { const b = randBytes(1 + randInt(200)); return concat(be32(b.length), b) }],
  ['frame_oversized', () => be32(0xffffffff - randInt(1 << 20))],
  ['frame_truncated', () => concat(be32(1000 + randInt(60000)), randBytes(1 + randInt(64)))],
  ['frame_wrong_type', () => {
    // {"type": <a real message type at the wrong step>, "v": 2 (the wire version)}
    const kinds = ['result', 'welcome', 'offer', 'requestDone', 'progress', 'cancel', 'ready']
    const body = concat(Uint8Array.of(0x82), msgpackStr('type'), msgpackStr(kinds[randInt(kinds.length)]), msgpackStr('v'), Uint8Array.of(0x02))
    return concat(be32(body.length), body)
  }],
  ['protobuf_publish', () => {
    // pubsub RPC field 2 (publish) holding a Message of random bytes
    const inner = randBytes(1 + randInt(120))
    const rpc = concat(Uint8Array.of(0x12), uvarint(inner.length), inner)
    return concat(uvarint(rpc.length), rpc)
  }],
  ['protobuf_control', () => {
    // pubsub RPC field 3 (control) holding random bytes
    const inner = randBytes(1 + randInt(120))
    const rpc = concat(Uint8Array.of(0x1a), uvarint(inner.length), inner)
    return concat(uvarint(rpc.length), rpc)
  }],
  ['empty', () => new Uint8Array(0)]
]

const node = await createLibp2p({
  transports: [tcp()],
  connectionEncrypters: [noise()],
  streamMuxers: [yamux()],
  services: { identify: identify(), ping: ping() },
  connectionGater: { denyDialMultiaddr: () => false },
  connectionManager: { reconnectRetries: 0 }
})

const target = multiaddr(args.addr)
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))

let lastErrors = {}

async function oneStream (protocol, payload) {
  let stream
  for (let attempt = 0; stream === undefined; attempt++) {
    try {
      stream = await node.dialProtocol(target, protocol, { signal: AbortSignal.timeout(10000) })
    } catch (err) {
      const name = err?.name ?? 'Error'
      lastErrors[name] = (lastErrors[name] ?? 0) + 1
      // Our own side, not the daemon's answer: a connection the daemon already dropped
      // (it disconnects a peer whose bytes broke a libp2p protocol) that js-libp2p still
      // hands out, or js-libp2p's local cap on outbound streams per protocol. Retry, so the
      // frame really reaches the daemon.
      if (attempt < 20 && (name === 'ConnectionClosedError' || name === 'ConnectionClosingError' || name === 'TooManyOutboundProtocolStreamsError')) {
        if (name !== 'TooManyOutboundProtocolStreamsError') await node.hangUp(target).catch(() => {})
        await sleep(20)
        continue
      }
      // The daemon refused the protocol or reset the stream mid-negotiation: a refusal,
      // unless it can no longer be dialed at all.
      try {
        await node.hangUp(target).catch(() => {})
        await node.dial(target, { signal: AbortSignal.timeout(10000) })
        return 'refused'
      } catch {
        return 'dial_failed'
      }
    }
  }
  const ended = new Promise((resolve) => {
    stream.addEventListener('close', () => resolve(stream.status), { once: true })
  })
  const drain = (async () => { try { for await (const _ of stream) { /* discard */ } } catch {} })()
  try {
    if (payload.length > 0 && !stream.send(payload)) await stream.onDrain({ signal: AbortSignal.timeout(5000) })
    stream.close().catch(() => {}) // our FIN; a truncated frame now ends mid-body
  } catch {
    // the daemon reset the stream while we wrote: that is a refusal too
  }
  const outcome = await Promise.race([ended, sleep(waitMs).then(() => 'no_answer')])
  if (outcome === 'no_answer') stream.abort(new Error('hostile: done waiting'))
  await Promise.race([drain, sleep(100)])
  return outcome === 'aborted' ? 'reset' : outcome
}

async function barrage (protocol) {
  const counts = { streams: 0, frames: 0, bytes: 0, reset: 0, closed: 0, refused: 0, no_answer: 0, dial_failed: 0, kinds: {} }
  let next = 0
  async function worker () {
    while (next < frames) {
      next += 1
      const [kind, make] = KINDS[randInt(KINDS.length)]
      const payload = make()
      const outcome = await oneStream(protocol, payload)
      counts.streams += 1
      counts.frames += payload.length > 0 ? 1 : 0
      counts.bytes += payload.length
      counts[outcome] = (counts[outcome] ?? 0) + 1
      counts.kinds[kind] = (counts.kinds[kind] ?? 0) + 1
    }
  }
  lastErrors = {}
  await Promise.all(Array.from({ length: Math.max(1, concurrency) }, worker))
  counts.negotiationErrors = lastErrors
  return counts
}

const started = Date.now()
const report = { target: args.addr, seed: Number(args.seed), framesPerProtocol: frames, protocols: {}, implementation: 'js-libp2p' }
try {
  // The daemon's protocol list comes from identify's answer ('peer:identify'), not the peer
  // store: the store already holds '/ipfs/id/1.0.0' once identify's own stream is negotiated,
  // before the answer arrives. Listen before dialing so the event cannot be missed.
  const identified = new Promise((resolve) => {
    node.addEventListener('peer:identify', (evt) => resolve(evt.detail.protocols))
  })
  const connection = await node.dial(target, { signal: AbortSignal.timeout(10000) })
  const protocols = new Set(args.protocol)
  if (args.all) {
    const announced = await Promise.race([identified, sleep(10000).then(() => [])])
    for (const p of announced) protocols.add(p)
  }
  report.announced = [...protocols]
  for (const protocol of protocols) report.protocols[protocol] = await barrage(protocol)
  // The daemon may just have dropped our (misbehaving) connection: retry on a fresh one.
  report.answering = false
  for (let attempt = 0; attempt < 5 && !report.answering; attempt++) {
    try {
      report.pingAfterMs = await node.services.ping.ping(target, { signal: AbortSignal.timeout(10000) })
      report.answering = true
    } catch (err) {
      report.pingError = String(err?.message ?? err)
      await node.hangUp(target).catch(() => {})
      await sleep(200)
    }
  }
} finally {
  report.durationS = (Date.now() - started) / 1000
  await node.stop()
}
console.log(JSON.stringify(report))
