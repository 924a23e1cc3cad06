/**
 * Continuous protection (see test/protect-harness.ts): failures are explained. A failing
 * pre-freeze hook downgrades the cut to crash-consistent; a frozen-phase hook that outlasts
 * the freeze bound gets the cut failed with MOB_ERR_FREEZE, the filesystem thawed and the
 * failure reported in status.
 *
 * Needs root, losetup, mkfs.ext4, e2fsck, fsfreeze, fio and tracefs: a missing one fails the test.
 */
import t from 'tap';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { runCli, waitFor } from '../helpers.js';
import { Agent, LONG, setup, shAsync, statusArgs } from '../protect-harness.js';

t.test('failures are explained: a failing pre-freeze hook downgrades the cut, a freeze past its bound is thawed and reported', async (t) => {
  const s = await setup(t, 64);
  // a bound long enough for the checksum hook on a loaded machine, short enough to wait for
  const agent = new Agent(s.c, s.args(['--crash-interval', '15s', '--freeze-limit', '8s']));
  t.teardown(() => agent.stop());
  await agent.waitEvent((e) => e.event === 'cut', LONG, 'the first cut');
  await fsp.writeFile(path.join(s.hooks, 'pre-freeze', '20-fail'), '#!/bin/sh\necho "database refused to quiesce" >&2\nexit 3\n', { mode: 0o755 });
  const c = await agent.cut('app');
  t.equal(c.event, 'cut', `the cut is still made ${JSON.stringify(c)}`);
  t.equal(c.kind, 'crash', 'but recorded as crash-consistent');
  t.match(String(c.note), /pre-freeze hook failed/, `with a note: ${String(c.note)}`);
  t.ok(agent.find((e) => e.event === 'hook' && e.ok === false && /quiesce/.test(String(e.output))), 'the hook failure and its output are reported');
  const hooksLog = await fsp.readFile(path.join(s.dir, 'hooks.log'), 'utf8');
  t.match(hooksLog, new RegExp(`post-thaw ${String(c.cutId)} app`), 'post-thaw hooks still ran');
  await fsp.rm(path.join(s.hooks, 'pre-freeze', '20-fail'));

  // a frozen-phase hook that never finishes by itself: it outlasts any freeze bound
  await fsp.writeFile(path.join(s.hooks, 'frozen', '20-slow'), '#!/bin/sh\nexec sleep 600\n', { mode: 0o755 });
  const f = await agent.cut('crash');
  t.equal(f.event, 'cut-failed', 'the cut fails');
  t.equal(f.code, 'MOB_ERR_FREEZE', `with MOB_ERR_FREEZE: ${String(f.message)}`);
  // thawed: a write to the filesystem completes (on a still frozen filesystem it would block until the time limit)
  const w = await shAsync('dd', ['if=/dev/zero', `of=${s.mnt}/after-thaw`, 'bs=4k', 'count=1', 'conv=fsync', 'status=none'], LONG);
  t.equal(w.code, 0, `the filesystem was thawed: a write completes ${w.stderr}`);
  // a health report carries the failure to the server
  let failures = 0;
  await waitFor(async () => {
    const st = await runCli(statusArgs(s.server)).done;
    const d = (JSON.parse(st.stdout) as { disks: { agent: string; freezeFailures: number }[] }).disks.find((x) => x.agent === s.agentId);
    failures = d?.freezeFailures ?? 0;
    return failures >= 1;
  }, LONG, 'status to report the freeze failure');
  t.ok(failures >= 1, `status reports the freeze failure (${failures})`);
  await fsp.rm(path.join(s.hooks, 'frozen', '20-slow'));
  const ok = await agent.cut('crash');
  t.equal(ok.event, 'cut', 'the next cut succeeds once the hook is gone');
  await agent.stop();
});
