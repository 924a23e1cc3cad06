/**
 * Bad input against a real server over wss on loopback: each case gets a coded
 * Error frame, the connection is closed, nothing from the bad frame is
 * persisted, and a well-behaved agent replicating at the same time is unaffected.
 */
import t from 'tap';
import fsp from 'node:fs/promises';
import path from 'node:path';
import WebSocket from 'ws';
import { ProcessServer } from '../../src/server/process-server.js';
import { createLogger } from '../../src/log.js';
import { encodeMessage, decodeMessage, Encoding, type CutDisk, type FrameBody, type Hello } from '../../src/protocol/frame-codec.js';
import { digestBytes } from '../../src/protocol/digest.js';
import { replicate } from '../../src/agent/replicator.js';
import { sha256File, writeSampleImage } from '../../src/util/sample-image.js';
import { MAX_FRAME_BYTES, PROTOCOL_VERSION } from '../../src/constants.js';
import { tmpDir, waitFor } from '../helpers.js';
import { mountExt4 } from '../mount-helpers.js';

const logger = createLogger({ silent: true });
const DISK = 1024 * 1024;
const BS = 65536;

t.test('bad input', async (t) => {
  const dir = await tmpDir(t);
  const server = new ProcessServer({ dataDir: path.join(dir, 'srv'), logger });
  const addr = await server.start();
  t.teardown(() => server.stop());
  const url = `wss://127.0.0.1:${addr.port}/v1/replicate`;
  const ca = server.identity!.ca;
  const replicaOf = (agent: string) => path.join(dir, 'srv', 'replicas', agent, 'd0', 'replica.img');

  const hello = (agent: string, over: Partial<{ protocolVersion: number; token: string; sizeBytes: number }> = {}): FrameBody => ({
    type: 'hello',
    hello: {
      protocolVersion: over.protocolVersion ?? PROTOCOL_VERSION, agentId: agent, token: over.token ?? server.token, agentVersion: 'test',
      disks: [{ diskId: 'd0', sizeBytes: over.sizeBytes ?? DISK, blockSize: BS, pageSize: 4096 }],
    },
  });

  /** Opens a raw connection, sends the given messages in order, returns the error code the server answered and the close reason. */
  async function attack(messages: (Buffer | string)[], opts: { afterWelcome?: boolean } = {}): Promise<{ code: string | null; message: string; closeReason: string; acks: number }> {
    const ws = new WebSocket(url, { ca, maxPayload: 64 * 1024 * 1024 });
    let code: string | null = null;
    let message = '';
    let acks = 0;
    const closed = new Promise<string>((resolve) => ws.on('close', (_c, r) => resolve(r.toString())));
    ws.on('error', () => undefined);
    await new Promise<void>((resolve, reject) => { ws.once('open', () => resolve()); ws.once('error', reject); });
    let welcomed: () => void = () => undefined;
    const welcome = new Promise<void>((r) => (welcomed = r));
    ws.on('message', (d) => {
      const f = decodeMessage(d as Buffer);
      if (f.type === 'error') { code = f.error.code; message = f.error.message; }
      if (f.type === 'welcome') welcomed();
      if (f.type === 'ack') acks++;
    });
    for (const [i, m] of messages.entries()) {
      ws.send(m);
      if (i === 0 && opts.afterWelcome) await welcome;
    }
    const closeReason = await Promise.race([closed, new Promise<string>((r) => setTimeout(() => r('NOT CLOSED'), 10_000))]);
    ws.terminate();
    return { code, message, closeReason, acks };
  }

  const block = Buffer.alloc(BS, 0x61);
  const dataFrame = (over: Partial<{ index: number; digest: Buffer; disk: number; seq: number; length: number; payload: Buffer }> = {}) => {
    const payload = over.payload ?? block;
    return encodeMessage({
      type: 'data',
      data: { disk: over.disk ?? 0, seq: over.seq ?? 1, blocks: [{ index: over.index ?? 0, encoding: Encoding.RAW, length: over.length ?? payload.length, pageMask: Buffer.alloc(0), digest: over.digest ?? digestBytes(block) }] },
    }, payload);
  };

  // a well-behaved agent replicating during all the attacks
  const good = path.join(dir, 'good.img');
  await writeSampleImage(good, 32 * 1024 * 1024, 3);
  const goodRun = replicate({
    serverUrl: url, token: server.token, ca, agentId: 'good', disks: [{ path: good, id: 'd0' }], stateDir: path.join(dir, 'agent'),
    mode: 'auto', logger, maxRateBytes: 4 * 1024 * 1024,
  });
  await waitFor(() => fsp.stat(replicaOf('good')).then(() => true, () => false), 10_000, 'the good agent to start');
  const busy = await attack([encodeMessage(hello('good'))]);
  t.equal(busy.code, 'MOB_ERR_DISK_BUSY', 'a second session for a disk in use is refused while the first goes on');

  const cases: { name: string; agent: string; msgs: () => (Buffer | string)[]; code: string; afterWelcome?: boolean; acks?: number; message?: RegExp }[] = [
    { name: 'truncated frame', agent: 'b1', msgs: () => [encodeMessage(hello('b1')), dataFrame().subarray(0, 20)], code: 'MOB_ERR_FRAME_MALFORMED', afterWelcome: true },
    { name: 'malformed protobuf header', agent: 'b2', msgs: () => [Buffer.from([0, 0, 0, 4, 0xff, 0xff, 0xff, 0xff])], code: 'MOB_ERR_FRAME_MALFORMED' },
    { name: 'text message', agent: 'b3', msgs: () => ['hello?'], code: 'MOB_ERR_FRAME_MALFORMED' },
    { name: 'unknown message type', agent: 'b4', msgs: () => [encodeMessage(hello('b4')), Buffer.from([0, 0, 0, 3, 0x9a, 0x06, 0x00])], code: 'MOB_ERR_UNKNOWN_MESSAGE', afterWelcome: true },
    { name: 'server-only message from an agent', agent: 'b5', msgs: () => [encodeMessage(hello('b5')), encodeMessage({ type: 'ack', ack: { disk: 0, seq: 1, creditBytes: 1 } })], code: 'MOB_ERR_UNKNOWN_MESSAGE', afterWelcome: true },
    { name: 'oversized frame', agent: 'b6', msgs: () => [encodeMessage(hello('b6')), Buffer.alloc(MAX_FRAME_BYTES + 1)], code: 'MOB_ERR_FRAME_TOO_LARGE', afterWelcome: true },
    { name: 'wrong protocol version', agent: 'b7', msgs: () => [encodeMessage(hello('b7', { protocolVersion: 99 }))], code: 'MOB_ERR_PROTOCOL_VERSION' },
    { name: 'wrong token', agent: 'b8', msgs: () => [encodeMessage(hello('b8', { token: 'not-the-token' }))], code: 'MOB_ERR_AUTH' },
    { name: 'data before hello', agent: 'b9', msgs: () => [dataFrame()], code: 'MOB_ERR_HANDSHAKE' },
    { name: 'corrupted payload (digest mismatch)', agent: 'b10', msgs: () => [encodeMessage(hello('b10')), dataFrame({ digest: Buffer.alloc(8, 1) })], code: 'MOB_ERR_DIGEST_MISMATCH', afterWelcome: true },
    { name: 'write beyond the disk size', agent: 'b11', msgs: () => [encodeMessage(hello('b11')), dataFrame({ index: DISK / BS })], code: 'MOB_ERR_OUT_OF_RANGE', afterWelcome: true },
    { name: 'unknown disk', agent: 'b12', msgs: () => [encodeMessage(hello('b12')), dataFrame({ disk: 3 })], code: 'MOB_ERR_UNKNOWN_DISK', afterWelcome: true },
    { name: 'payload lengths disagree', agent: 'b13', msgs: () => [encodeMessage(hello('b13')), dataFrame({ length: BS - 1 })], code: 'MOB_ERR_FRAME_MALFORMED', afterWelcome: true },
    { name: 'sequence goes backwards', agent: 'b14', msgs: () => [encodeMessage(hello('b14')), dataFrame({ seq: 5 }), dataFrame({ seq: 5 })], code: 'MOB_ERR_SEQUENCE', afterWelcome: true },
    { name: 'path traversal in agent id', agent: '../x', msgs: () => [encodeMessage(hello('../x'))], code: 'MOB_ERR_BAD_DISK_ID' },
    { name: 'hello twice', agent: 'b16', msgs: () => [encodeMessage(hello('b16')), encodeMessage(hello('b16'))], code: 'MOB_ERR_HANDSHAKE', afterWelcome: true },
    { name: 'cut of an unknown kind', agent: 'b17', msgs: () => [encodeMessage(hello('b17')), encodeMessage({ type: 'cut', cut: { cutId: 1, kind: 'weird', disks: [{ disk: 0, seq: 0 }], takenAtMs: 1, frozenMs: 0, note: '' } })], code: 'MOB_ERR_CUT', afterWelcome: true },
    { name: 'cut naming data never received', agent: 'b18', msgs: () => [encodeMessage(hello('b18')), encodeMessage({ type: 'cut', cut: { cutId: 1, kind: 'crash', disks: [{ disk: 0, seq: 7 }], takenAtMs: 1, frozenMs: 0, note: '' } })], code: 'MOB_ERR_CUT', afterWelcome: true },
    { name: 'cut missing a disk of the session', agent: 'b19', msgs: () => [encodeMessage(hello('b19')), encodeMessage({ type: 'cut', cut: { cutId: 1, kind: 'crash', disks: [], takenAtMs: 1, frozenMs: 0, note: '' } })], code: 'MOB_ERR_CUT', afterWelcome: true },
    {
      name: 'cut before the initial replication completed', agent: 'b20', code: 'MOB_ERR_CUT', afterWelcome: true, message: /has not completed its initial replication/,
      msgs: () => [encodeMessage(hello('b20')), encodeMessage({ type: 'cut', cut: { cutId: 1, kind: 'crash', disks: [{ disk: 0, seq: 0, samplePages: [0], sampleDigests: Buffer.alloc(8) } as CutDisk], takenAtMs: 1, frozenMs: 0, note: '' } })],
    },
    // a point needs evidence: the cut's sampled page digests
    {
      name: 'cut without verification samples', agent: 'b25', code: 'MOB_ERR_CUT', afterWelcome: true, message: /carries no verification samples/,
      msgs: () => [encodeMessage(hello('b25')), encodeMessage({ type: 'cut', cut: { cutId: 1, kind: 'crash', disks: [{ disk: 0, seq: 0 }], takenAtMs: 1, frozenMs: 0, note: '' } })],
    },
    {
      name: 'cut whose digests do not match its sampled pages', agent: 'b26', code: 'MOB_ERR_CUT', afterWelcome: true, message: /12 digest bytes for 2 sampled pages/,
      msgs: () => [encodeMessage(hello('b26')), encodeMessage({ type: 'cut', cut: { cutId: 1, kind: 'crash', disks: [{ disk: 0, seq: 0, samplePages: [0, 1], sampleDigests: Buffer.alloc(12) } as CutDisk], takenAtMs: 1, frozenMs: 0, note: '' } })],
    },
    {
      name: 'cut sampling a page beyond the disk', agent: 'b27', code: 'MOB_ERR_OUT_OF_RANGE', afterWelcome: true, message: /sampled page 256 lies beyond/,
      msgs: () => [encodeMessage(hello('b27')), encodeMessage({ type: 'cut', cut: { cutId: 1, kind: 'crash', disks: [{ disk: 0, seq: 0, samplePages: [DISK / 4096], sampleDigests: Buffer.alloc(8) } as CutDisk], takenAtMs: 1, frozenMs: 0, note: '' } })],
    },
    {
      name: 'cut with too many samples', agent: 'b28', code: 'MOB_ERR_CUT', afterWelcome: true, message: /4097 samples for disk d0 \(at most 4096\)/,
      msgs: () => [encodeMessage(hello('b28')), encodeMessage({ type: 'cut', cut: { cutId: 1, kind: 'crash', disks: [{ disk: 0, seq: 0, samplePages: Array.from({ length: 4097 }, (_, i) => i % 256), sampleDigests: Buffer.alloc(8 * 4097) } as CutDisk], takenAtMs: 1, frozenMs: 0, note: '' } })],
    },
    { name: 'read request outside a reprotect session', agent: 'b21', msgs: () => [encodeMessage(hello('b21')), encodeMessage({ type: 'readRequest', readRequest: { disk: 0, requestId: 1, firstPage: 0, pageCount: 1 } })], code: 'MOB_ERR_UNKNOWN_MESSAGE', afterWelcome: true },
    { name: 'reprotect of an agent that is not failed over', agent: 'b22', msgs: () => [encodeMessage({ type: 'hello', hello: { ...(hello('b22') as { hello: Hello }).hello, purpose: 'reprotect', readOnly: true } })], code: 'MOB_ERR_CONFIG' },
    { name: 'unknown session purpose', agent: 'b23', msgs: () => [encodeMessage({ type: 'hello', hello: { ...(hello('b23') as { hello: Hello }).hello, purpose: 'exfiltrate' } })], code: 'MOB_ERR_HANDSHAKE' },
    // found by the fuzz test: a cut time no Date can hold was MOB_ERR_INTERNAL ("Invalid time value")
    {
      name: 'cut at a time beyond any date', agent: 'b24', acks: 2, afterWelcome: true, code: 'MOB_ERR_CUT',
      msgs: () => [encodeMessage(hello('b24')), dataFrame({ seq: 1 }), encodeMessage({ type: 'passEnd', passEnd: { disk: 0, seq: 2, kind: 'initial' } }),
        encodeMessage({ type: 'cut', cut: { cutId: 1, kind: 'crash', takenAtMs: Number.MAX_SAFE_INTEGER, frozenMs: 0, note: '', disks: [{ disk: 0, seq: 2, samplePages: [0], sampleDigests: digestBytes(block.subarray(0, 4096)) } as CutDisk] } })],
    },
  ];

  for (const c of cases) {
    const r = await attack(c.msgs(), { afterWelcome: c.afterWelcome });
    t.equal(r.code, c.code, `${c.name}: coded error`);
    if (c.message) t.match(r.message, c.message, `${c.name}: ${r.message}`);
    t.not(r.closeReason, 'NOT CLOSED', `${c.name}: connection closed`);
    if (c.acks !== undefined) t.equal(r.acks, c.acks, `${c.name}: the valid frames before it acknowledged`);
    else if (c.code !== 'MOB_ERR_SEQUENCE') t.equal(r.acks, 0, `${c.name}: nothing acknowledged`);
    // nothing of the bad frame reached the replica (it is sparse zeros if it exists at all)
    const rep = replicaOf(c.agent);
    const exists = await fsp.stat(rep).then(() => true, () => false);
    if (exists && c.code !== 'MOB_ERR_SEQUENCE' && c.acks === undefined) {
      const content = await fsp.readFile(rep);
      t.ok(content.every((b) => b === 0), `${c.name}: replica holds nothing from the bad frame`);
    }
  }

  const [res] = await goodRun;
  t.equal(res.kind, 'initial');
  t.equal(await sha256File(replicaOf('good')), await sha256File(good), 'the concurrent good agent replicated correctly');

  t.test('a disk smaller than its replica is refused', async (t) => {
    const r = await attack([encodeMessage(hello('good', { sizeBytes: 4096 }))]);
    t.equal(r.code, 'MOB_ERR_DISK_SIZE_CHANGED');
  });
});

t.test('TLS pinning: wrong fingerprint and unknown CA are refused before the token is sent', async (t) => {
  const dir = await tmpDir(t);
  const server = new ProcessServer({ dataDir: path.join(dir, 'srv'), logger });
  const addr = await server.start();
  t.teardown(() => server.stop());
  const other = new ProcessServer({ dataDir: path.join(dir, 'other'), logger });
  await other.start();
  t.teardown(() => other.stop());
  const img = path.join(dir, 'd.img');
  await fsp.writeFile(img, Buffer.alloc(65536, 1));
  const base = { serverUrl: `wss://127.0.0.1:${addr.port}/v1/replicate`, token: server.token, agentId: 'a', disks: [{ path: img, id: 'd0' }], stateDir: path.join(dir, 'ag'), mode: 'auto' as const, logger };
  await t.rejects(replicate({ ...base, pin: 'AA:BB' }), { code: 'MOB_ERR_TLS_PIN' });
  await t.rejects(replicate({ ...base, ca: other.identity!.ca }), { code: 'MOB_ERR_TLS_PIN' });
  t.equal(server.stats.rejected, 0, 'no token was refused: the agent never sent one');
  t.equal(await fsp.stat(path.join(dir, 'srv', 'replicas', 'a')).then(() => true, () => false), false, 'no Hello reached the server (no replica created)');
  const [ok] = await replicate({ ...base, pin: server.identity!.fingerprint256.replace(/:/g, '').toLowerCase() });
  t.equal(ok.kind, 'initial', 'the right fingerprint works');
});

/** Everything below `root` (sorted relative paths). */
async function tree(root: string): Promise<string[]> {
  const out: string[] = [];
  const walk = async (d: string, rel: string) => {
    for (const e of await fsp.readdir(d, { withFileTypes: true }).catch(() => [])) {
      out.push(path.join(rel, e.name));
      if (e.isDirectory()) await walk(path.join(d, e.name), path.join(rel, e.name));
    }
  };
  await walk(root, '');
  return out.sort();
}

/** Sends one Hello on a fresh connection; resolves with the Error frame (or 'welcome'). */
async function helloOnce(url: string, ca: string | undefined, hello: Hello): Promise<{ code: string; message: string; retryable: boolean } | 'welcome'> {
  const ws = new WebSocket(url, { ca });
  ws.on('error', () => undefined);
  await new Promise<void>((resolve, reject) => { ws.once('open', () => resolve()); ws.once('error', reject); });
  const answer = new Promise<{ code: string; message: string; retryable: boolean } | 'welcome'>((resolve) => {
    ws.on('message', (d) => {
      const f = decodeMessage(d as Buffer);
      if (f.type === 'error') resolve(f.error);
      if (f.type === 'welcome') resolve('welcome');
    });
    ws.on('close', () => resolve({ code: 'CLOSED', message: '', retryable: true }));
  });
  ws.send(encodeMessage({ type: 'hello', hello }));
  const r = await answer;
  ws.close();
  await new Promise((res) => { if (ws.readyState === ws.CLOSED) res(undefined); else ws.once('close', res); });
  return r;
}

t.test('a disk larger than the filesystem can hold as one file is refused before anything is created', async (t) => {
  // ext4 with 1 KiB blocks: the largest file is just under 4 TiB (16 TiB - 4 KiB with the usual 4 KiB blocks)
  const mnt = await mountExt4(t, { sizeMb: 64, blockSize: 1024 });
  const dataDir = path.join(mnt, 'srv');
  const server = new ProcessServer({ dataDir, logger });
  const addr = await server.start();
  t.teardown(() => server.stop());
  const url = `wss://127.0.0.1:${addr.port}/v1/replicate`;
  const ca = server.identity!.ca;
  const TiB = 1024 ** 4;
  const hello = (agent: string, disks: { id: string; size: number }[]): Hello => ({
    protocolVersion: PROTOCOL_VERSION, agentId: agent, token: server.token, agentVersion: 'test',
    disks: disks.map((d) => ({ diskId: d.id, sizeBytes: d.size, blockSize: BS, pageSize: 4096 })),
  });

  const before = await tree(dataDir);
  const r = await helloOnce(url, ca, hello('huge', [{ id: 'd0', size: 20 * TiB }]));
  t.not(r, 'welcome');
  if (r === 'welcome') return;
  t.equal(r.code, 'MOB_ERR_DISK_TOO_LARGE', 'a coded error, not MOB_ERR_INTERNAL');
  t.equal(r.retryable, false, 'not retryable: retrying cannot help');
  t.match(r.message, /ext4/, `the message names the filesystem (${r.message})`);
  const limit = Number(/at most (\d+) bytes/.exec(r.message)?.[1]);
  t.ok(limit > 0 && limit < 20 * TiB, `the message names the limit (${limit})`);
  // the limit is the filesystem's: a file of exactly that size fits, 512 bytes more does not
  const probe = path.join(mnt, 'limit-check');
  await fsp.writeFile(probe, '');
  await fsp.truncate(probe, limit);
  await t.rejects(fsp.truncate(probe, limit + 512), { code: 'EFBIG' }, 'the named limit is exact');
  await fsp.rm(probe);
  t.same(await tree(dataDir), before, 'no directory or file was created (no replica, no probe file left)');

  // a session with a good disk and a too-large one creates neither
  const r2 = await helloOnce(url, ca, hello('huge', [{ id: 'ok', size: DISK }, { id: 'd0', size: 20 * TiB }]));
  t.equal(r2 === 'welcome' ? 'welcome' : r2.code, 'MOB_ERR_DISK_TOO_LARGE');
  t.same(await tree(dataDir), before, 'a refused session creates none of its disks');

  // earlier versions left a 0-byte replica.img and wal.log without state.json on EFBIG: that is a new replica
  const stale = path.join(dataDir, 'replicas', 'huge', 'old');
  await fsp.mkdir(stale, { recursive: true });
  await fsp.writeFile(path.join(stale, 'replica.img'), '');
  await fsp.writeFile(path.join(stale, 'wal.log'), '');

  // the next valid Hello for the same disk id works
  const img = path.join(mnt, 'src.img');
  await writeSampleImage(img, DISK, 9);
  const [ok] = await replicate({
    serverUrl: url, token: server.token, ca, agentId: 'huge', disks: [{ path: img, id: 'd0' }], stateDir: path.join(mnt, 'agent'), mode: 'auto', logger,
  });
  t.equal(ok.kind, 'initial');
  t.equal(await sha256File(path.join(dataDir, 'replicas', 'huge', 'd0', 'replica.img')), await sha256File(img), 'and replicates');
  const [old] = await replicate({
    serverUrl: url, token: server.token, ca, agentId: 'huge', disks: [{ path: img, id: 'old' }], stateDir: path.join(mnt, 'agent'), mode: 'auto', logger,
  });
  t.equal(old.kind, 'initial', 'a directory left by a failed creation (no state, no data) is a new replica, not MOB_ERR_STATE_CORRUPT');
  t.equal(await sha256File(path.join(stale, 'replica.img')), await sha256File(img));

  // a session refused at its second disk (after the first, new one was opened) creates nothing either
  const beforeMixed = await tree(dataDir);
  const r4 = await helloOnce(url, ca, hello('huge', [{ id: 'fresh', size: DISK }, { id: 'd0', size: 4096 }]));
  t.equal(r4 === 'welcome' ? 'welcome' : r4.code, 'MOB_ERR_DISK_SIZE_CHANGED');
  t.same(await tree(dataDir), beforeMixed, 'the new disk of a session refused at a later disk is not left behind');

  // growing an existing replica beyond the limit is refused the same way, the replica untouched
  const stateBefore = await fsp.readFile(path.join(dataDir, 'replicas', 'huge', 'd0', 'state.json'), 'utf8');
  const r3 = await helloOnce(url, ca, hello('huge', [{ id: 'd0', size: 20 * TiB }]));
  t.equal(r3 === 'welcome' ? 'welcome' : r3.code, 'MOB_ERR_DISK_TOO_LARGE');
  t.equal(await fsp.readFile(path.join(dataDir, 'replicas', 'huge', 'd0', 'state.json'), 'utf8'), stateBefore, 'existing replica untouched');
  t.equal((await fsp.stat(path.join(dataDir, 'replicas', 'huge', 'd0', 'replica.img'))).size, DISK);
});

t.test('verify of a disk without a replica creates nothing', async (t) => {
  const dir = await tmpDir(t);
  const dataDir = path.join(dir, 'srv');
  const server = new ProcessServer({ dataDir, logger });
  const addr = await server.start();
  t.teardown(() => server.stop());
  const img = path.join(dir, 'd.img');
  await writeSampleImage(img, DISK, 4);
  const before = await tree(dataDir);
  await t.rejects(replicate({
    serverUrl: `wss://127.0.0.1:${addr.port}/v1/replicate`, token: server.token, ca: server.identity!.ca, agentId: 'v', disks: [{ path: img, id: 'nope' }],
    stateDir: path.join(dir, 'agent'), mode: 'verify', logger,
  }), { code: 'MOB_ERR_UNKNOWN_DISK' });
  t.same(await tree(dataDir), before, 'no replica directory (nor agent directory) was created');
});
