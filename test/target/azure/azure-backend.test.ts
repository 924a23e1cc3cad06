/**
 * What the Azure page-blob backend promises beyond the conformance suite, on a real Azurite
 * (fails, never skips, without it): sparse writes (zeros become Clear Pages, nothing stored),
 * Put Page calls of at most 4 MiB, sub-sector writes that keep their neighbours, an ack only
 * after the service confirmed every call, transient failures retried by the retry layer,
 * auth/quota failures coded at once, Azurite killed under a batch, wrong and exposed
 * credentials, SAS tokens, digests that download only valid ranges, the 8 TiB limit.
 */
import fsp from 'node:fs/promises';
import path from 'node:path';
import { PassThrough } from 'node:stream';
import t from 'tap';
import winston from 'winston';
import { AccountSASPermissions, AccountSASResourceTypes, AccountSASServices, StorageSharedKeyCredential, generateAccountSASQueryParameters } from '@azure/storage-blob';
import { MobilityError } from '../../../src/errors.js';
import { AzureBackend } from '../../../src/target/azure/azure-backend.js';
import { loadAzureCredentials } from '../../../src/target/azure/credentials.js';
import type { PageBlobOps } from '../../../src/target/azure/page-client.js';
import type { AzureReplicaStore } from '../../../src/target/azure/azure-store.js';
import { cleanup } from '../../cleanup.js';
import { startAzurite, type Azurite } from '../../azurite.js';
import { backendOn, freshContainer, pattern } from './helpers.js';

const MiB = 1024 * 1024;
let az: Azurite | null = null;
async function azurite(): Promise<Azurite> {
  az ??= await startAzurite(t);
  return az;
}

/** Wraps every method of `inner`; `hooks[name]` runs before the real call and may throw or wait. */
function hooked(inner: PageBlobOps, hooks: Partial<Record<keyof PageBlobOps, (...args: unknown[]) => Promise<void> | void>>): PageBlobOps {
  return new Proxy(inner, {
    get(target, prop, recv) {
      const v = Reflect.get(target, prop, recv) as unknown;
      if (typeof v !== 'function') return v;
      const hook = hooks[prop as keyof PageBlobOps];
      return async (...args: unknown[]) => {
        if (hook) await hook(...args);
        return (v as (...a: unknown[]) => unknown).apply(target, args);
      };
    },
  });
}

function httpError(statusCode: number, errorCode?: string): Error {
  return Object.assign(new Error(`injected ${statusCode}${errorCode ? ` ${errorCode}` : ''}`), { statusCode, details: errorCode ? { errorCode } : undefined });
}

/** Byte equality without tap's diff (which is slow on large buffers): names the first differing offset. */
function sameBytes(t: { ok(v: unknown, m: string): void }, got: Buffer, want: Buffer, msg: string): void {
  let at = -1;
  if (!got.equals(want)) {
    const n = Math.min(got.length, want.length);
    at = n;
    for (let i = 0; i < n; i++) if (got[i] !== want[i]) { at = i; break; }
  }
  t.ok(at < 0, at < 0 ? msg : `${msg}: differs at byte ${at} (lengths ${got.length}/${want.length})`);
}

const ticks = async (n: number) => { for (let i = 0; i < n; i++) await new Promise((r) => setImmediate(r)); };

t.test('writes: Put Page calls of at most 4 MiB, zeros cleared (sparse), sub-sector writes keep their neighbours', async (t) => {
  const sizes: number[] = [];
  const backend = await backendOn(t, await azurite(), { ops: (inner) => hooked(inner, { putPages: (_n, _o, data) => { sizes.push((data as Buffer).length); } }) });
  const { store } = await backend.open('agent-a', 'disk0', 64 * MiB);
  const model = Buffer.alloc(64 * MiB);
  const big = pattern(10 * MiB, 1);
  await store.submit([{ offset: 0, length: big.length, data: big }], 1);
  big.copy(model, 0);
  t.ok(sizes.length >= 3, `a 10 MiB write went out in ${sizes.length} Put Page calls`);
  t.ok(sizes.every((s) => s <= 4 * MiB && s % 512 === 0), 'every Put Page call is at most 4 MiB and whole sectors');
  t.equal(sizes.reduce((a, b) => a + b, 0), 10 * MiB, 'and together they carry the write once');

  const az2 = backend.blobOps;
  const blob = (store as AzureReplicaStore).blobName;
  const none = backend.stats.calls.clearPages ?? 0;
  await store.submit([{ offset: 20 * MiB, length: 8 * MiB, data: null }], 2);
  t.equal(backend.stats.calls.clearPages ?? 0, none, 'zeros where the fresh blob was never written cost no call (an initial sync of zero regions)');
  const before = backend.stats.calls.clearPages ?? 0;
  await store.submit([{ offset: 2 * MiB, length: 3 * MiB, data: null }], 2);
  model.fill(0, 2 * MiB, 5 * MiB);
  t.ok((backend.stats.calls.clearPages ?? 0) > before, 'a zero range became Clear Pages');
  const ranges = await az2.pageRanges({ name: blob });
  t.notOk(ranges.some((r) => r.start < 5 * MiB && r.end > 2 * MiB), 'the cleared range holds no stored pages (the blob stays sparse)');
  t.equal(ranges.reduce((a, r) => a + r.end - r.start, 0), 7 * MiB, 'only the written, non-zero bytes are stored');

  const odd = Buffer.from('not on a sector boundary');
  sizes.length = 0;
  await store.submit([{ offset: 1000, length: odd.length, data: odd }, { offset: 40 * MiB + 7, length: 3, data: Buffer.from('xyz') }], 3);
  odd.copy(model, 1000);
  Buffer.from('xyz').copy(model, 40 * MiB + 7);
  t.ok(sizes.every((s) => s % 512 === 0), 'sub-sector writes were completed to whole sectors');
  sameBytes(t, await store.read(0, 2 * MiB), model.subarray(0, 2 * MiB), 'the bytes around a sub-sector write are kept');
  sameBytes(t, await store.read(40 * MiB, 4096), model.subarray(40 * MiB, 40 * MiB + 4096), 'a write into a never-written sector reads back with zeros around it');
  t.equal(store.lastDurableSeq, 3);
  await store.close();
  const { store: again } = await backend.open('agent-a', 'disk0', 64 * MiB, { readOnly: true });
  sameBytes(t, await again.read(0, 64 * MiB), model, 'the whole blob equals the model after reopening');
  await again.close();
});

t.test('a short zero gap between data rides in the same Put Page; a long one stays sparse', async (t) => {
  const sizes: number[] = [];
  const backend = await backendOn(t, await azurite(), { ops: (inner) => hooked(inner, { putPages: (_n, _o, data) => { sizes.push((data as Buffer).length); } }) });
  const { store } = await backend.open('agent-g', 'disk0', 16 * MiB);
  const blob = (store as AzureReplicaStore).blobName;
  const model = Buffer.alloc(16 * MiB);
  const a = pattern(512 * 1024, 3);
  const b = pattern(512 * 1024, 4);
  // zero ranges arrive as one op per 64 KiB block: judged by their whole length
  const zeros = (from: number, len: number) => Array.from({ length: len / (64 * 1024) }, (_, i) => ({ offset: from + i * 64 * 1024, length: 64 * 1024, data: null }));
  await store.submit([{ offset: 0, length: a.length, data: a }, ...zeros(512 * 1024, 128 * 1024), { offset: 640 * 1024, length: b.length, data: b }], 1);
  a.copy(model, 0);
  b.copy(model, 640 * 1024);
  t.same(sizes, [1152 * 1024], 'data, a 128 KiB zero gap and data went out as one Put Page');
  sizes.length = 0;
  await store.submit([{ offset: 4 * MiB, length: a.length, data: a }, ...zeros(4.5 * MiB, MiB), { offset: 5.5 * MiB, length: b.length, data: b }], 2);
  a.copy(model, 4 * MiB);
  b.copy(model, 5.5 * MiB);
  t.same(sizes, [512 * 1024, 512 * 1024], 'a 1 MiB zero gap splits the write in two');
  const ranges = await backend.blobOps.pageRanges({ name: blob });
  t.notOk(ranges.some((r) => r.start < 5.5 * MiB && r.end > 4.5 * MiB), 'and stays sparse');
  sameBytes(t, await store.read(0, 16 * MiB), model, 'the blob holds exactly what was written');
  await store.close();
});

t.test('a failed store starts no more calls, rejects the writes and its reads, and closes once every call settled', async (t) => {
  let entered = 0;
  let release: (() => void) | null = null;
  const hold = new Promise<void>((r) => { release = r; });
  const backend = await backendOn(t, await azurite(), {
    ops: (inner) => hooked(inner, {
      putPages: async () => {
        const n = ++entered;
        if (n === 1) throw httpError(403, 'AuthenticationFailed');
        await hold; // the other calls of the first wave are still out when the store fails
      },
    }),
  });
  const { store } = await backend.open('agent-f', 'disk0', 64 * MiB);
  const data = pattern(48 * MiB, 5); // 12 Put Page calls, 8 at a time
  const res = store.submit([{ offset: 0, length: data.length, data }], 1).then(() => 'acked', (e: MobilityError) => e.code);
  while (entered < 8) await ticks(10);
  await ticks(100);
  t.equal(store.failure?.code, 'MOB_ERR_TARGET_AUTH', 'the store failed at the refused call');
  const read = await store.read(0, 4096).then(() => 'read', (e: MobilityError) => e.code);
  t.equal(read, 'MOB_ERR_TARGET_AUTH', 'a read of a failed store is refused (its newest content is unknown)');
  let closed = false;
  const closing = store.close().then(() => { closed = true; });
  await ticks(100);
  t.notOk(closed, 'close waits for the calls still out');
  release!();
  await closing;
  t.equal(await res, 'MOB_ERR_TARGET_AUTH', 'the write is rejected, never acknowledged');
  t.equal(entered, 8, 'no call started after the failure (the other 4 never went out)');
});

t.test('an ack means Azure confirmed: submit resolves only after every call of the batch returned', async (t) => {
  const gate: { release: (() => void) | null } = { release: null };
  let entered = 0;
  const backend = await backendOn(t, await azurite(), {
    ops: (inner) => hooked(inner, {
      putPages: async () => {
        entered++;
        if (entered === 2) await new Promise<void>((r) => { gate.release = r; });
      },
    }),
  });
  const { store } = await backend.open('agent-b', 'disk0', 32 * MiB);
  const data = pattern(12 * MiB, 2);
  let acked = false;
  const p = store.submit([{ offset: 0, length: data.length, data }], 7).then(() => { acked = true; });
  while (!gate.release) await ticks(10);
  await ticks(200);
  t.notOk(acked, 'not acknowledged while one Put Page is unconfirmed');
  t.equal(store.lastDurableSeq, 0, 'and the durable sequence has not moved');
  sameBytes(t, await store.read(0, 4096), data.subarray(0, 4096), 'a read sees the accepted write meanwhile');
  gate.release();
  await p;
  t.ok(acked, 'acknowledged once the held call was confirmed');
  t.equal(store.lastDurableSeq, 7);
  await store.close();
});

t.test('a read racing the confirmation of a write it overlays still returns that write (staging memory is reused after)', async (t) => {
  let holdPut: Promise<void> | null = null;
  let releasePut: (() => void) | null = null;
  let releaseDownload: (() => void) | null = null;
  let downloaded = false;
  const backend = await backendOn(t, await azurite(), {
    ops: (inner) => new Proxy(inner, {
      get(target, prop, recv) {
        const v = Reflect.get(target, prop, recv) as unknown;
        if (typeof v !== 'function') return v;
        const call = (...args: unknown[]) => (v as (...a: unknown[]) => Promise<unknown>).apply(target, args);
        if (prop === 'putPages') return async (...args: unknown[]) => { if (holdPut) await holdPut; return call(...args); };
        // the blob's bytes are fetched at once, the answer arrives only when released
        if (prop === 'download') return async (...args: unknown[]) => { const r = await call(...args); downloaded = true; await new Promise<void>((res) => { releaseDownload = res; }); return r; };
        return call;
      },
    }),
  });
  const { store } = await backend.open('agent-r', 'disk0', 16 * MiB);
  holdPut = new Promise<void>((r) => { releasePut = r; });
  const first = Buffer.alloc(4096, 0xaa);
  const acked = store.submit([{ offset: 0, length: 4096, data: first }], 1);
  const read = store.read(0, 8192); // half of it is not overlaid: the blob is downloaded
  while (!downloaded) await ticks(10);
  holdPut = null;
  releasePut!();
  await acked; // confirmed: its staging copy is released while the read waits
  await store.submit([{ offset: MiB, length: 4096, data: Buffer.alloc(4096, 0xbb) }], 2);
  releaseDownload!();
  const got = await read;
  sameBytes(t, got.subarray(0, 4096), first, 'the accepted write, not what later took its staging memory');
  sameBytes(t, got.subarray(4096), Buffer.alloc(4096), 'and the blob\'s bytes beyond it');
  await store.close();
});

t.test('retry layer: transient failures retried with backoff; exhausted -> MOB_ERR_TARGET_UNAVAILABLE; auth and quota at once', async (t) => {
  const a = await azurite();
  let failPuts = 2;
  const backend = await backendOn(t, a, {
    retry: { maxAttempts: 4, baseDelayMs: 5, maxDelayMs: 20, totalBudgetMs: 10_000 },
    ops: (inner) => hooked(inner, { putPages: () => { if (failPuts-- > 0) throw httpError(503, 'ServerBusy'); } }),
  });
  const { store } = await backend.open('agent-c', 'disk0', 8 * MiB);
  const d = pattern(4096, 3);
  await store.submit([{ offset: 0, length: 4096, data: d }], 1);
  t.equal(backend.stats.retries, 2, 'two 503s were retried');
  sameBytes(t, await store.read(0, 4096), d, 'and the write landed');
  await store.close();

  let resets = 0;
  const down = await backendOn(t, a, {
    retry: { maxAttempts: 3, baseDelayMs: 5, maxDelayMs: 10, totalBudgetMs: 10_000 },
    ops: (inner) => hooked(inner, { putPages: () => { resets++; throw Object.assign(new Error('read ECONNRESET'), { code: 'ECONNRESET' }); } }),
  });
  const { store: s2 } = await down.open('agent-c', 'disk1', 8 * MiB);
  const err = await s2.submit([{ offset: 0, length: 4096, data: d }], 5).catch((e: unknown) => e);
  t.ok(err instanceof MobilityError && err.code === 'MOB_ERR_TARGET_UNAVAILABLE', `gave up with ${(err as MobilityError).code}`);
  t.match((err as Error).message, /3 attempts/, 'the message says how often it tried');
  t.equal(resets, 3, 'exactly maxAttempts tries');
  t.equal(s2.lastDurableSeq, 0, 'nothing unconfirmed was acknowledged');
  const again = await s2.submit([{ offset: 0, length: 4096, data: d }], 6).catch((e: unknown) => e);
  t.equal((again as MobilityError).code, 'MOB_ERR_TARGET_UNAVAILABLE', 'a failed store refuses later writes with the same code');
  await s2.close();

  let authTries = 0;
  const refused = await backendOn(t, a, { ops: (inner) => hooked(inner, { putPages: () => { authTries++; throw httpError(403, 'AuthenticationFailed'); } }) });
  const { store: s3 } = await refused.open('agent-c', 'disk2', 8 * MiB);
  const e3 = await s3.submit([{ offset: 0, length: 4096, data: d }], 1).catch((e: unknown) => e);
  t.equal((e3 as MobilityError).code, 'MOB_ERR_TARGET_AUTH');
  t.equal(authTries, 1, 'an auth failure is not retried');
  t.match((e3 as Error).message, /credentials file/, 'and says what to fix');
  await s3.close();

  const full = await backendOn(t, a, { ops: (inner) => hooked(inner, { snapshot: () => { throw httpError(409, 'SnapshotCountExceeded'); } }) });
  const { store: s4 } = await full.open('agent-c', 'disk3', 8 * MiB);
  await s4.submit([{ offset: 0, length: 4096, data: d }], 1);
  const e4 = await s4.preparePoint('p1').catch((e: unknown) => e);
  t.equal((e4 as MobilityError).code, 'MOB_ERR_TARGET_QUOTA', 'too many snapshots is a quota error');
  await s4.close();
});

t.test('Azurite killed under a batch: the batch fails coded, nothing unconfirmed is acked, what was acked survives', async (t) => {
  const a = await startAzurite(t); // its own emulator: this one is killed
  let puts = 0;
  let killed: Promise<void> | null = null;
  const backend = await backendOn(t, a, {
    retry: { maxAttempts: 3, baseDelayMs: 20, maxDelayMs: 50, totalBudgetMs: 5_000 },
    ops: (inner) => hooked(inner, { putPages: () => { if (++puts === 6 && !killed) killed = a.kill('SIGKILL'); } }),
  });
  const { store } = await backend.open('agent-d', 'disk0', 64 * MiB);
  const first = pattern(4 * MiB, 4);
  await store.submit([{ offset: 0, length: first.length, data: first }], 1);
  const second = pattern(32 * MiB, 5);
  const err = await store.submit([{ offset: 8 * MiB, length: second.length, data: second }], 2).catch((e: unknown) => e);
  t.ok(killed, 'Azurite was killed while the batch was in flight');
  await killed;
  t.equal((err as MobilityError).code, 'MOB_ERR_TARGET_UNAVAILABLE', `the batch failed with ${(err as MobilityError).code}`);
  t.equal(store.lastDurableSeq, 1, 'only the confirmed batch is durable');
  await store.close();
  await a.restart();
  const after = await backendOn(t, a, { container: backend.container });
  const { store: re } = await after.open('agent-d', 'disk0', 64 * MiB);
  t.ok(re.lastDurableSeq <= 1, `the recorded durable sequence (${re.lastDurableSeq}) is never ahead of what was confirmed`);
  sameBytes(t, await re.read(0, first.length), first, 'the acknowledged batch survived');
  await re.submit([{ offset: 8 * MiB, length: second.length, data: second }], 2);
  sameBytes(t, await re.read(8 * MiB, second.length), second, 'the resent batch lands once the target is back');
  await re.close();
});

t.test('credentials: wrong key refused coded at init, nothing created; exposed file refused; SAS works; secrets never logged', async (t) => {
  const a = await azurite();
  const dir = cleanup(t).dir('az-creds-');
  const logLines: string[] = [];
  const sink = new PassThrough();
  sink.on('data', (d: Buffer) => logLines.push(d.toString('utf8')));
  const log = winston.createLogger({ level: 'debug', format: winston.format.json(), transports: [new winston.transports.Stream({ stream: sink })] });

  const wrongKey = Buffer.from('definitely not the key of this account, padded to 64 bytes.....').toString('base64');
  const wrongFile = path.join(dir, 'wrong.json');
  await fsp.writeFile(wrongFile, JSON.stringify({ accountName: a.accountName, accountKey: wrongKey }), { mode: 0o600 });
  const container = freshContainer('wrong');
  const bad = new AzureBackend({ accountUrl: a.url, container, credentials: await loadAzureCredentials(wrongFile), log, retry: { maxAttempts: 2, baseDelayMs: 5 } });
  const e = await bad.init().catch((x: unknown) => x);
  t.equal((e as MobilityError).code, 'MOB_ERR_TARGET_AUTH', 'a wrong account key is MOB_ERR_TARGET_AUTH');
  t.match((e as Error).message, new RegExp(`${a.accountName}.*${container}|${container}.*${a.accountName}`, 's'), 'naming the account and the container');
  t.match((e as Error).message, /wrong\.json/, 'and the credentials file to fix');
  t.notMatch((e as Error).message, wrongKey, 'without the key');
  const good = await backendOn(t, a, { container });
  t.notOk(await good.blobOps.containerExists() && (await good.agents()).length > 0, 'the refused backend created no replica');

  const exposed = path.join(dir, 'exposed.json');
  await fsp.writeFile(exposed, JSON.stringify({ accountName: a.accountName, accountKey: a.accountKey }), { mode: 0o644 });
  await fsp.chmod(exposed, 0o644);
  const ex = await loadAzureCredentials(exposed).catch((x: unknown) => x);
  t.equal((ex as MobilityError).code, 'MOB_ERR_CONFIG', 'a credentials file readable by others is refused');
  t.match((ex as Error).message, /chmod 600/, 'with the fix');
  const missing = await loadAzureCredentials(path.join(dir, 'nope.json')).catch((x: unknown) => x);
  t.equal((missing as MobilityError).code, 'MOB_ERR_CONFIG', 'a missing file is MOB_ERR_CONFIG');

  const sas = generateAccountSASQueryParameters({
    expiresOn: new Date(Date.now() + 3_600_000), permissions: AccountSASPermissions.parse('rwdlacup'),
    resourceTypes: AccountSASResourceTypes.parse('sco').toString(), services: AccountSASServices.parse('b').toString(),
  }, new StorageSharedKeyCredential(a.accountName, a.accountKey)).toString();
  const sasFile = path.join(dir, 'sas.json');
  await fsp.writeFile(sasFile, JSON.stringify({ sasToken: sas }), { mode: 0o600 });
  const viaSas = new AzureBackend({ accountUrl: a.url, container: freshContainer('sas'), credentials: await loadAzureCredentials(sasFile), log });
  await viaSas.init();
  const { store } = await viaSas.open('agent-e', 'disk0', 4 * MiB);
  const d = pattern(8192, 6);
  await store.submit([{ offset: 4096, length: d.length, data: d }], 1);
  const ref = await store.preparePoint('p1');
  await store.close();
  const img = await viaSas.materialize('agent-e', 'disk0', { pointId: 'p1', seq: 1, sizeBytes: 4 * MiB, ref }, async () => [], 'test-failover');
  t.notMatch(img.location, /sig=|\?/, 'an image location carries no SAS token');
  t.ok((await viaSas.images('agent-e')).length === 1, 'a SAS token with blob permissions does everything the backend needs');
  const all = logLines.join('');
  const sig = /sig=([^&]+)/.exec(sas)![1];
  t.ok(all.length > 0, 'the backend logged');
  t.notOk(all.includes(decodeURIComponent(sig)) || all.includes(sig), 'the SAS signature never appears in the log');
  t.notOk(all.includes(a.accountKey) || all.includes(wrongKey), 'no account key appears in the log');
  t.notOk(JSON.stringify(await loadAzureCredentials(sasFile)).includes(sig), 'the credentials object never serialises its secret');
});

t.test('digests and downloads read only valid page ranges; disks over 8 TiB are refused before anything is created', async (t) => {
  const backend = await backendOn(t, await azurite());
  const { store } = await backend.open('agent-f', 'disk0', 256 * MiB);
  const d = pattern(64 * 1024, 7);
  await store.submit([{ offset: 100 * MiB, length: d.length, data: d }], 1);
  const before = backend.stats.bytesDownloaded;
  const digests = await store.pageDigests(0, (256 * MiB) / 4096, 4096);
  t.equal(digests.length, (256 * MiB / 4096) * 8, 'one digest per page');
  const fetched = backend.stats.bytesDownloaded - before;
  t.ok(fetched < 8 * MiB, `digesting a 256 MiB disk holding 64 KiB downloaded ${fetched} bytes (valid ranges only)`);
  const ref = await store.preparePoint('p1');
  await store.close();
  const img = await backend.materialize('agent-f', 'disk0', { pointId: 'p1', seq: 1, sizeBytes: 256 * MiB, ref }, async () => [], 'test-failover');
  const out = path.join(cleanup(t).dir('az-dl-'), 'disk0.img');
  const dlBefore = backend.stats.bytesDownloaded;
  let lastProgress = 0;
  await backend.download(img, out, (done) => { lastProgress = done; });
  t.ok(backend.stats.bytesDownloaded - dlBefore < 8 * MiB, 'the download fetched only the valid ranges');
  const st = await fsp.stat(out);
  t.equal(st.size, 256 * MiB, 'the local image has the disk size');
  t.ok(st.blocks * 512 < 16 * MiB, 'and is sparse');
  t.ok(lastProgress > 0, 'progress was reported');
  const fh = await fsp.open(out);
  const back = Buffer.alloc(d.length);
  await fh.read(back, 0, d.length, 100 * MiB);
  await fh.close();
  sameBytes(t, back, d, 'the downloaded image holds the point');

  const tooBig = 8 * 1024 ** 4 + 512;
  const e = await backend.open('agent-f', 'huge', tooBig).catch((x: unknown) => x);
  t.equal((e as MobilityError).code, 'MOB_ERR_DISK_TOO_LARGE');
  t.same(await backend.disks('agent-f'), ['disk0'], 'nothing was created for it');
});
