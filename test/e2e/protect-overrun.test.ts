/**
 * Continuous protection (see test/protect-harness.ts): a trace-buffer overrun goes
 * resync-required -> resyncing -> continuous and the next point is exact; a lost trace
 * instance (as after a reboot) costs a scan against the digest map, never a full copy.
 *
 * The overrun is provoked by direct I/O until the agent reports it (not for a fixed time).
 * Needs root, losetup, mkfs.ext4, e2fsck, fsfreeze, fio and tracefs: a missing one fails the test.
 */
import t from 'tap';
import { removeTraceInstances, traceInstancesOf } from '../helpers.js';
import { Agent, LONG, Workload, materializeAndCheck, setup, sh } from '../protect-harness.js';

t.test('a trace buffer overrun goes resync-required, then resyncing, then continuous, and the next point is exact', async (t) => {
  const s = await setup(t, 128);
  // 1 KiB asks for the smallest buffer the kernel allows (a few pages per CPU)
  const agent = new Agent(s.c, s.args(['--crash-interval', '15s', '--trace-buffer-kb', '1']));
  t.teardown(() => agent.stop());
  await agent.waitEvent((e) => e.event === 'cut', LONG, 'the first cut');
  const load = new Workload(s.c, s, { direct: true });
  const req = await agent.waitEvent((e) => e.event === 'state' && e.state === 'resync-required', LONG, 'resync-required');
  await load.stop();
  sh('sync', []); // the load's dirty pages written back: no more writes after this
  t.match(String(req.reason), /overran|lost/, `the reason names the loss: ${String(req.reason)}`);
  await agent.waitEvent((e) => e.event === 'state' && e.state === 'resyncing', LONG, 'resyncing');
  const scan = await agent.waitEvent((e) => e.event === 'pass-done' && e.kind === 'incremental', LONG, 'the resync scan');
  t.ok(Number(scan.bytesSent) < 128 * 1024 * 1024, `the resync scan sends only differences (${String(scan.bytesSent)} bytes on the wire)`);
  await agent.waitEvent((e) => e.event === 'state' && e.state === 'continuous' && agent.events.indexOf(e) > agent.events.indexOf(scan), LONG, 'continuous again');
  // A loss noticed by a cut (events lost before it) fails that cut and starts a rescan: wait for it, then cut again
  // (bounded). With the smallest buffer even the freeze's own journal and superblock writes can overrun it, the
  // more often the busier the machine (a late drain): up to 15 tries.
  let c = await agent.cut('app');
  const lastState = () => [...agent.events].reverse().find((e) => e.event === 'state');
  for (let attempt = 1; c.event !== 'cut' && /^MOB_ERR_(TRACKING_LOST|CUT)$/.test(String(c.code)) && attempt < 15; attempt++) {
    t.comment(`cut after the resync failed (${String(c.code)}: ${String(c.message)}); waiting for the rescan, then cutting again`);
    const from = agent.events.length;
    if (lastState()?.state !== 'continuous') {
      await agent.waitEvent((e) => agent.events.indexOf(e) >= from && e.event === 'state' && e.state === 'continuous', LONG, 'continuous after the rescan');
    }
    c = await agent.cut('app');
  }
  t.equal(c.event, 'cut', `a cut after the resync succeeds ${JSON.stringify(c)}\nevents: ${JSON.stringify(agent.events.filter((e) => e.event !== 'hook').slice(-25))}`);
  await materializeAndCheck(t, s, String(c.pointId), String(c.cutId));
  await agent.stop();

  // a lost trace instance (as after a reboot): a scan against the digest map, never a full copy
  t.same(traceInstancesOf(s.agentId).map((n) => (n.endsWith('.shadow') ? 'shadow' : 'instance')), ['instance', 'shadow'], `the stopped agent kept its trace instance and its shadow (${traceInstancesOf(s.agentId).join(', ')})`);
  t.same(removeTraceInstances(s.agentId), [], 'the instance is removed');
  sh('dd', ['if=/dev/urandom', `of=${s.mnt}/while-untracked`, 'bs=64k', 'count=40', 'status=none']);
  sh('sync', []);
  const again = new Agent(s.c, s.args(['--crash-interval', '15s']));
  t.teardown(() => again.stop());
  const st = await again.waitEvent((e) => e.event === 'started', LONG, 'restart');
  t.equal(st.trackerResumed, false, 'the instance was gone');
  t.match(String((st.scanRequired as Record<string, string>).d0), /not running/, 'so the disk needs a scan, with the reason');
  const rescan = await again.waitEvent((e) => e.event === 'pass-done', LONG, 'the scan');
  t.equal(rescan.kind, 'incremental', 'an incremental scan against the digest map');
  t.ok(Number(rescan.bytesSent) < 16 * 1024 * 1024, `that ships only what changed (${String(rescan.bytesSent)} bytes on the wire for a 128 MiB disk)`);
  const c2 = await again.cut('app');
  t.equal(c2.event, 'cut', 'then cuts work again');
  await materializeAndCheck(t, s, String(c2.pointId), String(c2.cutId));
  await again.stop();
});
