/**
 * Hook scripts (runHooks) against real processes: a hook's time is bounded whatever the
 * processes it starts do. A child that left the hook's process group (setsid) and still holds
 * the hook's stdout/stderr must not keep the cut waiting past the hook timeout, and a hook that
 * did not finish in time is a failure even when its own exit code was 0.
 */
import t, { type Test } from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { runHooks } from '../../src/agent/freeze.js';
import { cleanup } from '../cleanup.js';
import { sleep, tmpDir } from '../helpers.js';

const TIMEOUT_MS = 1000;
/** runHooks must answer within the timeout plus this (the bound is timeout + ~1 s). */
const SLACK_MS = 2000;

/** A hooks directory with one executable hook in the 'frozen' phase; the pid files it may write go in dir. */
async function hooksWith(t: Test, name: string, body: string): Promise<{ hooks: string; dir: string }> {
  const dir = await tmpDir(t, 'hooks-');
  const hooks = path.join(dir, 'hooks');
  fs.mkdirSync(path.join(hooks, 'frozen'), { recursive: true });
  fs.writeFileSync(path.join(hooks, 'frozen', name), `#!/bin/sh\nPIDS=${JSON.stringify(dir)}\n${body}\n`, { mode: 0o755 });
  return { hooks, dir };
}

/** Stray sleeps a hook started (by the pid it wrote) are killed when the test ends, even if it fails. */
function reap(t: Test, dir: string, ...names: string[]): void {
  const c = cleanup(t);
  for (const n of names) c.pidFile(path.join(dir, n), 'sleep');
  t.teardown(() => {
    for (const n of names) {
      const pid = readPid(path.join(dir, n));
      if (pid && isSleep(pid)) { try { process.kill(pid, 'SIGKILL'); } catch { /* gone */ } }
    }
  });
}

function readPid(file: string): number | null {
  try {
    const n = Number(fs.readFileSync(file, 'utf8').trim());
    return n > 0 ? n : null;
  } catch {
    return null;
  }
}

/** The pid is a live (not zombie) sleep. */
function isSleep(pid: number): boolean {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    if (stat.slice(stat.lastIndexOf(')') + 2).startsWith('Z')) return false;
    return fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0')[0].endsWith('sleep');
  } catch {
    return false;
  }
}

async function timed<T>(p: Promise<T>): Promise<{ value: T; ms: number }> {
  const t0 = Date.now();
  const value = await p;
  return { value, ms: Date.now() - t0 };
}

t.test('a hook that exits while a setsid child holds its output: bounded, and a failure', async (t) => {
  // setsid puts the sleep in its own session and process group: the group kill cannot reach it,
  // and it keeps the hook's stdout and stderr open for 30 s
  const { hooks, dir } = await hooksWith(t, '10-setsid', 'setsid sleep 30 &\necho $! > "$PIDS/setsid.pid"\necho started\nexit 0');
  reap(t, dir, 'setsid.pid');
  const { value: r, ms } = await timed(runHooks(hooks, 'frozen', {}, TIMEOUT_MS));
  t.ok(ms < TIMEOUT_MS + SLACK_MS, `runHooks returned after ${ms} ms (bound ${TIMEOUT_MS + SLACK_MS} ms)`);
  t.equal(r.length, 1, 'one hook ran');
  t.equal(r[0].ok, false, 'not ok: it did not finish within the timeout');
  t.match(r[0].output, /timed out after 1000 ms/, 'the output says it timed out');
  t.match(r[0].output, /exit 0/, 'and that the hook itself exited 0');
  const pid = readPid(path.join(dir, 'setsid.pid'));
  t.ok(pid, 'the hook wrote its child\'s pid');
});

t.test('a hook waiting on a child sleep: killed with its group at the timeout', async (t) => {
  const { hooks, dir } = await hooksWith(t, '10-child', 'sleep 30 &\necho $! > "$PIDS/child.pid"\nwait');
  reap(t, dir, 'child.pid');
  const { value: r, ms } = await timed(runHooks(hooks, 'frozen', {}, TIMEOUT_MS));
  t.ok(ms < TIMEOUT_MS + SLACK_MS, `runHooks returned after ${ms} ms`);
  t.equal(r[0].ok, false, 'not ok');
  t.match(r[0].output, /timed out after 1000 ms/);
  const pid = readPid(path.join(dir, 'child.pid'));
  t.ok(pid, 'the hook wrote its child\'s pid');
  for (let i = 0; i < 20 && pid && isSleep(pid); i++) await sleep(50);
  t.notOk(pid && isSleep(pid), 'the child in the hook\'s group was killed with it');
});

t.test('a hook that exits 0 leaving a child in its group holding the output: timed out, not ok', async (t) => {
  // the hook's own exit code is 0; the group kill at the timeout ends the child and the pipes
  const { hooks, dir } = await hooksWith(t, '10-bg', 'sleep 30 &\necho $! > "$PIDS/bg.pid"\nexit 0');
  reap(t, dir, 'bg.pid');
  const { value: r, ms } = await timed(runHooks(hooks, 'frozen', {}, TIMEOUT_MS));
  t.ok(ms < TIMEOUT_MS + SLACK_MS, `runHooks returned after ${ms} ms`);
  t.equal(r[0].ok, false, 'a hook that timed out is not ok even with exit code 0');
  t.match(r[0].output, /timed out after 1000 ms/);
  const pid = readPid(path.join(dir, 'bg.pid'));
  for (let i = 0; i < 20 && pid && isSleep(pid); i++) await sleep(50);
  t.notOk(pid && isSleep(pid), 'the child left in the hook\'s group was killed');
});

t.test('hooks that finish in time: ok by exit code, output and environment passed', async (t) => {
  const dir = await tmpDir(t, 'hooks-');
  const hooks = path.join(dir, 'hooks');
  fs.mkdirSync(path.join(hooks, 'pre-freeze'), { recursive: true });
  fs.writeFileSync(path.join(hooks, 'pre-freeze', '10-ok'), '#!/bin/sh\necho "phase=$MOBILITY_PHASE cut=$MOBILITY_CUT_ID"\n', { mode: 0o755 });
  // a daemon that let go of the output is no reason to wait
  fs.writeFileSync(path.join(hooks, 'pre-freeze', '20-daemon'), `#!/bin/sh\nsetsid sleep 30 >/dev/null 2>&1 </dev/null &\necho $! > ${JSON.stringify(path.join(dir, 'daemon.pid'))}\necho daemon started\n`, { mode: 0o755 });
  fs.writeFileSync(path.join(hooks, 'pre-freeze', '30-fails'), '#!/bin/sh\necho broken >&2\nexit 3\n', { mode: 0o755 });
  fs.writeFileSync(path.join(hooks, 'pre-freeze', '40-not-executable'), '#!/bin/sh\nexit 0\n', { mode: 0o644 });
  reap(t, dir, 'daemon.pid');
  const { value: r, ms } = await timed(runHooks(hooks, 'pre-freeze', { MOBILITY_CUT_ID: 'c1' }, 5000));
  t.ok(ms < 4000, `no timeout waited (${ms} ms)`);
  t.same(r.map((x) => [path.basename(x.hook), x.ok]), [['10-ok', true], ['20-daemon', true], ['30-fails', false], ['40-not-executable', false]]);
  t.equal(r[0].output, 'phase=pre-freeze cut=c1');
  t.equal(r[1].output, 'daemon started');
  t.equal(r[2].output, 'broken');
  t.equal(r[3].output, 'not executable');
  t.same(await runHooks(undefined, 'frozen', {}, 1000), [], 'no hooks directory: nothing');
  t.same(await runHooks(path.join(dir, 'missing'), 'frozen', {}, 1000), [], 'no phase directory: nothing');
});
