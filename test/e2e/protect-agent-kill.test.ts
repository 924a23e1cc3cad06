/**
 * Continuous protection (see test/protect-harness.ts): 20 kills -9 of the agent at random
 * moments under fio/dd churn never cost a scan, not even a kill inside a read of the trace
 * (the shadow trace instance still holds what that read took: see src/source/tracker/tracefs.ts),
 * and at the end the replica equals the disk.
 *
 * The kill moments come from a seeded PRNG (MOBILITY_KILL_SEED to replay a run; the seed is
 * printed) and are paced on progress, never on time: before each kill the agent has restarted,
 * is continuous, and shipped a crash cut; then the load does one more round, then a random
 * delay of up to 1 s lands the kill anywhere in the 100 ms drain cycle.
 *
 * Needs root, losetup, mkfs.ext4, e2fsck, fsfreeze, fio, cmp and tracefs: a missing one fails the test.
 */
import t from 'tap';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { runCli, sleep } from '../helpers.js';
import { Rng } from '../fuzz-mutator.js';
import { Agent, LONG, Workload, materializeAndCheck, setup, sh, shAsync, type Ev } from '../protect-harness.js';

const KILLS = 20;

/** Did the agent die inside a read of the trace (its journal's last record is a read without its result)? A cut "T" record is not counted. */
function killedInsideRead(stateDir: string): boolean {
  const logs: string[] = [];
  const walk = (d: string) => {
    for (const e of fs.readdirSync(d, { withFileTypes: true })) {
      if (e.isDirectory()) walk(path.join(d, e.name));
      else if (/^dirty\.log\.\d+$/.test(e.name)) logs.push(path.join(d, e.name));
    }
  };
  walk(stateDir);
  const last = logs.sort((a, b) => Number(a.split('.').pop()) - Number(b.split('.').pop())).pop();
  if (!last) return false;
  const fd = fs.openSync(last, 'r');
  try {
    const size = fs.fstatSync(fd).size;
    const tail = Buffer.alloc(Math.min(size, 8192));
    fs.readSync(fd, tail, 0, tail.length, size - tail.length);
    // "R p s" last: the kernel may have handed events over that the journal never got
    return /(^|\n)R [a-z]+ [a-z]+\n$/.test(tail.toString('latin1'));
  } finally {
    fs.closeSync(fd);
  }
}

t.test(`${KILLS} kills -9 of the agent at random moments under churn never cost a scan, and the replica equals the disk`, async (t) => {
  const seed = Number(process.env.MOBILITY_KILL_SEED ?? Math.floor(Math.random() * 2 ** 31));
  t.comment(`kill seed ${seed} (MOBILITY_KILL_SEED=${seed} replays these delays)`);
  const rng = new Rng(seed);
  const s = await setup(t, 128);
  // periodic cuts off: each round asks for its own crash cut (proof of shipping before the kill).
  // The rounds' agents run no hooks (the frozen-phase hook checksums every file: seconds per cut on
  // a busy machine); the last agent runs them for the app cut that materializeAndCheck verifies.
  const noHooks = path.join(s.dir, 'no-hooks');
  for (const phase of ['pre-freeze', 'frozen', 'post-thaw']) await fsp.mkdir(path.join(noHooks, phase), { recursive: true });
  const args = (hooks = false) => {
    const a = s.args(['--crash-interval', '1h']);
    if (!hooks) a[a.indexOf('--hooks-dir') + 1] = noHooks;
    return a;
  };
  let agent = new Agent(s.c, args());
  t.teardown(() => agent.stop());
  await agent.waitEvent((e) => e.event === 'cut', LONG, 'the first cut');
  const load = new Workload(s.c, s);
  const scans: string[] = [];
  let insideRead = 0;
  const restarted: Agent[] = [];
  for (let k = 1; k <= KILLS; k++) {
    // continuous and shipping: a crash cut converges and ships everything dirty before its point
    await agent.waitEvent((e) => e.event === 'state' && e.state === 'continuous', LONG, `continuous before kill ${k}`);
    const c = await agent.cut('crash');
    if (c.event !== 'cut') throw new Error(`kill ${k}: the cut before it failed: ${JSON.stringify(c)}`);
    await load.advance(1, `writes before kill ${k}`);
    await sleep(rng.int(1000));
    await agent.kill9();
    if (killedInsideRead(path.join(s.dir, 'agent'))) insideRead++;
    agent = new Agent(s.c, args(k === KILLS));
    restarted.push(agent);
    const st = await agent.waitEvent((e) => e.event === 'started', LONG, `restart ${k}`);
    const r = (st.scanRequired as Record<string, string | null>).d0;
    if (r !== null || st.trackerResumed !== true) scans.push(`restart ${k}: trackerResumed ${String(st.trackerResumed)}, scan: ${String(r)}`);
  }
  await agent.waitEvent((e) => e.event === 'state' && e.state === 'continuous', LONG, 'continuous after the last restart');
  t.ok(load.running, 'the load ran through all the kills');
  t.same(scans, [], `${KILLS} kills -9 at random moments under load: every restart resumed tracking with no scan required`);
  t.comment(`${insideRead} of ${KILLS} kills landed inside a read of the trace (recovered from the other instance)`);
  const passes = restarted.flatMap((a) => a.events.filter((e: Ev) => e.event === 'pass'));
  t.same(passes, [], 'no scan pass (resync or incremental) ran after any restart');

  await load.stop();
  // the files of an application-consistent point, fsck-clean (the writes of the whole run are in it)
  const app = await agent.cut('app');
  t.equal(app.event, 'cut', 'an app cut after the load stopped');
  await materializeAndCheck(t, s, String(app.pointId), String(app.cutId));

  // then nothing writes any more: the replica of a last point equals the disk byte for byte
  sh('umount', [s.mnt]);
  sh('sync', []);
  const last = await agent.cut('crash');
  t.equal(last.event, 'cut', 'a last cut with the filesystem unmounted');
  const r = await runCli(['test-failover', '--server', s.server.info.url, '--token-file', s.server.info.tokenFile, '--ca', s.server.info.caFile!,
    '--agent-id', s.agentId, '--point', String(last.pointId), '--download', path.join(s.dir, 'tf-last'), '--json']).done;
  t.equal(r.code, 0, `test-failover of the last point: ${r.stderr}`);
  const image = (JSON.parse(r.stdout) as { downloads: { file: string }[] }).downloads[0]!.file;
  const same = await shAsync('cmp', ['-s', image, s.loop]);
  t.equal(same.code, 0, 'the last point is byte-identical to the disk');
  const fsck = await shAsync('e2fsck', ['-fn', image]);
  t.equal(fsck.code, 0, `e2fsck -fn of the last point is clean ${fsck.code ? fsck.stdout.slice(-1000) : ''}`);
  await runCli(['test-failover', '--server', s.server.info.url, '--token-file', s.server.info.tokenFile, '--ca', s.server.info.caFile!,
    '--agent-id', s.agentId, '--point', String(last.pointId), '--cleanup']).done;
  await fsp.rm(path.dirname(image), { recursive: true, force: true });
  // remounted so the scope's cleanup finds it as it registered it
  execFileSync('mount', ['-o', 'noatime', s.loop, s.mnt]);
  t.ok(fs.existsSync(s.mnt), 'remounted');
  await agent.stop();
});
