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
import { encodeMessage, decodeMessage, Encoding, type FrameBody, type Hello } from '../../src/transport/frame-codec.js';
import { digestBytes } from '../../src/replication/digest.js';
import { replicate } from '../../src/agent/replicator.js';
import { sha256File, writeSampleImage } from '../../src/util/sample-image.js';
import { MAX_FRAME_BYTES, PROTOCOL_VERSION } from '../../src/constants.js';
import { tmpDir, waitFor } from '../helpers.js';

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
  async function attack(messages: (Buffer | string)[], opts: { afterWelcome?: boolean } = {}): Promise<{ code: string | null; closeReason: string; acks: number }> {
    const ws = new WebSocket(url, { ca, maxPayload: 64 * 1024 * 1024 });
    let code: string | null = null;
    let acks = 0;
    const closed = new Promise<string>((resolve) => ws.on('close', (_c, r) => resolve(r.toString())));
    ws.on('error', () => undefined);
    await new Promise<void>((resolve, reject) => { ws.once('open', () => resolve()); ws.once('error', reject); });
    let welcomed: () => void = () => undefined;
    const welcome = new Promise<void>((r) => (welcomed = r));
    ws.on('message', (d) => {
      const f = decodeMessage(d as Buffer);
      if (f.type === 'error') code = f.error.code;
      if (f.type === 'welcome') welcomed();
      if (f.type === 'ack') acks++;
    });
    for (const [i, m] of messages.entries()) {
      ws.send(m);
      if (i === 0 && opts.afterWelcome) await welcome;
    }
    const closeReason = await Promise.race([closed, new Promise<string>((r) => setTimeout(() => r('NOT CLOSED'), 10_000))]);
    ws.terminate();
    return { code, closeReason, acks };
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

  const cases: { name: string; agent: string; msgs: () => (Buffer | string)[]; code: string; afterWelcome?: boolean }[] = [
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
    { name: 'cut before the initial replication completed', agent: 'b20', msgs: () => [encodeMessage(hello('b20')), encodeMessage({ type: 'cut', cut: { cutId: 1, kind: 'crash', disks: [{ disk: 0, seq: 0 }], takenAtMs: 1, frozenMs: 0, note: '' } })], code: 'MOB_ERR_CUT', afterWelcome: true },
    { name: 'read request outside a reprotect session', agent: 'b21', msgs: () => [encodeMessage(hello('b21')), encodeMessage({ type: 'readRequest', readRequest: { disk: 0, requestId: 1, firstPage: 0, pageCount: 1 } })], code: 'MOB_ERR_UNKNOWN_MESSAGE', afterWelcome: true },
    { name: 'reprotect of an agent that is not failed over', agent: 'b22', msgs: () => [encodeMessage({ type: 'hello', hello: { ...(hello('b22') as { hello: Hello }).hello, purpose: 'reprotect', readOnly: true } })], code: 'MOB_ERR_CONFIG' },
    { name: 'unknown session purpose', agent: 'b23', msgs: () => [encodeMessage({ type: 'hello', hello: { ...(hello('b23') as { hello: Hello }).hello, purpose: 'exfiltrate' } })], code: 'MOB_ERR_HANDSHAKE' },
  ];

  for (const c of cases) {
    const r = await attack(c.msgs(), { afterWelcome: c.afterWelcome });
    t.equal(r.code, c.code, `${c.name}: coded error`);
    t.not(r.closeReason, 'NOT CLOSED', `${c.name}: connection closed`);
    if (c.code !== 'MOB_ERR_SEQUENCE') t.equal(r.acks, 0, `${c.name}: nothing acknowledged`);
    // nothing of the bad frame reached the replica (it is sparse zeros if it exists at all)
    const rep = replicaOf(c.agent);
    const exists = await fsp.stat(rep).then(() => true, () => false);
    if (exists && c.code !== 'MOB_ERR_SEQUENCE') {
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
