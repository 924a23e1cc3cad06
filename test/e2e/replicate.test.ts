/**
 * End to end with real processes: `mobility server` and `mobility replicate` /
 * `mobility verify` as child processes over wss on loopback.
 */
import t from 'tap';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { stopServer } from '../../src/server/spawn.js';
import { churnImage, sha256File, writeSampleImage } from '../../src/util/sample-image.js';
import { replicateArgs, runCli, startServer, tmpDir } from '../helpers.js';

const SIZE = 48 * 1024 * 1024;
const BLOCKS = SIZE / 65536;

t.test('initial, incremental, lost map, corrupted replica, verify', async (t) => {
  const dir = await tmpDir(t);
  const img = path.join(dir, 'disk.img');
  const { kinds } = await writeSampleImage(img, SIZE, 11);
  const srv = await startServer(t, path.join(dir, 'srv'));
  const st = await fsp.stat(srv.info.tokenFile);
  t.equal(st.mode & 0o777, 0o600, 'token file is mode 0600');
  t.equal((await fsp.stat(path.join(dir, 'srv', 'tls', 'ca.key'))).mode & 0o777, 0o600, 'CA key is mode 0600');
  const replica = path.join(dir, 'srv', 'replicas', 'agent1', 'd0', 'replica.img');
  const args = (extra: string[] = []) => replicateArgs({ url: srv.info.url, tokenFile: srv.info.tokenFile, caFile: srv.info.caFile!, disk: `${img}=d0`, stateDir: path.join(dir, 'agent'), extra });
  const run = async (a: string[]) => {
    const r = await runCli(a).done;
    t.equal(r.code, 0, `exit 0 (${r.stderr.slice(-500)})`);
    return JSON.parse(r.stdout) as { disks: { kind: string; reason: string; stats: { blocksSent: number; pagesSent: number; bytesSent: number; bytesChanged: number; zeroBlocks: number; mismatches: { offset: number; length: number }[] } }[] };
  };

  const first = await run(args(['--compress', 'always']));
  t.equal(first.disks[0].kind, 'initial');
  t.equal(first.disks[0].stats.blocksSent, BLOCKS, 'initial pass ships every block once');
  t.ok(first.disks[0].stats.zeroBlocks > BLOCKS / 8, 'zero blocks travel as flags');
  t.ok(first.disks[0].stats.bytesSent < SIZE * 0.7, `compressed and zero-elided on the wire (${first.disks[0].stats.bytesSent} of ${SIZE})`);
  t.equal(await sha256File(replica), await sha256File(img), 'replica equals source after initial');
  const rst = await fsp.stat(replica);
  t.ok(rst.blocks * 512 < SIZE * 0.85, `replica is sparse (${rst.blocks * 512} bytes allocated)`);

  const noop = await run(args());
  t.equal(noop.disks[0].kind, 'incremental');
  t.equal(noop.disks[0].stats.blocksSent, 0, 'an unchanged disk ships nothing');

  const written = await churnImage(img, SIZE, 0.01, 5, kinds);
  const inc = await run(args());
  t.equal(inc.disks[0].kind, 'incremental');
  const changed = written.text + written.random;
  t.ok(inc.disks[0].stats.bytesChanged <= changed * 1.05, `only changed pages shipped (${inc.disks[0].stats.bytesChanged} for ${changed} written)`);
  t.equal(await sha256File(replica), await sha256File(img), 'replica equals source after incremental');

  // lose the agent's digest map: the next pass must be a checksum resync, not a full copy
  await churnImage(img, SIZE, 0.005, 6, kinds);
  await fsp.rm(path.join(dir, 'agent', 'agent1', 'd0.map'));
  const rs = await run(args());
  t.equal(rs.disks[0].kind, 'resync');
  t.match(rs.disks[0].reason, /missing/);
  t.ok(rs.disks[0].stats.pagesSent < (SIZE / 4096) * 0.02, `resync ships only differing pages (${rs.disks[0].stats.pagesSent})`);
  t.equal(await sha256File(replica), await sha256File(img), 'replica equals source after resync');

  // a damaged map is detected (coded warning) and also answered by a resync
  const mapFile = path.join(dir, 'agent', 'agent1', 'd0.map');
  const m = await fsp.readFile(mapFile);
  await fsp.writeFile(mapFile, m.subarray(0, m.length - 100));
  const rs2 = runCli(args());
  const rs2r = await rs2.done;
  t.equal(rs2r.code, 0);
  t.match(rs2r.stderr, /MOB_ERR_STATE_CORRUPT/, 'truncated digest map is reported with its code');
  t.equal(JSON.parse(rs2r.stdout).disks[0].kind, 'resync');

  // corrupt the replica behind the server's back (server stopped), verify finds it, resync repairs it
  await stopServer(srv);
  const fh = await fsp.open(replica, 'r+');
  await fh.write(Buffer.alloc(10000, 0x5a), 0, 10000, 3 * 1024 * 1024 + 100);
  await fh.close();
  const srv2 = await startServer(t, path.join(dir, 'srv'));
  const vargs = ['verify', '--server', srv2.info.url, '--token-file', srv2.info.tokenFile, '--ca', srv2.info.caFile!, '--disk', `${img}=d0`, '--state-dir', path.join(dir, 'agent'), '--agent-id', 'agent1', '--json'];
  const v1 = await runCli(vargs).done;
  t.equal(v1.code, 6, 'verify exits 6 on differences');
  const mism = JSON.parse(v1.stdout).disks[0].stats.mismatches as { offset: number; length: number }[];
  t.same(mism, [{ offset: 3 * 1024 * 1024, length: 12288 }], 'verify reports exactly the damaged pages');
  const args2 = (extra: string[] = []) => replicateArgs({ url: srv2.info.url, tokenFile: srv2.info.tokenFile, caFile: srv2.info.caFile!, disk: `${img}=d0`, stateDir: path.join(dir, 'agent'), extra });
  const fix = await run(args2(['--mode', 'resync']));
  t.equal(fix.disks[0].stats.pagesSent, 3, 'resync repairs exactly the damaged pages');
  const v3 = await runCli(vargs.map((a) => (a === 'agent1' ? 'stranger' : a))).done;
  t.equal(v3.code, 1, 'verify of a disk without a replica fails');
  t.match(v3.stderr, /MOB_ERR_UNKNOWN_DISK/);
  t.equal(await fsp.stat(path.join(dir, 'srv', 'replicas', 'stranger')).then(() => true, () => false), false, 'verify created nothing on the server');
  const v2 = await runCli(vargs).done;
  t.equal(v2.code, 0, 'verify is clean after the repair');
  t.equal(await sha256File(replica), await sha256File(img));
});

t.test('usage and configuration errors exit with their codes', async (t) => {
  const dir = await tmpDir(t);
  const r1 = await runCli(['replicate', '--bogus']).done;
  t.equal(r1.code, 2);
  t.match(r1.stderr, /MOB_ERR_USAGE/);
  const r2 = await runCli(['replicate', '--server', 'wss://127.0.0.1:1', '--token-file', path.join(dir, 'none'), '--disk', 'x']).done;
  t.equal(r2.code, 3);
  t.match(r2.stderr, /MOB_ERR_CONFIG/);
  await fsp.writeFile(path.join(dir, 'tok'), 'x');
  const r3 = await runCli(['replicate', '--server', 'wss://127.0.0.1:1', '--token-file', path.join(dir, 'tok'), '--pin', 'AA'.repeat(32), '--disk', path.join(dir, 'missing.img'), '--state-dir', path.join(dir, 's')]).done;
  t.equal(r3.code, 3);
  t.match(r3.stderr, /MOB_ERR_SOURCE/);
  await fsp.writeFile(path.join(dir, 'small.img'), Buffer.alloc(4096));
  const r4 = await runCli(['replicate', '--server', 'wss://127.0.0.1:1', '--token-file', path.join(dir, 'tok'), '--pin', 'AA'.repeat(32), '--disk', path.join(dir, 'small.img'), '--state-dir', path.join(dir, 's'), '--retry-deadline', '1']).done;
  t.equal(r4.code, 5, 'unreachable server: exit 5 after the retry deadline');
  t.match(r4.stderr, /MOB_ERR_RETRY_EXHAUSTED/);
  const r5 = await runCli(['replicate', '--server', 'wss://127.0.0.1:1', '--token-file', path.join(dir, 'tok'), '--pin', 'AA'.repeat(32), '--disk', path.join(dir, 'small.img'), '--retry-deadline', 'soon']).done;
  t.equal(r5.code, 2, 'a non-numeric retry deadline is a usage error');
  for (const c of ['server', 'replicate', 'verify', 'demo']) {
    const h = await runCli([c, '--help']).done;
    t.equal(h.code, 0);
    t.match(h.stdout, /Usage: mobility/);
  }
});
