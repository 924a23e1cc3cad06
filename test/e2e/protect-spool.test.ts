/**
 * Spooled cuts (see test/protect-harness.ts for the rig): ext4 on a loop device under fio/dd
 * load; each cut reads its remainder into a spool while frozen and ships it after the thaw.
 *   - a spool that spills from memory to its file still gives exact points: every point's
 *     test-failover image passes `e2fsck -fn` and matches the checksums taken inside its frozen
 *     window, and the spool file is gone afterwards;
 * (a remainder over the spool budget: protect-spool-budget.test.ts)
 *
 * Needs root, losetup, mkfs.ext4, e2fsck, fsfreeze, fio and tracefs: a missing one fails the test.
 * Paced on the workload's progress, never on elapsed time.
 */
import fs from 'node:fs';
import path from 'node:path';
import t from 'tap';
import { Agent, LONG, Workload, materializeAndCheck, setup } from '../protect-harness.js';

t.test('spooled cuts: the remainder spills to the spool file and every point is exact', async (t) => {
  const s = await setup(t, 192);
  // 64 KiB of memory: any remainder beyond one or two blocks goes to STATE-DIR/<agent>/cut.spool
  const agent = new Agent(s.c, s.args(['--crash-interval', '60m', '--app-interval', '60m', '--spool-memory', '64K']));
  t.teardown(() => agent.stop());
  await agent.waitEvent((e) => e.event === 'pass-done' && e.kind === 'initial', LONG, 'initial sync');
  const first = await agent.waitEvent((e) => e.event === 'cut', LONG, 'the first cut');
  const points = [{ pointId: String(first.pointId), cutId: String(first.cutId) }];
  const load = new Workload(s.c, s);
  await load.advance(10, 'the workload to get going');
  const cuts = [];
  for (let k = 0; k < 4; k++) {
    const c = await agent.cut(k % 2 ? 'app' : 'crash');
    t.equal(c.event, 'cut', `cut ${k + 1} under load is recorded ${JSON.stringify(c)}`);
    if (c.event === 'cut') {
      points.push({ pointId: String(c.pointId), cutId: String(c.cutId) });
      cuts.push(c);
    }
    t.ok(load.running, 'under load');
    await load.advance(5);
  }
  t.ok(cuts.some((c) => Number(c.spoolBytes) > 0), `the cuts under load spooled a remainder (${cuts.map((c) => c.spoolBytes).join(', ')} bytes)`);
  t.ok(cuts.some((c) => Number(c.spoolFileBytes) > 0), `and part of it went through the spool file (${cuts.map((c) => c.spoolFileBytes).join(', ')} bytes)`);
  // the spool lives in the agent's own state directory (STATE-DIR/<agent>/), never shared with another agent
  const spools = fs.readdirSync(path.join(s.dir, 'agent'), { recursive: true }).map(String).filter((f) => f.endsWith('cut.spool'));
  t.same(spools, [], 'no spool file is left after the cuts');
  await load.stop();
  for (const p of points) await materializeAndCheck(t, s, p.pointId, p.cutId);
});

