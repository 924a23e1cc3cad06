/**
 * The Quick start's demo (`mobility demo`, what scripts/demo.sh runs after installing the
 * prerequisites), as a new user runs it, without a terminal:
 *   - as root: the whole product (server, registered agent daemon, enable, initial sync, three
 *     recovery points, a test failover of the middle one checked by e2fsck and the checksums of
 *     every file, the console URL), exit 0, and nothing left behind (loop device, mounts, trace
 *     instance, processes);
 *   - --files: the file-based demo (initial, incremental, verify, sha256 equal).
 *
 * Needs root, tracefs, losetup, mkfs.ext4, e2fsck and fsfreeze: a missing one fails the test.
 */
import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { fullDemoBlocker } from '../../src/cli/demo-full.js';
import { cleanup, runCli, tmpDir, traceInstancesOf, waitFor } from '../helpers.js';

const LONG = 400_000;

t.test('mobility demo as root: the whole product, then nothing left behind', async (t) => {
  t.equal(fullDemoBlocker(), null, 'this machine can run the whole-product demo (root, tracefs, the tools)');
  const dir = await tmpDir(t, 'demo-');
  const c = cleanup(t);
  const run = runCli(['demo', '--dir', dir]);
  let seen = '';
  let registered = false;
  run.child.stdout!.on('data', (d: Buffer) => {
    seen += d.toString();
    // registered for cleanup as soon as the demo names it (a killed test leaves nothing)
    const loop = /(\/dev\/loop\d+) mounted at/.exec(seen);
    if (loop && !registered) { registered = true; c.loop(loop[1]!); }
  });
  const r = await Promise.race([run.done, new Promise<never>((_, rej) => setTimeout(() => rej(new Error('the demo did not finish')), LONG).unref())]);
  t.equal(r.code, 0, r.code === 0 ? 'the demo succeeds' : `the demo failed: ${r.stderr.slice(-2000)}\n${r.stdout.slice(-3000)}`);
  const o = r.stdout;
  const agent = /registered as (\S+)/.exec(o)?.[1];
  t.ok(agent, 'an agent was registered');
  if (agent) c.traceInstances(agent);
  for (const want of [/listening at wss:\/\/127\.0\.0\.1:\d+/, /agent pid \d+, connected/, /preflight checks passed/, /continuous: every write is tracked/,
    /point \S+: 4 files added \(12 files/, /point \S+: 4 files added \(20 files/, /e2fsck -fn clean/, /16 files: checksums EQUAL to the disk's at the point; files written after it: absent/,
    /test failover cleaned up/, /data\s+continuous/, /console \(dashboard\): https:\/\/127\.0\.0\.1:\d+\/console\/ \(operator demo, password in \S+console-password/, /^RESULT: protected/m]) {
    t.match(o, want, `the demo shows ${want}`);
  }
  // nothing left behind
  const loop = /(\/dev\/loop\d+) mounted at/.exec(o)?.[1];
  t.ok(loop, 'the demo names its loop device');
  await waitFor(() => !fs.readFileSync('/proc/self/mountinfo', 'utf8').includes(dir), 30_000, 'no mount left under the work directory');
  t.notOk(fs.readFileSync('/proc/self/mountinfo', 'utf8').includes(dir), 'no mount left');
  if (loop) t.notOk(fs.existsSync(`/sys/block/${path.basename(loop)}/loop/backing_file`) && fs.readFileSync(`/sys/block/${path.basename(loop)}/loop/backing_file`, 'utf8').includes(dir), 'the loop device is detached');
  if (agent) t.same(traceInstancesOf(agent).filter((n) => n.startsWith(`mobility-${agent}-`)), [], 'no trace instance left');
  t.notOk(fs.existsSync(path.join(dir, 'mnt', 'batch-0')), 'the disk is no longer mounted in the work directory');
});

t.test('mobility demo --files: the file-based demo', async (t) => {
  const dir = await tmpDir(t, 'demo-files-');
  const r = await runCli(['demo', '--files', '--size', '32M', '--dir', dir]).done;
  t.equal(r.code, 0, r.stderr);
  t.match(r.stdout, /initial: initial in/);
  t.match(r.stdout, /incremental: incremental in/);
  t.match(r.stdout, /no differences/);
  t.match(r.stdout, /RESULT: the replica equals the source/);
  t.equal((r.stdout.match(/EQUAL/g) ?? []).length, 2, 'sha256 equal after the initial and the incremental pass');
  const usage = await runCli(['demo', '--size', '32M']).done;
  t.equal(usage.code, 2, '--size without --files is a usage error as root');
});
