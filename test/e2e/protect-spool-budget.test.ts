/**
 * Spooled cuts over budget (see test/protect-harness.ts for the rig): ext4 on a loop device
 * under fio/dd load with a 128 KiB spool budget. A remainder over the budget is never read: the
 * cut thaws, converges further and freezes again, or fails coded (MOB_ERR_CUT naming the
 * budget); no recorded cut spooled more than the budget; the points that are recorded are exact.
 *
 * Needs root, losetup, mkfs.ext4, e2fsck, fsfreeze, fio and tracefs: a missing one fails the test.
 * Paced on the workload's progress, never on elapsed time.
 */
import t from 'tap';
import { Agent, LONG, Workload, materializeAndCheck, setup } from '../protect-harness.js';

t.test('a remainder over the spool budget converges further before freezing again; recorded points stay exact', async (t) => {
  const s = await setup(t, 192);
  const budget = 128 * 1024;
  const agent = new Agent(s.c, s.args(['--crash-interval', '60m', '--app-interval', '60m', '--spool-budget', '128K']));
  t.teardown(() => agent.stop());
  await agent.waitEvent((e) => e.event === 'pass-done' && e.kind === 'initial', LONG, 'initial sync');
  const first = await agent.waitEvent((e) => e.event === 'cut' || e.event === 'cut-failed', LONG, 'the first cut');
  const points = first.event === 'cut' ? [{ pointId: String(first.pointId), cutId: String(first.cutId) }] : [];
  const load = new Workload(s.c, s);
  await load.advance(10, 'the workload to get going');
  const outcomes = [];
  for (let k = 0; k < 4; k++) {
    const c = await agent.cut('crash');
    outcomes.push(c);
    if (c.event === 'cut') points.push({ pointId: String(c.pointId), cutId: String(c.cutId) });
    else t.match(String(c.message), /spool budget|in flight|changed while frozen/, `a failed cut says why: ${c.code} ${c.message}`);
    await load.advance(5);
  }
  const recorded = outcomes.filter((c) => c.event === 'cut');
  t.ok(recorded.every((c) => Number(c.spoolBytes) <= budget), `no recorded cut spooled more than the budget (${recorded.map((c) => c.spoolBytes).join(', ')})`);
  const overBudget = outcomes.filter((c) => /over the spool budget|above the \d+-byte spool budget/.test(String(c.note ?? c.message ?? '')));
  t.ok(overBudget.length > 0, `under load the remainder went over the ${budget}-byte budget and the cut converged further (${outcomes.map((c) => `${c.event}: ${String(c.note ?? c.message ?? '')}`).join(' | ')})`);
  t.ok(outcomes.filter((c) => c.event === 'cut-failed').every((c) => c.code === 'MOB_ERR_CUT'), 'a cut that could not converge fails with MOB_ERR_CUT');
  t.ok(overBudget.every((c) => Array.isArray(c.overBudgetFreezesMs) && (c.overBudgetFreezesMs as number[]).length > 0),
    `the freezes thawed at once for being over budget are reported (${overBudget.map((c) => JSON.stringify(c.overBudgetFreezesMs)).join(' ')})`);
  await load.stop();
  const quiet = await agent.cut('app');
  t.equal(quiet.event, 'cut', `once the load stops, a cut fits the budget ${JSON.stringify(quiet)}`);
  if (quiet.event === 'cut') points.push({ pointId: String(quiet.pointId), cutId: String(quiet.cutId) });
  for (const p of points) await materializeAndCheck(t, s, p.pointId, p.cutId);
});
