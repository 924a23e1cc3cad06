/**
 * The operations commands against a fake operator API (plain HTTP on loopback, no real
 * server): the streamed test failover (--download), its error lines and exit codes, the
 * output of failover, test-failover --cleanup and status, apiStream itself, and the
 * server's --store options. Nothing here needs root.
 */
import fsp from 'node:fs/promises';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import path from 'node:path';
import t, { type Test } from 'tap';
import { MobilityError } from '../../src/errors.js';
import { apiStream } from '../../src/cli/api-client.js';
import { runCli, startServer, tmpDir } from '../helpers.js';

type Handler = (req: http.IncomingMessage, body: Record<string, unknown>, res: http.ServerResponse) => void;

/** A loopback HTTP server answering with `handler`; records each request's method, path and JSON body. */
async function fakeApi(t: Test, handler: Handler): Promise<{ url: string; requests: { method: string; path: string; body: Record<string, unknown> }[] }> {
  const requests: { method: string; path: string; body: Record<string, unknown> }[] = [];
  const srv = http.createServer((req, res) => {
    const parts: Buffer[] = [];
    req.on('data', (d: Buffer) => parts.push(d));
    req.on('end', () => {
      const text = Buffer.concat(parts).toString('utf8');
      const body = text ? JSON.parse(text) as Record<string, unknown> : {};
      requests.push({ method: req.method ?? '', path: req.url ?? '', body });
      handler(req, body, res);
    });
  });
  await new Promise<void>((r) => srv.listen(0, '127.0.0.1', r));
  t.teardown(() => new Promise<void>((r) => { srv.closeAllConnections(); srv.close(() => r()); }));
  return { url: `ws://127.0.0.1:${(srv.address() as AddressInfo).port}`, requests };
}

const POINT = { id: 'p-000042', takenAt: '2025-01-02T03:04:05.000Z', kind: 'crash', frozenMs: 12, disks: { sda: {} } };
const IMAGE = {
  agentId: 'web1', diskId: 'sda', pointId: POINT.id, purpose: 'test-failover', sizeBytes: 1 << 30,
  location: 'https://acct.blob.core.windows.net/mobility/test-failover/web1/p-000042/sda', localPath: null, method: 'snapshot-copy', ms: 850, undoRecords: 0,
};

async function conn(t: Test, url: string): Promise<string[]> {
  const dir = await tmpDir(t, 'cli-ops-');
  const tokenFile = path.join(dir, 'token');
  await fsp.writeFile(tokenFile, 'secret-token\n', { mode: 0o600 });
  return ['--server', url, '--token-file', tokenFile];
}

const ndjson = (res: http.ServerResponse, lines: unknown[], end = true) => {
  res.writeHead(200, { 'content-type': 'application/x-ndjson' });
  for (const l of lines) res.write(JSON.stringify(l) + '\n');
  if (end) res.end();
};

t.test('test-failover --download: streams, shows progress on stderr, prints each image and file', async (t) => {
  const result = { point: POINT, disks: [IMAGE], downloads: [{ diskId: 'sda', file: '/srv/tf/sda.img', bytes: 1 << 30, ms: 4200 }], removed: false };
  const api = await fakeApi(t, (_req, _body, res) => ndjson(res, [
    { type: 'progress', disk: 'sda', doneBytes: 0, totalBytes: 1 << 30 },
    { type: 'progress', disk: 'sda', doneBytes: 1 << 29, totalBytes: 1 << 30 },
    { type: 'progress', disk: 'sda', doneBytes: 1 << 30, totalBytes: 1 << 30 },
    { type: 'result', ...result },
  ]));
  const c = await conn(t, api.url);
  const r = await runCli(['test-failover', ...c, '--agent-id', 'web1', '--download', 'rel/dir']).done;
  t.equal(r.code, 0, r.stderr);
  t.equal(api.requests.length, 1);
  t.equal(api.requests[0].path, '/v1/test-failover');
  t.same(api.requests[0].body, { agent: 'web1', point: 'latest', cleanup: false, download: path.resolve('rel/dir'), stream: true }, 'stream: true and an absolute directory');
  t.match(r.stdout, `  sda: ${IMAGE.location} (snapshot-copy, 850 ms)\n`);
  t.match(r.stdout, /downloaded to \/srv\/tf\/sda\.img \(1\.0 GiB in 4\.2 s\)/);
  t.match(r.stdout, /on the server machine/);
  t.notMatch(r.stdout, /undefined/);
  t.match(r.stderr, /"pct":100/, 'progress reported on stderr (a log record when not on a terminal)');
  t.notMatch(r.stderr, /sentBytes/, 'no bytes-on-the-wire figure for a download');

  const j = await runCli(['test-failover', ...c, '--agent-id', 'web1', '--download', '/abs', '--json']).done;
  t.equal(j.code, 0, j.stderr);
  t.same(JSON.parse(j.stdout), result, '--json: the result, as the unstreamed answer would be');
});

t.test('test-failover --download: an error line fails with its code; a cut-off answer is MOB_ERR_UNREACHABLE', async (t) => {
  let mode = 'error';
  const api = await fakeApi(t, (_req, _body, res) => {
    if (mode === 'error') ndjson(res, [{ type: 'progress', disk: 'sda', doneBytes: 0, totalBytes: 10 }, { type: 'error', code: 'MOB_ERR_UNKNOWN_POINT', message: 'no point p-9' }]);
    else if (mode === 'cut') { ndjson(res, [{ type: 'progress', disk: 'sda', doneBytes: 0, totalBytes: 10 }], false); setTimeout(() => res.socket?.destroy(), 50); }
    else if (mode === 'noresult') ndjson(res, [{ type: 'progress', disk: 'sda', doneBytes: 0, totalBytes: 10 }]);
    else { res.writeHead(401, { 'content-type': 'application/json' }); res.end(JSON.stringify({ code: 'MOB_ERR_AUTH', message: 'missing or wrong bearer token' })); }
  });
  const c = await conn(t, api.url);
  const args = ['test-failover', ...c, '--agent-id', 'web1', '--point', 'p-9', '--download', '/abs'];
  const e = await runCli(args).done;
  t.equal(e.code, 3, 'MOB_ERR_UNKNOWN_POINT exits 3');
  t.match(e.stderr, /MOB_ERR_UNKNOWN_POINT: server: no point p-9/);
  mode = 'cut';
  const cut = await runCli(args).done;
  t.equal(cut.code, 5, 'connection broken mid-answer exits 5');
  t.match(cut.stderr, /MOB_ERR_UNREACHABLE/);
  mode = 'noresult';
  const nr = await runCli(args).done;
  t.equal(nr.code, 5);
  t.match(nr.stderr, /MOB_ERR_UNREACHABLE: the server ended its answer without a result/);
  mode = 'auth';
  const auth = await runCli(args).done;
  t.equal(auth.code, 4, 'an error status before the stream starts keeps its code');
  t.match(auth.stderr, /MOB_ERR_AUTH/);
  const both = await runCli([...args, '--cleanup']).done;
  t.equal(both.code, 2, '--download and --cleanup together: usage');
});

t.test('test-failover without --download, --cleanup, failover and status: text output of the new answers', async (t) => {
  const api = await fakeApi(t, (req, body, res) => {
    const send = (j: unknown) => { res.writeHead(200, { 'content-type': 'application/json' }); res.end(JSON.stringify(j, null, 1)); };
    if (req.url === '/v1/test-failover' && body.cleanup) send({ point: POINT, disks: [IMAGE], downloads: [], removed: true });
    else if (req.url === '/v1/test-failover') send({ point: { ...POINT, suspect: { at: 'x', disks: ['sda'], reason: 'tracking lost' } }, disks: [{ ...IMAGE, method: 'reflink', undoRecords: 3, location: '/data/test-failover/web1/p-000042/sda.img', localPath: '/data/test-failover/web1/p-000042/sda.img' }], downloads: [], removed: false });
    else if (req.url === '/v1/failover') send({ point: POINT, finalCut: { requested: true, pointId: POINT.id, note: '' }, disks: [{ ...IMAGE, purpose: 'failover', location: 'https://acct.blob.core.windows.net/mobility/failover/web1/sda' }] });
    else if (req.url === '/v1/status') {
      send({ disks: [{ agent: 'web1', disk: 'sda', sizeBytes: 1 << 30, initialComplete: true, state: 'target-unavailable', reason: 'MOB_ERR_TARGET_UNAVAILABLE: HTTP 503', connected: true, healthAgeMs: 1000, rpoMs: 60_000, rpoAlert: false, latestPoint: POINT.id, latestAppPoint: null, points: 4, storedBytes: 3 * (1 << 20), dataLagMs: 500, backlogBytes: 0, churnBytesPerSec: 100, freezeFailures: 0, lastFreezeMs: 12, progressPermille: null }] });
    } else { res.writeHead(404); res.end('{}'); }
  });
  const c = await conn(t, api.url);
  const tf = await runCli(['test-failover', ...c, '--agent-id', 'web1']).done;
  t.equal(tf.code, 0, tf.stderr);
  t.equal(api.requests[0].body.stream, undefined, 'no stream without --download');
  t.match(tf.stdout, /^WARNING: p-000042 is suspect on sda: tracking lost/);
  t.match(tf.stdout, '  sda: /data/test-failover/web1/p-000042/sda.img (reflink, 3 undo records, 850 ms)\n');
  t.notMatch(tf.stdout, /undefined|downloaded/);

  const cl = await runCli(['test-failover', ...c, '--agent-id', 'web1', '--cleanup']).done;
  t.equal(cl.code, 0, cl.stderr);
  t.match(cl.stdout, `removed the test-failover images of p-000042:\n  sda: ${IMAGE.location}\n`);

  const asked = api.requests.length;
  const noYes = await runCli(['failover', ...c, '--agent-id', 'web1']).done;
  t.equal(noYes.code, 2, 'failover without --yes, not on a terminal: usage error');
  t.match(noYes.stderr, /failover stops the replication of web1[\s\S]*MOB_ERR_USAGE.*--yes/, 'it says what it would do and how to confirm');
  t.notOk(api.requests.slice(asked).some((r) => r.path === '/v1/failover'), 'and asked the server for nothing');
  const fo = await runCli(['failover', ...c, '--agent-id', 'web1', '--yes']).done;
  t.equal(fo.code, 0, fo.stderr);
  t.match(fo.stdout, '  sda: https://acct.blob.core.windows.net/mobility/failover/web1/sda (snapshot-copy)\n');
  t.match(fo.stdout, /replication is stopped/);

  const st = await runCli(['status', ...c]).done;
  t.equal(st.code, 0, st.stderr);
  const [head, row] = st.stdout.split('\n');
  t.match(head, /POINTS\s+STORED\s+LAST FREEZE/);
  t.match(row, /target-unavailable/);
  t.match(row, /\b4\s+3\.0 MiB\s+12 ms/);
  const sj = await runCli(['status', ...c, '--json']).done;
  t.equal(JSON.parse(sj.stdout).disks[0].storedBytes, 3 * (1 << 20), '--json: the raw answer');
});

t.test('apiStream: lines across chunks, a plain JSON answer, error statuses', async (t) => {
  const api = await fakeApi(t, (req, _body, res) => {
    if (req.url === '/split') {
      res.writeHead(200, { 'content-type': 'application/x-ndjson' });
      res.write('{"a":1}\n{"b"');
      setTimeout(() => { res.write(':"é"}\n\n{"c":3}'); res.end(); }, 20);
    } else if (req.url === '/plain') {
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ x: 1, y: [1, 2] }, null, 1));
    } else {
      res.writeHead(404, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ code: 'MOB_ERR_USAGE', message: 'no such endpoint' }));
    }
  });
  const c = { url: new URL(api.url), token: 't' };
  const got: unknown[] = [];
  for await (const l of apiStream(c, 'POST', '/split', {})) got.push(l);
  t.same(got, [{ a: 1 }, { b: 'é' }, { c: 3 }]);
  const plain: unknown[] = [];
  for await (const l of apiStream(c, 'GET', '/plain')) plain.push(l);
  t.same(plain, [{ x: 1, y: [1, 2] }]);
  const err = await (async () => { for await (const _ of apiStream(c, 'GET', '/nope')) { /* none */ } })().then(() => null, (e: unknown) => e);
  t.ok(err instanceof MobilityError);
  t.equal((err as MobilityError).code, 'MOB_ERR_USAGE');
  const down = await (async () => { for await (const _ of apiStream({ url: new URL('ws://127.0.0.1:9'), token: 't' }, 'GET', '/x')) { /* none */ } })().then(() => null, (e: unknown) => e);
  t.equal((down as MobilityError).code, 'MOB_ERR_UNREACHABLE');
});

t.test('mobility server: --store-credentials needs an azure store; the listening line names the store', async (t) => {
  const dir = await tmpDir(t, 'cli-store-');
  const r = await runCli(['server', '--data-dir', dir, '--listen', '127.0.0.1:0', '--no-tls', '--store-credentials', path.join(dir, 'creds.json')]).done;
  t.equal(r.code, 2);
  t.match(r.stderr, /MOB_ERR_USAGE: --store-credentials is for an azure: store/);
  const bad = await runCli(['server', '--data-dir', dir, '--listen', '127.0.0.1:0', '--no-tls', '--store', 'ftp://x']).done;
  t.equal(bad.code, 2, 'a spec that is neither file: nor azure: is a usage error');
  const s = await startServer(t, dir, { extraArgs: ['--no-tls', '--store', `file:${path.join(dir, 'elsewhere')}`] });
  t.equal((s.info as unknown as { store: string }).store, `file:${path.join(dir, 'elsewhere')}`);
});
