/**
 * Continuous protection (see test/protect-harness.ts): repeated kill -9 of the agent under
 * heavy churn never costs a rescan (other than the documented trace-read window, answered by
 * a checksum scan), and the next point is exact.
 *
 * Needs root, losetup, mkfs.ext4, e2fsck, fsfreeze, fio and tracefs: a missing one fails the test.
 */
import t from 'tap';
import { Agent, LONG, TORN_READ, Workload, materializeAndCheck, setup } from '../protect-harness.js';

t.test('repeated kill -9 of the agent under heavy churn never costs a rescan, and the next point is exact', async (t) => {
  const s = await setup(t, 128);
  let agent = new Agent(s.c, s.args(['--crash-interval', '15s']));
  t.teardown(() => agent.stop());
  await agent.waitEvent((e) => e.event === 'cut', LONG, 'the first cut');
  const load = new Workload(s.c, s);
  let rescans = 0;
  let readWindow = 0;
  const why: string[] = [];
  for (let k = 0; k < 6; k++) {
    // a random moment of the drain cycle, after the load wrote more (paced on its progress)
    await load.advance(2 + Math.floor(Math.random() * 6), `writes before kill ${k + 1}`);
    await agent.kill9();
    agent = new Agent(s.c, s.args(['--crash-interval', '15s']));
    const st = await agent.waitEvent((e) => e.event === 'started', LONG, `restart ${k + 1}`);
    const r = (st.scanRequired as Record<string, string | null>).d0;
    if (r === TORN_READ && st.trackerResumed === true) readWindow++;
    else if (r !== null || st.trackerResumed !== true) {
      rescans++;
      why.push(`restart ${k + 1}: trackerResumed ${String(st.trackerResumed)}, ${String(r)}`);
    }
    await agent.waitEvent((e) => e.event === 'state', LONG, `state after restart ${k + 1}`);
  }
  t.ok(load.running, 'the load ran through all the kills');
  t.equal(rescans, 0, `six kills -9 at random moments under load, no rescan other than the documented trace-read window${why.length ? ` (${why.join('; ')})` : ''}`);
  t.comment(`${readWindow} of 6 kills landed inside a trace read and cost a checksum scan`);
  await load.stop();
  const c = await agent.cut('app');
  t.equal(c.event, 'cut', 'a cut after the kills');
  await materializeAndCheck(t, s, String(c.pointId), String(c.cutId));
  await agent.stop();
});
