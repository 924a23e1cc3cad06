/**
 * Continuous protection with real things (see test/protect-harness.ts): an ext4 filesystem
 * on a loop device written by fio and dd while `mobility protect` replicates it; cuts during
 * the load; every point's test-failover image passes `e2fsck -fn` and its files match the
 * checksums taken inside that cut's frozen window. kill -9 of the agent under load costs no
 * rescan (or only a checksum scan for the documented trace-read window).
 *
 * The test paces itself on the workload's progress (dd rounds), never on elapsed time.
 * Needs root, losetup, mkfs.ext4, e2fsck, fsfreeze, fio and tracefs: a missing one fails the test.
 */
import t from 'tap';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { runCli } from '../helpers.js';
import { Agent, LONG, TORN_READ, Workload, materializeAndCheck, setup, statusArgs } from '../protect-harness.js';

t.test('ext4 under fio/dd load: cuts, kill -9 without rescan, every point fsck-clean with matching files', async (t) => {
  const s = await setup(t);
  let agent = new Agent(s.c, s.args(['--crash-interval', '15s', '--app-interval', '60m']));
  t.teardown(() => agent.stop());
  const started = await agent.waitEvent((e) => e.event === 'started', LONG, 'start');
  t.equal(started.trackerResumed, false, 'first start creates the trace instance');
  await agent.waitEvent((e) => e.event === 'pass-done' && e.kind === 'initial', LONG, 'initial sync');
  const points: { pointId: string; cutId: string; kind: string }[] = [];
  const first = await agent.waitEvent((e) => e.event === 'cut', LONG, 'the first cut');
  t.equal(first.kind, 'app', 'the first point after the initial sync is app-consistent');
  points.push({ pointId: String(first.pointId), cutId: String(first.cutId), kind: 'app' });

  const load = new Workload(s.c, s);
  await load.advance(10, 'the workload to get going');
  for (const kind of ['crash', 'app', 'crash'] as const) {
    const c = await agent.cut(kind);
    t.equal(c.event, 'cut', `${kind} cut under load succeeds ${JSON.stringify(c)}`);
    if (c.event === 'cut') points.push({ pointId: String(c.pointId), cutId: String(c.cutId), kind });
    t.ok(load.running, `the load was still running when the ${kind} cut was recorded`);
    await load.advance(10); // the next cut sees a different state
  }
  // the load really ran through the cuts: the states they captured differ
  const underLoad = await Promise.all(points.slice(1).map((p) => fsp.readFile(path.join(s.sums, p.cutId), 'utf8')));
  t.equal(new Set(underLoad).size, underLoad.length, `the cuts under load captured different states (${underLoad.map((x) => x.split('\n').length - 1).join(', ')} files)`);
  const hooksLog = await fsp.readFile(path.join(s.dir, 'hooks.log'), 'utf8');
  const appCuts = points.filter((p) => p.kind === 'app').map((p) => p.cutId);
  for (const id of appCuts) {
    t.match(hooksLog, new RegExp(`pre-freeze ${id} app\\npost-thaw ${id} app`), `pre-freeze then post-thaw hooks ran around app cut ${id}`);
  }
  t.notMatch(hooksLog, new RegExp(`pre-freeze (${points.filter((p) => p.kind === 'crash').map((p) => p.cutId).join('|')}) `), 'crash cuts run no pre-freeze hooks');

  // kill -9 under load; the load goes on writing while no agent runs; the trace instance keeps recording; restart: no rescan
  await agent.kill9();
  await load.advance(10, 'writes while the agent is down');
  agent = new Agent(s.c, s.args(['--crash-interval', '15s', '--app-interval', '60m']));
  const again = await agent.waitEvent((e) => e.event === 'started', LONG, 'restart');
  t.equal(again.trackerResumed, true, 'the trace instance survived the agent');
  // a kill inside a read of trace_pipe costs no scan either: the shadow instance still holds what
  // that read took (only a second kill inside the first drain after a restart could: not here)
  const reason = (again.scanRequired as Record<string, string | null>).d0;
  t.equal(reason, null, `no scan required after kill -9 (${String(reason)}; ${TORN_READ} would be a read cut short twice)`);
  await agent.waitEvent((e) => e.event === 'state' && e.state === 'continuous', LONG, 'continuous after restart');
  const c2 = await agent.cut('crash');
  t.equal(c2.event, 'cut', 'a cut after the restart succeeds');
  t.ok(load.running, 'under load');
  if (c2.event === 'cut') points.push({ pointId: String(c2.pointId), cutId: String(c2.cutId), kind: 'crash' });
  await load.stop();
  const beforeLast = Date.now();
  const c3 = await agent.cut('app');
  t.equal(c3.event, 'cut', 'a cut after the load succeeds');
  if (c3.event === 'cut') points.push({ pointId: String(c3.pointId), cutId: String(c3.cutId), kind: 'app' });
  if (reason === null) {
    t.notOk(agent.find((e) => e.event === 'pass'), 'the restarted agent ran no scan pass at all');
    t.notOk(agent.find((e) => e.event === 'state' && (e.state === 'resync-required' || e.state === 'resyncing')), 'and never left the continuous state');
  } else {
    t.ok(agent.events.filter((e) => e.event === 'pass').every((e) => e.kind !== 'initial'), 'the scan was a checksum scan, not a new initial copy');
  }

  // status shows the disk continuous, with an RPO no older than the last cut we asked for
  const st = await runCli(statusArgs(s.server)).done;
  const sinceLast = Date.now() - beforeLast;
  t.equal(st.code, 0, 'status works');
  const disk = (JSON.parse(st.stdout) as { disks: { agent: string; disk: string; state: string; rpoMs: number; points: number }[] }).disks.find((d) => d.agent === s.agentId);
  t.equal(disk?.state, 'continuous', 'status: continuous');
  t.ok(disk && disk.rpoMs >= 0 && disk.rpoMs <= sinceLast, `status: RPO ${disk?.rpoMs} ms, at most the ${sinceLast} ms since the last cut was asked for`);
  // the 15 s schedule adds crash-consistent points of its own
  t.ok(disk && disk.points >= points.length, `status: every point is in the catalog (${disk?.points} >= ${points.length})`);

  for (const p of points) await materializeAndCheck(t, s, p.pointId, p.cutId);
  await agent.stop();
});
