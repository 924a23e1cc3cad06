/**
 * An agent killed inside a cut's freeze leaves the filesystem frozen: the next agent thaws it
 * before it does anything else (its state directory could be on it). Here the freeze is made
 * with fsfreeze before the agent starts, as the dead agent would have left it.
 *
 * Needs root, losetup, mkfs.ext4, fsfreeze and tracefs: a missing one fails the test.
 */
import t from 'tap';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { Agent, LONG, setup, sh, shAsync } from '../protect-harness.js';

t.test('a filesystem left frozen is thawed when the agent starts', async (t) => {
  const s = await setup(t, 64);
  sh('fsfreeze', ['-f', s.mnt]);
  // never left frozen by this test, whatever happens
  t.teardown(() => { try { sh('fsfreeze', ['-u', s.mnt]); } catch { /* not frozen */ } });
  const agent = new Agent(s.c, s.args(['--crash-interval', '15s']));
  t.teardown(() => agent.stop());
  await agent.waitEvent((e) => e.event === 'started', LONG, 'the agent started');
  // not frozen any more: freezing it again succeeds (a frozen filesystem refuses, EBUSY). Right
  // after the start, before the initial pass is over and any cut could freeze it
  const probe = await shAsync('fsfreeze', ['-f', s.mnt], 30_000);
  if (probe.code === 0) sh('fsfreeze', ['-u', s.mnt]);
  t.notOk(agent.events.some((e) => e.event === 'cut' || e.event === 'cut-failed'), 'no cut had started (a failed cut would thaw too)');
  t.equal(probe.code, 0, `the filesystem was thawed at the agent's start (${probe.stderr.trim()})`);
  const w = await shAsync('sh', ['-c', `echo after > '${path.join(s.mnt, 'after-thaw')}' && sync -f '${path.join(s.mnt, 'after-thaw')}'`], 30_000);
  t.equal(w.code, 0, `a write to the filesystem completes (${w.stderr})`);
  t.equal(await fsp.readFile(path.join(s.mnt, 'after-thaw'), 'utf8'), 'after\n');
  const first = await agent.waitEvent((e) => e.event === 'cut' || e.event === 'cut-failed', LONG, 'the first cut');
  t.equal(first.event, 'cut', 'and the first cut freezes and thaws as usual');
  await agent.stop();
});
