/**
 * Seeded fuzzing of the replication protocol against a real `mobility server`
 * process on loopback (plain ws, so the budget goes into the server's frame
 * handling, not TLS handshakes). Inputs are valid frames built with the frame
 * codec, then mutated: structured field values (wrong sequences, disks, pages,
 * huge counts, bad encodings, digests and masks), protobuf fields shuffled,
 * duplicated, dropped, retyped or renumbered, bit flips, truncation, bad length
 * prefixes and payload lengths, splices, garbage, text and oversized messages.
 *
 * - pre-Hello inputs (malformed Hellos, other frames first, text) each get a fresh
 *   connection and a unique agent id;
 * - post-Hello inputs run on "lanes" (one agent id each): a valid Hello, then
 *   mutated frames of every type on the same connection for as long as the server
 *   accepts them (a heartbeat after each frame tells accepted from refused).
 *
 * Asserted: every answer is a known code and none is MOB_ERR_INTERNAL; nothing
 * hangs; no session refused before its Welcome created anything in the data
 * directory; the server process survives and still serves; a real
 * `mobility replicate` running all along (initial, then incremental passes over
 * a churned image) ends each pass with a replica equal to its source.
 *
 * Replay a run with MOBILITY_FUZZ_SEED=<seed> (printed); MOBILITY_FUZZ_INPUTS sets
 * the number of malformed inputs (default 20000).
 */
import t from 'tap';
import crypto from 'node:crypto';
import fsp from 'node:fs/promises';
import path from 'node:path';
import WebSocket from 'ws';
import { spawnServer, stopServer } from '../../src/server/spawn.js';
import { encodeMessage, decodeMessage, Encoding, type CutDisk, type FrameBody, type Hello, type DiskInfo } from '../../src/protocol/frame-codec.js';
import { encodeBlock } from '../../src/protocol/block-codec.js';
import { digestBytes } from '../../src/protocol/digest.js';
import { churnImage, sha256File, writeSampleImage } from '../../src/util/sample-image.js';
import { isErrorCode } from '../../src/errors.js';
import { ID_PATTERN, PROTOCOL_VERSION } from '../../src/constants.js';
import { runCli, tmpDir, type CliRun } from '../helpers.js';
import { Rng, EDGE_INTS, mutateMessage, type ByteMutation } from '../fuzz-mutator.js';

const INPUTS = Number(process.env.MOBILITY_FUZZ_INPUTS ?? 20_000);
const SEED = Number(process.env.MOBILITY_FUZZ_SEED ?? crypto.randomInt(2 ** 31));
const WORKERS = 16;
const ANSWER_TIMEOUT_MS = 30_000;
const GOOD_SIZE = 16 * 1024 * 1024;

interface Stats {
  inputs: number; preHello: number; postHello: number; validFrames: number; accepted: number; sessions: number; welcomedPre: number;
  closedWithoutError: number; badCloses: string[]; laneBusy: number; codes: Map<string, number>; internal: string[]; unknown: string[]; hangs: string[]; late: string[];
}

type Answer = { kind: 'error'; code: string; message: string } | { kind: 'welcome'; disks: { lastDurableSeq: number }[] } | { kind: 'accepted' } | { kind: 'closed' } | { kind: 'timeout' };

/** One client connection with a single outstanding expectation at a time. */
class Conn {
  private waiter: ((a: Answer) => void) | null = null;
  private marker = 0;
  closed = false;
  closeInfo = '';
  readonly ready: Promise<void>;
  private readonly closedP: Promise<void>;
  /** Error frames that arrived with nobody waiting (e.g. a storage failure after the heartbeat). */
  stray: string[] = [];

  constructor(url: string, private readonly bad: (why: string) => void) {
    const ws = new WebSocket(url, { perMessageDeflate: false, maxPayload: 64 * 1024 * 1024 });
    this.ws = ws;
    ws.on('error', () => undefined);
    this.ready = new Promise((resolve, reject) => { ws.once('open', () => resolve()); ws.once('error', reject); });
    this.closedP = new Promise((resolve) => ws.once('close', (code: number, reason: Buffer) => {
      this.closed = true;
      this.closeInfo = `${code} ${reason.toString()}`;
      this.settle({ kind: 'closed' });
      resolve();
    }));
    ws.on('message', (d: Buffer, isBinary: boolean) => {
      if (!isBinary) { this.bad(`server sent a text message: ${d.toString().slice(0, 100)}`); return; }
      let f;
      try { f = decodeMessage(d, 64 * 1024 * 1024); } catch (err) { this.bad(`server sent an undecodable frame: ${(err as Error).message}`); return; }
      if (f.type === 'error') {
        if (this.waiter) this.settle({ kind: 'error', code: f.error.code, message: f.error.message });
        else this.stray.push(f.error.code);
      } else if (f.type === 'welcome') {
        this.settle({ kind: 'welcome', disks: f.welcome.disks });
      } else if (f.type === 'heartbeat' && f.heartbeat.reply && f.heartbeat.sentAtMs === this.marker) {
        this.settle({ kind: 'accepted' });
      }
    });
  }

  readonly ws: WebSocket;

  private settle(a: Answer): void {
    const w = this.waiter;
    this.waiter = null;
    w?.(a);
  }

  /** Sends messages, then waits for the first answer (or close, or the timeout). */
  async exchange(msgs: (Buffer | string)[], opts: { marker?: number } = {}): Promise<Answer> {
    if (this.closed) return { kind: 'closed' };
    this.marker = opts.marker ?? 0;
    const p = new Promise<Answer>((resolve) => {
      const timer = setTimeout(() => { if (this.waiter === done) { this.waiter = null; resolve({ kind: 'timeout' }); } }, ANSWER_TIMEOUT_MS);
      const done = (a: Answer) => { clearTimeout(timer); resolve(a); };
      this.waiter = done;
    });
    for (const m of msgs) this.ws.send(m, { binary: typeof m !== 'string' });
    return p;
  }

  async close(): Promise<void> {
    if (!this.closed) {
      this.ws.close();
      const t = setTimeout(() => this.ws.terminate(), 5000);
      await this.closedP;
      clearTimeout(t);
    }
  }
}

interface LaneDisk { id: string; size: number; bs: number; known: Map<number, Buffer> }
interface Lane { agent: string; gen: number; disks: LaneDisk[]; seq: number[] }

const blockLen = (d: LaneDisk, index: number) => Math.min(d.bs, d.size - index * d.bs);
const blocksOf = (d: LaneDisk) => Math.ceil(d.size / d.bs);

function content(rng: Rng, len: number): Buffer {
  const k = rng.int(4);
  if (k === 0) return Buffer.alloc(len);
  if (k === 1) return rng.bytes(len);
  const b = Buffer.alloc(len);
  const word = Buffer.from(rng.pick(['mobility ', 'replica ', 'page ', 'lorem ipsum ']));
  for (let o = 0; o < len; o += word.length) word.copy(b, o);
  if (k === 3) for (let n = 0; n < 8; n++) b[rng.int(len)] = rng.int(256);
  return b;
}

function encodeRun(rng: Rng, data: Buffer): { encoding: Encoding; payload: Buffer } {
  const e = encodeBlock(data, rng.chance(0.6));
  return { encoding: e.encoding, payload: e.payload };
}

/** A valid Data frame for a lane, and the block contents it writes. */
function dataFrame(rng: Rng, lane: Lane, di: number): { body: FrameBody; payload: Buffer; writes: Map<number, Buffer> } {
  const d = lane.disks[di];
  const n = rng.range(1, 3);
  const indexes = new Set<number>();
  while (indexes.size < n) indexes.add(rng.int(blocksOf(d)));
  const blocks = [];
  const payloads: Buffer[] = [];
  const writes = new Map<number, Buffer>();
  for (const index of indexes) {
    const len = blockLen(d, index);
    const cur = d.known.get(index);
    if (cur && rng.chance(0.4)) {
      // changed pages only, patched onto what the replica holds
      const pages = Math.ceil(len / 4096);
      const mask = Buffer.alloc(Math.ceil(pages / 8));
      const next = Buffer.from(cur);
      const parts: Buffer[] = [];
      for (let p = 0; p < pages; p++) {
        if (!rng.chance(0.3) && !(p === pages - 1 && mask.every((b) => b === 0))) continue;
        mask[p >> 3] |= 1 << (p & 7);
        const pl = Math.min(4096, len - p * 4096);
        const c = content(rng, pl);
        c.copy(next, p * 4096);
        parts.push(c);
      }
      const e = encodeRun(rng, Buffer.concat(parts));
      blocks.push({ index, encoding: e.encoding, length: e.payload.length, pageMask: mask, digest: digestBytes(next) });
      payloads.push(e.payload);
      writes.set(index, next);
    } else {
      const c = content(rng, len);
      const e = encodeRun(rng, c);
      blocks.push({ index, encoding: e.encoding, length: e.payload.length, pageMask: Buffer.alloc(0), digest: digestBytes(c) });
      payloads.push(e.payload);
      writes.set(index, c);
    }
  }
  return { body: { type: 'data', data: { disk: di, seq: lane.seq[di] + 1, blocks } }, payload: Buffer.concat(payloads), writes };
}

type FrameKind = 'data' | 'digestRequest' | 'heartbeat' | 'health' | 'passEnd' | 'cut' | 'readRequest' | 'serverOnly' | 'hello';

/** A valid frame of the given kind for the lane's session. */
function validFrame(rng: Rng, lane: Lane, kind: FrameKind, hello: Hello): { body: FrameBody; payload: Buffer; writes?: Map<number, Buffer>; disk?: number } {
  const di = rng.int(lane.disks.length);
  const d = lane.disks[di];
  const pages = Math.ceil(d.size / 4096);
  switch (kind) {
    case 'data': { const f = dataFrame(rng, lane, di); return { ...f, disk: di }; }
    case 'digestRequest': return { body: { type: 'digestRequest', digestRequest: { disk: di, requestId: rng.u32(), firstPage: rng.int(pages), pageCount: rng.range(1, 1024) } }, payload: Buffer.alloc(0) };
    case 'heartbeat': return { body: { type: 'heartbeat', heartbeat: { sentAtMs: Date.now(), reply: rng.chance(0.5) } }, payload: Buffer.alloc(0) };
    case 'health': return {
      body: { type: 'health', health: { disks: lane.disks.map((_x, i) => ({ disk: i, state: rng.pick(['initial-sync', 'continuous', 'resyncing']), reason: 'fuzz', backlogBytes: rng.u32(), dataLagMs: rng.int(1000), churnBytesPerSec: rng.u32(), freezeFailures: 0, lastFreezeMs: 0, progressPermille: rng.int(1001) })) } },
      payload: Buffer.alloc(0),
    };
    case 'passEnd': return { body: { type: 'passEnd', passEnd: { disk: di, seq: lane.seq[di] + 1, kind: rng.pick(['initial', 'incremental', 'resync']) } }, payload: Buffer.alloc(0), disk: di };
    case 'cut': {
      // with page samples of what the replica holds, as the agent sends them (evidence for the point)
      const disks = lane.disks.map((x, i) => {
        const samplePages: number[] = [];
        const digests: Buffer[] = [];
        for (let n = rng.range(1, 8); n > 0; n--) {
          const page = rng.int(Math.ceil(x.size / 4096));
          const blk = Math.floor((page * 4096) / x.bs);
          const c = x.known.get(blk);
          if (!c) continue;
          const off = page * 4096 - blk * x.bs;
          samplePages.push(page);
          digests.push(digestBytes(c.subarray(off, Math.min(off + 4096, c.length))));
        }
        return { disk: i, seq: lane.seq[i], samplePages, sampleDigests: Buffer.concat(digests) } as CutDisk;
      });
      return { body: { type: 'cut', cut: { cutId: rng.u32(), kind: rng.pick(['crash', 'app']), takenAtMs: Date.now(), frozenMs: rng.int(100), note: '', disks } }, payload: Buffer.alloc(0) };
    }
    case 'readRequest': return { body: { type: 'readRequest', readRequest: { disk: di, requestId: 1, firstPage: rng.int(pages), pageCount: rng.range(1, 256) } }, payload: Buffer.alloc(0) };
    case 'hello': return { body: { type: 'hello', hello }, payload: Buffer.alloc(0) };
    case 'serverOnly': {
      const k = rng.int(7);
      const body: FrameBody = k === 0 ? { type: 'ack', ack: { disk: di, seq: lane.seq[di], creditBytes: 1 << 20 } }
        : k === 1 ? { type: 'error', error: { code: 'MOB_ERR_INTERNAL', message: 'from the agent', retryable: true } }
          : k === 2 ? { type: 'welcome', welcome: { protocolVersion: 1, sessionId: 'x', disks: [], creditBytes: 1, maxFrameBytes: 1, heartbeatMs: 1 } }
            : k === 3 ? { type: 'digestReply', digestReply: { disk: di, requestId: 1, firstPage: 0, pageCount: 1 } }
              : k === 4 ? { type: 'cutAck', cutAck: { cutId: 1, pointId: 'p' } }
                : k === 5 ? { type: 'cutRequest', cutRequest: { kind: 'crash', reason: 'fuzz' } }
                  : { type: 'readReply', readReply: { disk: di, requestId: 1, firstPage: 0, pageCount: 1 } };
      return { body, payload: k === 3 ? Buffer.alloc(8) : k === 6 ? Buffer.alloc(4096) : Buffer.alloc(0) };
    }
  }
}

const WEIRD_IDS = ['', '.', '..', '../x', 'a/b', 'a b', 'x'.repeat(65), 'é', 'a\u0000b', '-', '_', 'ok~', 'CON', '.hidden', 'x'.repeat(64)];

/** A structured (field-value) mutation of a frame body: still well-formed protobuf, wrong content. */
function mutateBody(rng: Rng, body: FrameBody, lane: Lane | null): FrameBody {
  const b = structuredClone(body) as FrameBody & Record<string, Record<string, unknown>>;
  const edge = () => { const v = rng.pick(EDGE_INTS); return v > BigInt(Number.MAX_SAFE_INTEGER) ? Number.MAX_SAFE_INTEGER : Number(v); };
  switch (b.type) {
    case 'data': {
      const m = b.data;
      const k = rng.int(12);
      const blk = m.blocks.length ? m.blocks[rng.int(m.blocks.length)] : null;
      if (k === 0) m.seq = rng.pick([0, m.seq - 1, Math.max(0, m.seq - 1), m.seq + rng.range(1, 1000), Number.MAX_SAFE_INTEGER, edge()]);
      else if (k === 1) m.disk = rng.pick([lane ? lane.disks.length : 1, 63, 64, 0xffffffff, edge() % 2 ** 32]);
      else if (k === 2 && blk) blk.index = rng.pick([edge(), lane ? blocksOf(lane.disks[m.disk] ?? lane.disks[0]) : 16, 2 ** 40, Number.MAX_SAFE_INTEGER]);
      else if (k === 3 && blk) blk.length = rng.pick([0, blk.length + 1, Math.max(0, blk.length - 1), 0xffffffff, edge() % 2 ** 32]);
      else if (k === 4 && blk) blk.encoding = rng.pick([3, 7, 100, 0, 1, 2]) as Encoding;
      else if (k === 5 && blk) blk.digest = rng.pick([Buffer.alloc(0), Buffer.alloc(7), rng.bytes(9), rng.bytes(8), Buffer.alloc(8)]);
      else if (k === 6 && blk) blk.pageMask = rng.pick([Buffer.alloc(1), Buffer.alloc(2), Buffer.from([0xff, 0xff, 0xff]), rng.bytes(rng.range(1, 40)), Buffer.alloc(64, 0xff)]);
      else if (k === 7) m.blocks = [];
      else if (k === 8 && blk) m.blocks.push({ ...blk }); // the same block twice (payload accounting breaks)
      else if (k === 9) m.blocks = Array.from({ length: rng.range(100, 3000) }, (_x, i) => ({ index: i, encoding: Encoding.ZERO, length: 0, pageMask: Buffer.alloc(0), digest: Buffer.alloc(8) }));
      else if (blk) { blk.encoding = Encoding.ZERO; blk.length = 0; }
      return b;
    }
    case 'digestRequest': case 'readRequest': {
      const m = (b.type === 'digestRequest' ? b.digestRequest : b.readRequest) as { disk: number; requestId: number; firstPage: number; pageCount: number };
      const k = rng.int(4);
      if (k === 0) m.pageCount = rng.pick([0, 65536, 65537, 257, 0xffffffff, edge() % 2 ** 32]);
      else if (k === 1) m.firstPage = rng.pick([edge(), 2 ** 40, Number.MAX_SAFE_INTEGER, lane ? Math.ceil(lane.disks[0].size / 4096) : 1]);
      else if (k === 2) m.disk = rng.pick([1, 2, 64, 0xffffffff]);
      else { m.firstPage = Math.max(0, (lane ? Math.ceil((lane.disks[m.disk]?.size ?? 0) / 4096) : 0) - 1); m.pageCount = 65536; }
      return b;
    }
    case 'passEnd': {
      const k = rng.int(3);
      if (k === 0) b.passEnd.kind = rng.pick(['', 'verify', 'INITIAL', 'initial\u0000', 'x'.repeat(1000)]);
      else if (k === 1) b.passEnd.seq = rng.pick([0, b.passEnd.seq - 1, Number.MAX_SAFE_INTEGER]);
      else b.passEnd.disk = rng.pick([7, 0xffffffff]);
      return b;
    }
    case 'cut': {
      const k = rng.int(6);
      if (k === 4) b.cut.takenAtMs = rng.pick([Number.MAX_SAFE_INTEGER, 8.64e15 + 1, 2 ** 52, edge()]);
      else if (k === 5) { b.cut.frozenMs = 0xffffffff; b.cut.note = 'n'.repeat(rng.pick([0, 10_000, 200_000])); }
      else if (k === 0) b.cut.kind = rng.pick(['', 'weird', 'APP']);
      else if (k === 1) b.cut.disks = [...b.cut.disks, ...b.cut.disks];
      else if (k === 2) b.cut.disks = b.cut.disks.map((x) => ({ ...x, seq: x.seq + rng.range(1, 10) }));
      else b.cut.disks = [{ disk: rng.pick([5, 0xffffffff]), seq: 0 }];
      return b;
    }
    case 'health': {
      b.health.disks = rng.chance(0.5) ? b.health.disks.map((x) => ({ ...x, disk: rng.pick([9, 0xffffffff]) }))
        : Array.from({ length: rng.range(100, 2000) }, (_x, i) => ({ disk: i, state: 'x'.repeat(rng.int(50)), reason: '', backlogBytes: Number.MAX_SAFE_INTEGER, dataLagMs: 0, churnBytesPerSec: 0, freezeFailures: 0xffffffff, lastFreezeMs: 0, progressPermille: 0xffffffff }));
      return b;
    }
    case 'heartbeat': b.heartbeat.sentAtMs = Number.MAX_SAFE_INTEGER; return b;
    case 'hello': {
      const h = b.hello;
      const k = rng.int(13);
      const disk = h.disks.length ? h.disks[rng.int(h.disks.length)] : null;
      if (k === 0) h.protocolVersion = rng.pick([0, 2, 99, 0xffffffff]);
      else if (k === 1) h.agentId = rng.pick(WEIRD_IDS);
      else if (k === 2) h.token = rng.pick(['', 'x', h.token.slice(1), h.token + 'x', h.token.toUpperCase()]);
      else if (k === 3) h.disks = rng.chance(0.5) ? [] : Array.from({ length: 65 }, (_x, i) => ({ diskId: `m${i}`, sizeBytes: 1 << 20, blockSize: 65536, pageSize: 4096 }));
      else if (k === 4 && disk) h.disks.push({ ...disk });
      else if (k === 5 && disk) disk.pageSize = rng.pick([0, 256, 511, 3000, 8192, 65536, 131072, 0xffffffff]);
      else if (k === 6 && disk) disk.blockSize = rng.pick([0, 2048, 4095, 65536 + 4096, 1 << 21, 0xffffffff, 12288]);
      else if (k === 7 && disk) disk.sizeBytes = rng.pick([0, 1, 511, 513, 4096, 1 << 20, 21990232555520, Number.MAX_SAFE_INTEGER, 2 ** 53 - 512, 2 ** 44]);
      else if (k === 8 && disk) disk.diskId = rng.pick(WEIRD_IDS);
      else if (k === 9) h.readOnly = true;
      else if (k === 10) h.purpose = rng.pick(['reprotect', 'exfiltrate', ' ', 'x'.repeat(300)]);
      else if (k === 11) h.agentVersion = 'v'.repeat(rng.pick([0, 1000, 100_000]));
      else if (disk) { disk.sizeBytes = rng.pick([21990232555520, 2 ** 53 - 512]); }
      return b;
    }
    default: return b;
  }
}

const BYTE_MUTATIONS: Record<ByteMutation, number> = {
  noncanonical: 45, fields: 30, 'bitflip-header': 16, 'bitflip-payload': 8, truncate: 8, extend: 5, 'length-prefix': 8, 'payload-length': 8, splice: 5, garbage: 4, tiny: 2,
};

/** A mutated message from a valid frame: structured, byte-level, text or oversized. */
/** Before a Welcome, encodings a lenient decoder accepts mostly give valid Hellos: fewer of them. */
const PRE_HELLO_MUTATIONS: Record<ByteMutation, number> = { ...BYTE_MUTATIONS, noncanonical: 5 };

function mutate(rng: Rng, body: FrameBody, payload: Buffer, other: () => Buffer, lane: Lane | null): Buffer | string {
  const how = rng.weighted({ structured: 28, bytes: 68, text: 2, oversized: 0.12, huge: 0.03 });
  if (how === 'text') return rng.pick(['hello?', '', '{"type":"hello"}', rng.bytes(rng.range(1, 200)).toString('latin1')]);
  if (how === 'oversized') return Buffer.concat([encodeMessage(body), Buffer.alloc(8 * 1024 * 1024 + rng.range(1, 4096))]);
  if (how === 'huge') return Buffer.alloc(16 * 1024 * 1024 + rng.range(1, 4096));
  if (how === 'structured') {
    const mb = mutateBody(rng, body, lane);
    try {
      return encodeMessage(mb, rng.chance(0.9) ? payload : rng.bytes(rng.int(2048)));
    } catch {
      return encodeMessage(body, payload); // a value protobufjs will not encode: fall back to bytes below
    }
  }
  return mutateMessage(rng, encodeMessage(body, payload), other, rng.weighted(lane ? BYTE_MUTATIONS : PRE_HELLO_MUTATIONS));
}

/** Agent and disk ids a message announces, as the server would decode them (nothing for undecodable ones). */
function helloPairs(msg: Buffer | string): string[] {
  if (typeof msg === 'string') return [];
  try {
    const f = decodeMessage(msg);
    if (f.type !== 'hello') return [];
    return f.hello.disks.map((d) => `${f.hello.agentId}/${d.diskId}`);
  } catch {
    return [];
  }
}

async function walk(root: string, rel = ''): Promise<string[]> {
  const out: string[] = [];
  for (const e of await fsp.readdir(path.join(root, rel), { withFileTypes: true }).catch(() => [])) {
    const r = path.join(rel, e.name);
    out.push(r);
    if (e.isDirectory()) out.push(...(await walk(root, r)));
  }
  return out;
}

t.test('protocol fuzzing against a live server', async (t) => {
  const dir = await tmpDir(t);
  const dataDir = path.join(dir, 'srv');
  const srv = await spawnServer(dataDir, { extraArgs: ['--no-tls'] });
  t.teardown(() => stopServer(srv));
  let logInternal = 0;
  let logCrash = 0;
  let tail = '';
  srv.child.stderr!.on('data', (d: Buffer) => {
    const s = tail + d.toString();
    logInternal += s.split('MOB_ERR_INTERNAL').length - 1;
    logCrash += s.split(/uncaught|unhandled/i).length - 1;
    tail = s.slice(-64);
  });
  const url = `${srv.info.url}/v1/replicate`;
  const token = (await fsp.readFile(srv.info.tokenFile, 'utf8')).trim();
  t.comment(`fuzz seed ${SEED} (replay: MOBILITY_FUZZ_SEED=${SEED}), ${INPUTS} malformed inputs, ${WORKERS} connections at a time`);

  const stats: Stats = {
    inputs: 0, preHello: 0, postHello: 0, validFrames: 0, accepted: 0, sessions: 0, welcomedPre: 0, closedWithoutError: 0, badCloses: [], laneBusy: 0,
    codes: new Map(), internal: [], unknown: [], hangs: [], late: [],
  };
  const anomalies: string[] = [];
  const bad = (why: string) => { if (anomalies.length < 50) anomalies.push(why); };
  const welcomed = new Set<string>(); // agent/disk pairs some session got a Welcome for
  const refused = new Set<string>(); // agent/disk pairs named by sessions refused before their Welcome
  const note = (a: Answer, what: string) => {
    if (a.kind === 'error') {
      stats.codes.set(a.code, (stats.codes.get(a.code) ?? 0) + 1);
      if (a.code === 'MOB_ERR_INTERNAL') { if (stats.internal.length < 20) stats.internal.push(`${what}: ${a.message}`); }
      else if (!isErrorCode(a.code)) stats.unknown.push(`${what}: ${a.code}`);
    } else if (a.kind === 'timeout') {
      stats.hangs.push(what);
    } else if (a.kind === 'closed') {
      stats.closedWithoutError++;
      // only the WebSocket layer closes without an Error frame: a message above 16 MiB (1009)
      if (!/ 1009 /.test(what + ' ')) stats.badCloses.push(what);
    }
  };

  // ---- the good agent, replicating all along ----
  const good = path.join(dir, 'good.img');
  const { kinds } = await writeSampleImage(good, GOOD_SIZE, SEED % 1000);
  const goodReplica = path.join(dataDir, 'replicas', 'good', 'd0', 'replica.img');
  let fuzzing = true;
  let fuzzDone: () => void = () => undefined;
  const fuzzEnded = new Promise<void>((r) => (fuzzDone = r));
  let running: CliRun | null = null;
  t.teardown(() => { running?.child.kill('SIGKILL'); });
  const goodRuns: { kind: string; code: number | null; equal: boolean; stderr: string }[] = [];
  const goodLoop = (async () => {
    while (fuzzing || goodRuns.length === 0) {
      if (goodRuns.length) {
        // a pass every few seconds is plenty, and leaves the CPU to the fuzzing
        await Promise.race([new Promise((r) => setTimeout(r, 8000).unref()), fuzzEnded]);
        if (!fuzzing) break;
        await churnImage(good, GOOD_SIZE, 0.01, SEED + goodRuns.length, kinds);
      }
      running = runCli(['replicate', '--server', srv.info.url, '--token-file', srv.info.tokenFile, '--disk', `${good}=d0`, '--agent-id', 'good',
        '--state-dir', path.join(dir, 'agent'), '--json', '--json-logs', '--retry-deadline', '60']);
      const r = await running.done;
      running = null;
      let kind = '?';
      try { kind = (JSON.parse(r.stdout) as { disks: { kind: string }[] }).disks[0].kind; } catch { /* reported below */ }
      const equal = r.code === 0 && (await sha256File(goodReplica)) === (await sha256File(good));
      goodRuns.push({ kind, code: r.code, equal, stderr: r.stderr.slice(-600) });
    }
  })();

  // ---- fuzz workers ----
  const quota = Math.ceil(INPUTS / WORKERS);
  const started = Date.now();
  const baseHello = (agentId: string, disks: DiskInfo[]): Hello => ({ protocolVersion: PROTOCOL_VERSION, agentId, token, agentVersion: 'fuzz', disks });
  const marker = (() => { let n = 0; return () => 8_000_000_000_000_000 + ++n; })();

  async function preHello(rng: Rng, w: number, i: number): Promise<void> {
    const agent = `p${w}-${i}`;
    const disks: DiskInfo[] = Array.from({ length: rng.range(1, 3) }, (_x, k) => ({
      diskId: `d${k}`, sizeBytes: rng.chance(0.1) ? rng.pick([21990232555520, 2 ** 53 - 512]) : 512 * rng.range(1, 8192),
      blockSize: rng.pick([4096, 65536, 1 << 20]), pageSize: 4096,
    }));
    const hello = baseHello(agent, disks);
    const helloMsg = encodeMessage({ type: 'hello', hello });
    let msg: Buffer | string;
    const how = rng.weighted({ hello: 88, otherFirst: 10, text: 2 });
    if (how === 'text') msg = rng.pick(['', 'hello', JSON.stringify({ type: 'hello', hello })]);
    else if (how === 'otherFirst') {
      const lane: Lane = { agent, gen: 0, disks: [{ id: 'd0', size: 1 << 20, bs: 65536, known: new Map() }], seq: [0] };
      const f = validFrame(rng, lane, rng.pick(['data', 'digestRequest', 'heartbeat', 'passEnd', 'health', 'cut', 'serverOnly'] as const), hello);
      msg = rng.chance(0.5) ? encodeMessage(f.body, f.payload) : mutate(rng, f.body, f.payload, () => helloMsg, lane);
    } else {
      msg = mutate(rng, { type: 'hello', hello }, Buffer.alloc(0), () => helloMsg, null);
    }
    const pairs = helloPairs(msg);
    const c = new Conn(url, bad);
    try { await c.ready; } catch (err) { bad(`connect failed: ${(err as Error).message}`); return; }
    stats.sessions++;
    const a = await c.exchange([msg]);
    stats.inputs++;
    stats.preHello++;
    note(a, `pre-hello ${how} ${c.closeInfo}`);
    if (a.kind === 'welcome') {
      stats.welcomedPre++;
      for (const p of pairs) welcomed.add(p);
    } else {
      for (const p of pairs) refused.add(p);
    }
    await c.close();
  }

  function newLaneDisks(lane: Lane): void {
    lane.gen++;
    lane.disks = [
      { id: `a${lane.gen}`, size: 1 << 20, bs: 16384, known: new Map() },
      { id: `b${lane.gen}`, size: 601 * 512, bs: 8192, known: new Map() },
    ];
    // a fresh replica reads as zeros
    for (const d of lane.disks) for (let b = 0; b < blocksOf(d); b++) d.known.set(b, Buffer.alloc(blockLen(d, b)));
    lane.seq = lane.disks.map(() => 0);
  }

  /** One post-Hello session of a lane; returns the malformed inputs it sent. */
  async function laneSession(rng: Rng, lane: Lane, budget: number): Promise<number> {
    if (lane.seq.some((s) => s > 2 ** 50)) newLaneDisks(lane); // a mutated sequence jumped near 2^53: start new disks
    const hello = baseHello(lane.agent, lane.disks.map((d) => ({ diskId: d.id, sizeBytes: d.size, blockSize: d.bs, pageSize: 4096 })));
    const c = new Conn(url, bad);
    try { await c.ready; } catch (err) { bad(`connect failed: ${(err as Error).message}`); return 0; }
    stats.sessions++;
    const w = await c.exchange([encodeMessage({ type: 'hello', hello })]);
    if (w.kind !== 'welcome') {
      if (w.kind === 'error' && w.code === 'MOB_ERR_DISK_BUSY') stats.laneBusy++;
      else bad(`lane ${lane.agent}: valid hello answered ${JSON.stringify(w)}`);
      await c.close();
      await new Promise((r) => setTimeout(r, 20));
      return 0;
    }
    for (const d of lane.disks) welcomed.add(`${lane.agent}/${d.id}`);
    lane.seq = w.disks.map((x) => x.lastDurableSeq);
    let sent = 0;
    const kinds: Record<FrameKind, number> = { data: 32, digestRequest: 14, heartbeat: 7, health: 6, passEnd: 6, cut: 5, readRequest: 3, serverOnly: 8, hello: 3 };
    while (sent < budget && !c.closed) {
      const kind = rng.weighted(kinds);
      const f = validFrame(rng, lane, kind, hello);
      const mutated = rng.chance(0.82);
      const other = () => encodeMessage(validFrame(rng, lane, rng.weighted(kinds), hello).body);
      const msg = mutated ? mutate(rng, f.body, f.payload, other, lane) : encodeMessage(f.body, f.payload);
      const m = marker();
      const a = await c.exchange([msg, encodeMessage({ type: 'heartbeat', heartbeat: { sentAtMs: m, reply: false } })], { marker: m });
      if (mutated) { sent++; stats.inputs++; stats.postHello++; } else stats.validFrames++;
      if (a.kind === 'accepted') {
        stats.accepted++;
        // what the server accepted moves the lane's sequences and blocks
        if (typeof msg !== 'string') {
          let dec;
          try { dec = decodeMessage(msg); } catch { dec = null; }
          if (dec?.type === 'data') {
            lane.seq[dec.data.disk] = dec.data.seq;
            const ld = lane.disks[dec.data.disk];
            for (const b of dec.data.blocks) {
              if (!mutated && f.writes?.has(b.index)) ld.known.set(b.index, f.writes.get(b.index)!);
              else ld.known.delete(b.index);
            }
          } else if (dec?.type === 'passEnd') {
            lane.seq[dec.passEnd.disk] = dec.passEnd.seq;
          }
        }
        if (lane.seq.some((x) => x > 2 ** 50)) break; // a mutated sequence jumped near 2^53: the next session starts new disks
        continue;
      }
      if (a.kind === 'error' && !mutated && !['MOB_ERR_REPLICA_DIVERGED', 'MOB_ERR_UNKNOWN_MESSAGE', 'MOB_ERR_HANDSHAKE', 'MOB_ERR_CUT', 'MOB_ERR_CREDIT_EXCEEDED'].includes(a.code)) {
        bad(`lane ${lane.agent}: a valid ${kind} frame was refused: ${a.code}: ${a.message}`);
      }
      note(a, `post-hello ${kind}${mutated ? ' (mutated)' : ''} ${c.closeInfo}`);
      break; // refused: the server closes the session
    }
    if (c.stray.length) stats.late.push(...c.stray);
    await c.close();
    return sent;
  }

  async function worker(w: number): Promise<void> {
    const rng = new Rng((SEED ^ Math.imul(w + 1, 0x9e3779b9)) >>> 0);
    const lane: Lane = { agent: `fz${w}`, gen: 0, disks: [], seq: [] };
    newLaneDisks(lane);
    let done = 0;
    let i = 0;
    while (done < quota) {
      if (rng.chance(0.3)) {
        await preHello(rng, w, i++);
        done++;
      } else {
        done += await laneSession(rng, lane, Math.min(quota - done, rng.range(1, 60)));
      }
    }
  }

  try {
    await Promise.all(Array.from({ length: WORKERS }, (_x, w) => worker(w)));
  } finally {
    fuzzing = false;
    fuzzDone();
  }
  const elapsed = (Date.now() - started) / 1000;
  await goodLoop;

  const codes = [...stats.codes.entries()].sort((a, b) => b[1] - a[1]).map(([c, n]) => `${c} ${n}`).join(', ');
  t.comment(`seed ${SEED}: ${stats.inputs} malformed inputs (${stats.preHello} before a Welcome, ${stats.postHello} after) + ${stats.validFrames} valid frames in ${stats.sessions} sessions, ${elapsed.toFixed(1)} s (${Math.round(stats.inputs / elapsed)}/s)`);
  t.comment(`answers: ${codes}; accepted ${stats.accepted}; closed without an Error frame ${stats.closedWithoutError}; mutated Hellos welcomed ${stats.welcomedPre}; lane hellos busy ${stats.laneBusy}; late errors ${stats.late.length}`);
  {
    const st = (await fsp.readFile(`/proc/${srv.child.pid}/stat`, 'utf8')).split(') ')[1].split(' ');
    const cpu = process.cpuUsage();
    t.comment(`cpu: server ${(Number(st[11]) + Number(st[12])) / 100} s, this process ${((cpu.user + cpu.system) / 1e6).toFixed(1)} s`);
  }
  t.comment(`good agent: ${goodRuns.length} passes (${goodRuns.map((r) => r.kind).join(', ')}) during the fuzzing`);

  t.ok(stats.inputs >= INPUTS, `at least ${INPUTS} malformed inputs sent (${stats.inputs})`);
  t.same(stats.internal, [], 'no input was answered with MOB_ERR_INTERNAL: every refusal has a specific code');
  t.same(stats.unknown, [], 'every answer carries a documented code');
  t.same(stats.hangs, [], 'every input was answered (no hang)');
  t.same(stats.badCloses, [], 'every session closed by the server got an Error frame first (except messages the WebSocket layer refuses: 1009)');
  t.same(anomalies, [], 'no protocol anomaly (valid frames accepted, server frames decodable)');
  t.notOk(stats.late.includes('MOB_ERR_INTERNAL'), 'no late MOB_ERR_INTERNAL either');
  t.equal(logInternal, 0, 'the server log has no MOB_ERR_INTERNAL');
  t.equal(logCrash, 0, 'the server log has no uncaught exception or unhandled rejection');
  t.equal(srv.child.exitCode, null, 'the server process is still running');
  for (const [i, r] of goodRuns.entries()) {
    t.ok(r.code === 0 && r.equal, `good agent pass ${i + 1} (${r.kind}) completed with a replica equal to its source${r.code === 0 ? '' : `: exit ${r.code} ${r.stderr}`}`);
  }
  t.equal(goodRuns[0]?.kind, 'initial');

  // nothing exists for a session refused before its Welcome; no temporary or probe file is left
  const entries = await walk(path.join(dataDir, 'replicas'));
  const welcomedAgents = new Set([...welcomed].map((p) => p.split('/')[0]));
  const stray = entries.filter((e) => {
    const parts = e.split(path.sep);
    if (parts[0] === 'good') return false;
    if (parts.length === 1) return !welcomedAgents.has(parts[0]);
    if (parts.length === 2 && parts[1] !== 'points.json' && ID_PATTERN.test(parts[1])) return !welcomed.has(`${parts[0]}/${parts[1]}`);
    return e.includes('~');
  });
  const leaked = [...refused].filter((p) => !welcomed.has(p) && entries.includes(p.replace('/', path.sep)));
  t.comment(`${refused.size} agent/disk pairs named by refused Hellos, ${welcomed.size} welcomed; data dir holds ${entries.length} entries under replicas/`);
  t.same(leaked, [], 'sessions refused before their Welcome created nothing');
  t.same(stray, [], 'every replica directory belongs to a welcomed session; no temporary directory is left');
  t.same((await walk(dataDir)).filter((e) => e.includes('size-probe')), [], 'no size probe file is left');

  // the server still serves: verify the good agent's replica with a fresh process
  const v = await runCli(['verify', '--server', srv.info.url, '--token-file', srv.info.tokenFile, '--disk', `${good}=d0`, '--agent-id', 'good', '--state-dir', path.join(dir, 'agent')]).done;
  t.equal(v.code, 0, `verify after the fuzzing: ${v.stdout.trim()} ${v.stderr.slice(-300)}`);
});
