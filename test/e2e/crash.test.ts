/**
 * kill -9 of the server and of the agent in the middle of initial and
 * incremental passes, with real processes. After recovery the replica equals
 * the source (sha256), and the work is not redone from zero (asserted on the
 * blocks resent).
 */
import t, { type Test } from 'tap';
import crypto from 'node:crypto';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { spawnServer, stopServer, type SpawnedServer } from '../../src/server/spawn.js';
import { sha256File, writeSampleImage } from '../../src/util/sample-image.js';
import { replicateArgs, runCli, sleep, tmpDir, waitFor } from '../helpers.js';

const SIZE = 64 * 1024 * 1024;
const BLOCKS = SIZE / 65536;

interface Result { disks: { kind: string; stats: { blocksSent: number } }[] }

async function allocated(file: string): Promise<number> {
  try {
    return (await fsp.stat(file)).blocks * 512;
  } catch {
    return 0;
  }
}

async function fileSize(file: string): Promise<number> {
  try {
    return (await fsp.stat(file)).size;
  } catch {
    return 0;
  }
}

async function setup(t: Test) {
  const dir = await tmpDir(t);
  const img = path.join(dir, 'disk.img');
  await writeSampleImage(img, SIZE, 21);
  const dataDir = path.join(dir, 'srv');
  let srv: SpawnedServer = await spawnServer(dataDir);
  const port = srv.info.port;
  t.teardown(() => stopServer(srv));
  const replicaDir = path.join(dataDir, 'replicas', 'agent1', 'd0');
  const args = (extra: string[]) => replicateArgs({ url: srv.info.url, tokenFile: srv.info.tokenFile, caFile: srv.info.caFile!, disk: `${img}=d0`, stateDir: path.join(dir, 'agent'), extra });
  return {
    dir, img, replica: path.join(replicaDir, 'replica.img'), wal: path.join(replicaDir, 'wal.log'), args,
    server: () => srv,
    async restartServer() {
      srv = await spawnServer(dataDir, { port });
    },
  };
}

/** Overwrites 16 MiB (256 blocks) at 8 MiB with random bytes. */
async function change16MiB(img: string): Promise<void> {
  const fh = await fsp.open(img, 'r+');
  await fh.write(crypto.randomBytes(16 * 1024 * 1024), 0, 16 * 1024 * 1024, 8 * 1024 * 1024);
  await fh.close();
}

t.test('server killed with -9 during the initial replication', async (t) => {
  const s = await setup(t);
  const agent = runCli(s.args(['--max-rate', '8M', '--retry-deadline', '60']));
  // killed once more is on the replica than a credit window (32 MiB) can hold in flight, so a
  // restart from zero (>= BLOCKS + 640 blocks) is told apart from a resume (< BLOCKS + 512) however slow fsync is
  const persistedAtKill = 40 * 1024 * 1024;
  await waitFor(async () => (await allocated(s.replica)) > persistedAtKill, 60_000, 'initial replication to be under way');
  s.server().child.kill('SIGKILL');
  await sleep(700);
  t.equal(agent.child.exitCode, null, 'the agent is still running (retrying)');
  await s.restartServer();
  const r = await agent.done;
  t.equal(r.code, 0, 'exit 0', { stderr: r.stderr.slice(-400) });
  t.match(r.stderr, /reconnecting/, 'the agent reconnected');
  const res = JSON.parse(r.stdout) as Result;
  t.ok(res.disks[0].stats.blocksSent < BLOCKS + persistedAtKill / (64 * 1024), `did not start again from zero: ${res.disks[0].stats.blocksSent} blocks sent for ${BLOCKS}`);
  t.equal(await sha256File(s.replica), await sha256File(s.img), 'replica equals source');
});

t.test('agent killed with -9 during the initial replication, then rerun', async (t) => {
  const s = await setup(t);
  const agent = runCli(s.args(['--max-rate', '6M']));
  await waitFor(async () => (await allocated(s.replica)) > 24 * 1024 * 1024, 30_000, 'initial replication half done');
  agent.child.kill('SIGKILL');
  await agent.done;
  const r = await runCli(s.args([])).done;
  t.equal(r.code, 0, 'exit 0', { stderr: r.stderr.slice(-400) });
  const res = JSON.parse(r.stdout) as Result;
  t.equal(res.disks[0].kind, 'initial', 'the rerun resumes the initial replication');
  t.ok(res.disks[0].stats.blocksSent < BLOCKS * 0.8, `the rerun resent ${res.disks[0].stats.blocksSent} of ${BLOCKS} blocks`);
  t.equal(await sha256File(s.replica), await sha256File(s.img), 'replica equals source');
});

t.test('server killed with -9 during an incremental pass (WAL replay)', async (t) => {
  const s = await setup(t);
  t.equal((await runCli(s.args([])).done).code, 0, 'initial');
  await change16MiB(s.img);
  const agent = runCli(s.args(['--max-rate', '4M', '--retry-deadline', '60']));
  await waitFor(async () => (await fileSize(s.wal)) > 5 * 1024 * 1024, 30_000, 'incremental pass to be under way');
  s.server().child.kill('SIGKILL');
  await sleep(500);
  await s.restartServer();
  const r = await agent.done;
  t.equal(r.code, 0, 'exit 0', { stderr: r.stderr.slice(-400) });
  const res = JSON.parse(r.stdout) as Result;
  t.equal(res.disks[0].kind, 'incremental');
  t.ok(res.disks[0].stats.blocksSent < 256 * 1.3, `${res.disks[0].stats.blocksSent} blocks sent for 256 changed`);
  t.equal(await fileSize(s.wal), 0, 'WAL checkpointed after the pass');
  t.equal(await sha256File(s.replica), await sha256File(s.img), 'replica equals source');
});

t.test('agent killed with -9 during an incremental pass, then rerun', async (t) => {
  const s = await setup(t);
  t.equal((await runCli(s.args([])).done).code, 0, 'initial');
  await change16MiB(s.img);
  const agent = runCli(s.args(['--max-rate', '4M']));
  await waitFor(async () => (await fileSize(s.wal)) > 12 * 1024 * 1024, 30_000, 'incremental pass three quarters done');
  agent.child.kill('SIGKILL');
  await agent.done;
  const r = await runCli(s.args([])).done;
  t.equal(r.code, 0, 'exit 0', { stderr: r.stderr.slice(-400) });
  const res = JSON.parse(r.stdout) as Result;
  t.equal(res.disks[0].kind, 'incremental');
  // acked pages reach the persisted map within about a second, so the rerun resends less than everything
  t.ok(res.disks[0].stats.blocksSent < 256, `the rerun resent ${res.disks[0].stats.blocksSent} of 256 changed blocks`);
  t.equal(await sha256File(s.replica), await sha256File(s.img), 'replica equals source');
});
