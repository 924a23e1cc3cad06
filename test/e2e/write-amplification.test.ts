/**
 * What a small change costs on the target: an incremental pass that ships single changed pages
 * of 64 KiB blocks writes those pages to the replica, not whole blocks (real server and agent
 * on loopback; the server's own count of bytes written, from /metrics).
 */
import t from 'tap';
import crypto from 'node:crypto';
import fsp from 'node:fs/promises';
import https from 'node:https';
import path from 'node:path';
import { sha256File } from '../../src/util/sample-image.js';
import { parseExposition, sampleValue } from '../prom-text.js';
import { replicateArgs, runCli, startServer, tmpDir, waitFor } from '../helpers.js';

function get(url: string, ca: string, pathname: string, token: string): Promise<string> {
  const u = new URL(url.replace(/^wss:/, 'https:'));
  return new Promise((resolve, reject) => {
    const req = https.request({ host: u.hostname, port: u.port, path: pathname, method: 'GET', ca, headers: { authorization: `Bearer ${token}` } }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (c: string) => (body += c));
      res.on('end', () => (res.statusCode === 200 ? resolve(body) : reject(new Error(`GET ${pathname}: ${res.statusCode} ${body}`))));
    });
    req.on('error', reject);
    req.end();
  });
}

t.test('changed pages cost their own size on the replica, not their blocks', async (t) => {
  const SIZE = 8 * 1024 * 1024;
  const BLOCK = 64 * 1024;
  const PAGE = 4096;
  const dir = await tmpDir(t);
  const img = path.join(dir, 'disk.img');
  await fsp.writeFile(img, crypto.randomBytes(SIZE));
  const srv = await startServer(t, path.join(dir, 'srv'));
  const ca = await fsp.readFile(srv.info.caFile!, 'utf8');
  const metricsToken = (await fsp.readFile(path.join(dir, 'srv', 'metrics-token'), 'utf8')).trim();
  const written = async () => {
    const f = parseExposition(await get(srv.info.url, ca, '/metrics', metricsToken));
    return { sessions: sampleValue(f, 'mobility_sessions') ?? 1, bytes: sampleValue(f, 'mobility_disk_target_written_bytes_total', { agent: 'agent1', disk: 'd0' }) ?? 0 };
  };
  const replicate = async () => {
    const r = await runCli(replicateArgs({ url: srv.info.url, tokenFile: srv.info.tokenFile, caFile: srv.info.caFile!, disk: `${img}=d0`, stateDir: path.join(dir, 'agent') })).done;
    t.equal(r.code, 0, `replicate exit 0 (${r.stderr.slice(-400)})`);
    return JSON.parse(r.stdout) as { disks: { kind: string; stats: { pagesSent: number } }[] };
  };
  const settled = async (atLeast: number) => {
    let w = await written();
    // the session's store closes (and its count is folded in) shortly after the agent leaves
    await waitFor(async () => { w = await written(); return w.sessions === 0 && w.bytes >= atLeast; }, 60_000, 'the session to end and its writes to be counted');
    return w.bytes;
  };

  await replicate();
  const afterInitial = await settled(SIZE);

  // one page changed in each of 16 blocks, at different places in the block
  const fh = await fsp.open(img, 'r+');
  const CHANGED = 16;
  for (let i = 0; i < CHANGED; i++) await fh.write(crypto.randomBytes(PAGE), 0, PAGE, i * 5 * BLOCK + (i % 16) * PAGE);
  await fh.close();
  const inc = await replicate();
  t.equal(inc.disks[0].kind, 'incremental');
  t.equal(inc.disks[0].stats.pagesSent, CHANGED, 'the agent ships the changed pages only');
  const afterIncremental = await settled(afterInitial + CHANGED * PAGE);
  const cost = afterIncremental - afterInitial;
  t.ok(cost <= 2 * CHANGED * PAGE, `the replica took ${cost} bytes for ${CHANGED * PAGE} changed (whole blocks would be ${CHANGED * BLOCK})`);
  t.equal(await sha256File(path.join(dir, 'srv', 'replicas', 'agent1', 'd0', 'replica.img')), await sha256File(img), 'and the replica equals the disk');

  // the first and the last page of 8 blocks: two writes of a page each, not the 15-page span between them
  const fh2 = await fsp.open(img, 'r+');
  const BLOCKS = 8;
  for (let i = 0; i < BLOCKS; i++) {
    for (const pg of [0, BLOCK / PAGE - 1]) await fh2.write(crypto.randomBytes(PAGE), 0, PAGE, (3 + i * 7) * BLOCK + pg * PAGE);
  }
  await fh2.close();
  const inc2 = await replicate();
  t.equal(inc2.disks[0].stats.pagesSent, 2 * BLOCKS, 'two pages per block shipped');
  const afterSecond = await settled(afterIncremental + 2 * BLOCKS * PAGE);
  const cost2 = afterSecond - afterIncremental;
  t.ok(cost2 <= 2 * 2 * BLOCKS * PAGE, `the replica took ${cost2} bytes for ${2 * BLOCKS * PAGE} changed pages at both ends of their blocks (the spans between would be ${BLOCKS * BLOCK})`);
  t.equal(await sha256File(path.join(dir, 'srv', 'replicas', 'agent1', 'd0', 'replica.img')), await sha256File(img), 'and the replica equals the disk again');
});
