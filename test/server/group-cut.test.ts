/**
 * The group cut state machines, with a manual clock (no sleeps): the server's GroupCutRun
 * (prepare/converge, freeze/ready, commit or abort; bounds per step; duplicate, late and
 * out-of-step replies; a member disconnecting or refusing mid-cut), the GroupCoordinator
 * (the wait for every member's point after the commit, the labels it hands out, one cut per
 * group at a time), the agent's GroupCutMember (its own bounds: it never waits for a commit
 * past the group's bound or its freeze limit) and groupPoints (complete only when every member
 * recorded its part). The real agents and the real freeze are in test/e2e/group-cut.test.ts.
 */
import t from 'tap';
import { MobilityError } from '../../src/errors.js';
import { createLogger } from '../../src/log.js';
import type { RecoveryPoint } from '../../src/target/catalog.js';
import {
  GroupCoordinator, GroupCutError, GroupCutRun, groupPoints, type GroupAgentMessage, type GroupServerMessage, type Timers,
} from '../../src/server/group-cut.js';
import { GroupCutMember } from '../../src/agent/group-member.js';
import type { CutNotice } from '../../src/server/points.js';
import { ConfigDb, type ConsistencyGroup } from '../../src/server/config-db.js';
import { groupMembers } from '../../src/server/http/config-api.js';
import { tmpDir } from '../helpers.js';

const log = createLogger({ silent: true });

/** A manual clock: timers fire only when advance() passes their time. */
class Clock implements Timers {
  t = 1_000_000;
  private seq = 0;
  private readonly timers = new Map<number, { at: number; fn: () => void }>();
  set(fn: () => void, ms: number): unknown { const id = ++this.seq; this.timers.set(id, { at: this.t + ms, fn }); return id; }
  clear(h: unknown): void { this.timers.delete(h as number); }
  now(): number { return this.t; }
  get pending(): number { return this.timers.size; }
  advance(ms: number): void {
    const end = this.t + ms;
    for (;;) {
      const due = [...this.timers.entries()].filter(([, x]) => x.at <= end).sort((a, b) => a[1].at - b[1].at)[0];
      if (!due) break;
      this.timers.delete(due[0]);
      this.t = due[1].at;
      due[1].fn();
    }
    this.t = end;
  }
}

class Link {
  sent: { to: string; m: GroupServerMessage }[] = [];
  offline = new Set<string>();
  connected(a: string): boolean { return !this.offline.has(a); }
  send(a: string, m: GroupServerMessage): boolean { if (this.offline.has(a)) return false; this.sent.push({ to: a, m }); return true; }
  types(to?: string): string[] { return this.sent.filter((s) => to === undefined || s.to === to).map((s) => s.m.type); }
}

const conv = (point: string): GroupAgentMessage => ({ type: 'group-converged', point });
const ready = (point: string): GroupAgentMessage => ({ type: 'group-ready', point, frozenAtMs: 1 });

function newRun(members = ['a', 'b', 'c'], boundMs = 5000) {
  const clock = new Clock();
  const link = new Link();
  const run = new GroupCutRun({ point: 'gp-1', group: 'g', kind: 'crash', members, boundMs, convergeMs: 60_000, link, timers: clock, log });
  return { clock, link, run };
}

async function rejection(p: Promise<unknown>): Promise<GroupCutError> {
  try {
    await p;
  } catch (err) {
    return err as GroupCutError;
  }
  throw new Error('expected the promise to reject');
}

t.test('all converge, all ready: freeze after the last converged, commit after the last ready', async (t) => {
  const { clock, link, run } = newRun();
  const done = run.start();
  t.same(link.types(), ['group-prepare', 'group-prepare', 'group-prepare'], 'prepare to every member');
  t.match(link.sent[0].m, { type: 'group-prepare', point: 'gp-1', group: 'g', kind: 'crash', boundMs: 5000, convergeMs: 60_000 });
  run.onMessage('a', conv('gp-1'));
  run.onMessage('b', conv('gp-1'));
  clock.advance(1000);
  t.equal(link.sent.length, 3, 'no freeze while one member still converges');
  run.onMessage('c', conv('gp-1'));
  t.same(link.types().slice(3), ['group-freeze', 'group-freeze', 'group-freeze'], 'freeze to every member once all converged');
  t.equal(run.state, 'freezing');
  run.onMessage('c', ready('gp-1'));
  run.onMessage('a', ready('gp-1'));
  clock.advance(200);
  run.onMessage('b', ready('gp-1'));
  t.same(link.types().slice(6), ['group-commit', 'group-commit', 'group-commit'], 'commit to every member once all are ready');
  const c = await done;
  t.equal(c.point, 'gp-1');
  t.equal(c.convergeMs, 1000);
  t.equal(c.freezeStepMs, 200);
  t.equal(clock.pending, 0, 'no timer left behind');
  clock.advance(100_000);
  t.equal(link.sent.length, 9, 'nothing more is sent');
});

t.test('a member that does not answer the freeze step within the bound aborts the cut: every member thaws, the error names it', async (t) => {
  const { clock, link, run } = newRun(['a', 'b', 'c'], 5000);
  const done = run.start();
  for (const m of ['a', 'b', 'c']) run.onMessage(m, conv('gp-1'));
  run.onMessage('a', ready('gp-1'));
  run.onMessage('c', ready('gp-1'));
  clock.advance(4999);
  t.equal(run.state, 'freezing', 'still waiting just before the bound');
  clock.advance(1);
  const e = await rejection(done);
  t.equal(e.code, 'MOB_ERR_GROUP_CUT');
  t.equal(e.machine, 'b', 'the silent machine is named');
  t.match(e.message, /machine b did not answer the freeze step within 5 s/);
  t.match(e.message, /every machine was told to thaw/);
  t.same(link.sent.filter((s) => s.m.type === 'group-abort').map((s) => s.to), ['a', 'b', 'c'], 'abort to every member (the silent one too)');
  t.notOk(link.types().includes('group-commit'), 'never committed');
  t.same(e.details.members.map((m) => [m.agentId, m.state]), [['a', 'answered the freeze step'], ['b', 'no answer'], ['c', 'answered the freeze step']]);
  // late replies after the outcome change nothing
  run.onMessage('b', ready('gp-1'));
  run.onMessage('b', conv('gp-1'));
  t.equal(link.sent.filter((s) => s.m.type !== 'group-abort').length, 6, 'a late ready is ignored');
  t.equal(run.state, 'aborted');
});

t.test('the converge step has its own bound, naming every member that did not answer', async (t) => {
  const { clock, run } = newRun(['a', 'b', 'c']);
  const done = run.start();
  run.onMessage('b', conv('gp-1'));
  clock.advance(60_000);
  const e = await rejection(done);
  t.equal(e.machine, 'a');
  t.match(e.message, /machine a, c did not answer the converge step within 60 s/);
});

t.test('duplicates and replies to another step do not count', async (t) => {
  const { clock, link, run } = newRun(['a', 'b']);
  const done = run.start();
  run.onMessage('a', conv('gp-1'));
  run.onMessage('a', conv('gp-1'));
  run.onMessage('a', ready('gp-1'));
  t.equal(run.state, 'converging', 'a converged twice and a ready too early: b is still awaited');
  run.onMessage('x', conv('gp-1'));
  t.equal(run.state, 'converging', 'a machine outside the group does not count');
  run.onMessage('b', conv('gp-1'));
  t.equal(run.state, 'freezing');
  run.onMessage('a', conv('gp-1'));
  run.onMessage('a', ready('gp-1'));
  run.onMessage('a', ready('gp-1'));
  t.equal(run.state, 'freezing', 'a duplicate ready does not stand for b');
  run.onMessage('b', ready('gp-1'));
  await done;
  t.equal(link.types().filter((x) => x === 'group-commit').length, 2);
  clock.advance(10_000);
});

t.test('a member disconnecting mid-cut aborts at once', async (t) => {
  const { clock, link, run } = newRun(['a', 'b']);
  const done = run.start();
  run.onMessage('a', conv('gp-1'));
  run.onMessage('b', conv('gp-1'));
  run.onMessage('a', ready('gp-1'));
  run.onDisconnect('b');
  const e = await rejection(done);
  t.equal(e.machine, 'b');
  t.match(e.message, /machine b disconnected/);
  t.match(e.message, /at the freeze step/);
  t.equal(clock.pending, 0, 'the bound timer is cleared');
  t.ok(link.sent.some((s) => s.to === 'a' && s.m.type === 'group-abort'), 'the frozen member is told to thaw');
  run.onDisconnect('a');
  t.equal(link.types().filter((x) => x === 'group-abort').length, 2, 'a second disconnect after the outcome sends nothing');
});

t.test('a member that refuses passes its code on', async (t) => {
  const { run } = newRun(['a', 'b']);
  const done = run.start();
  run.onMessage('b', { type: 'group-failed', point: 'gp-1', code: 'MOB_ERR_FREEZE', message: 'fsfreeze: Operation not supported' });
  const e = await rejection(done);
  t.equal(e.code, 'MOB_ERR_FREEZE');
  t.equal(e.machine, 'b');
  t.match(e.message, /machine b could not take its part \(MOB_ERR_FREEZE: fsfreeze: Operation not supported\)/);
  t.same(e.details.members.find((m) => m.agentId === 'b'), { agentId: 'b', state: 'failed', code: 'MOB_ERR_FREEZE', message: 'fsfreeze: Operation not supported' });
});

t.test('an offline member: nothing is sent, nothing frozen, the machine is named', async (t) => {
  const { link, run } = newRun(['a', 'b']);
  link.offline.add('b');
  const e = await rejection(run.start());
  t.equal(e.machine, 'b');
  t.match(e.message, /machine b is not connected/);
  t.equal(link.sent.length, 0);
});

function coordinator(members: string[], o: { pointWaitMs?: number; intervalMs?: number } = {}) {
  const clock = new Clock();
  const link = new Link();
  const cutWatchers = new Set<(a: string, n: CutNotice) => void>();
  const eventWatchers = new Set<(a: string, e: Record<string, unknown>) => void>();
  const events: { agentId: string; kind: string; code: string | null; reason: string }[] = [];
  const group: ConsistencyGroup = { name: 'g', members, intervalMs: o.intervalMs ?? 0, boundMs: 5000, kind: 'crash', createdAt: '' };
  const c = new GroupCoordinator({
    getGroup: (n) => { if (n !== 'g') throw new MobilityError('MOB_ERR_UNKNOWN_GROUP', n); return group; }, listGroups: () => [group],
    link, timers: clock, log, convergeMs: 60_000, pointWaitMs: o.pointWaitMs ?? 120_000,
    watchCuts: (fn) => { cutWatchers.add(fn); return () => cutWatchers.delete(fn); },
    watchEvents: (fn) => { eventWatchers.add(fn); return () => eventWatchers.delete(fn); },
    event: (agentId, kind, code, reason) => events.push({ agentId, kind, code, reason }),
  });
  const point = (agentId: string, id: string, gp: string): void => {
    const p = { id, n: 1, kind: 'crash', recordedAt: '', takenAt: '2026-01-01T00:00:00.000Z', frozenMs: 12, note: '', disks: {}, group: c.labelFor(agentId, gp) ?? undefined } as RecoveryPoint;
    for (const fn of [...cutWatchers]) fn(agentId, { point: p });
  };
  const tick = () => new Promise((r) => setImmediate(r));
  const drive = async (gp: () => string) => {
    await tick();
    for (const m of members) c.onMessage(m, conv(gp()));
    for (const m of members) c.onMessage(m, ready(gp()));
    await tick();
  };
  return { c, clock, link, events, point, drive, tick, cutWatchers, eventWatchers };
}

t.test('coordinator: the group point is complete when every member recorded its labelled point', async (t) => {
  const { c, link, events, point, drive } = coordinator(['a', 'b']);
  const p = c.cut('g');
  const gp = () => (link.sent[0]!.m as { point: string }).point;
  t.match(gp(), /^gp-\d{8}T\d{9}Z-[0-9a-f]{4}$/, 'a sortable group point id');
  await t.rejects(c.cut('g'), { code: 'MOB_ERR_GROUP_BUSY' }, 'one cut per group at a time');
  t.ok(c.busy('g'));
  t.equal(c.labelFor('a', gp()), null, 'no label before the commit');
  await drive(gp);
  t.same(c.labelFor('a', gp()), { id: gp(), name: 'g', members: ['a', 'b'] }, 'committed: the label is handed out');
  t.equal(c.labelFor('x', gp()), null, 'but not to a machine outside the cut');
  point('a', 'rp-000007', 'gp-other');
  point('a', 'rp-000008', gp());
  point('b', 'rp-000003', gp());
  const r = await p;
  t.equal(r.complete, true);
  t.same(r.members.map((m) => [m.agentId, m.pointId]), [['a', 'rp-000008'], ['b', 'rp-000003']], 'each machine\'s labelled point (an unlabelled one is not it)');
  t.same(events.map((e) => [e.agentId, e.kind]), [['a', 'group-point'], ['b', 'group-point']]);
  t.notOk(c.busy('g'));
});

t.test('coordinator: a member whose point fails after the commit makes the group point incomplete, named', async (t) => {
  const { c, link, events, point, drive, eventWatchers } = coordinator(['a', 'b']);
  const p = c.cut('g');
  const gp = () => (link.sent[0]!.m as { point: string }).point;
  await drive(gp);
  point('a', 'rp-1', gp());
  for (const fn of [...eventWatchers]) fn('b', { event: 'cut-failed', groupPoint: gp(), code: 'MOB_ERR_POINT_UNVERIFIED', message: 'sampled verification failed' });
  const e = await rejection(p);
  t.equal(e.code, 'MOB_ERR_GROUP_CUT');
  t.equal(e.machine, 'b');
  t.match(e.message, /b: MOB_ERR_POINT_UNVERIFIED/);
  t.match(e.message, /incomplete/);
  t.same(events.map((x) => [x.agentId, x.kind, x.code]), [['b', 'group-cut-failed', 'MOB_ERR_POINT_UNVERIFIED']]);
});

t.test('coordinator: no point within the wait is reported too', async (t) => {
  const { c, clock, link, point, drive } = coordinator(['a', 'b'], { pointWaitMs: 30_000 });
  const p = c.cut('g');
  const gp = () => (link.sent[0]!.m as { point: string }).point;
  await drive(gp);
  point('b', 'rp-1', gp());
  clock.advance(30_000);
  const e = await rejection(p);
  t.equal(e.machine, 'a');
  t.match(e.message, /a: no point within 30 s/);
});

t.test('coordinator: an abort is recorded as an event naming the machine', async (t) => {
  const { c, clock, link, events, tick } = coordinator(['a', 'b']);
  const p = c.cut('g');
  const gp = (link.sent[0]!.m as { point: string }).point;
  await tick();
  c.onMessage('a', conv(gp));
  c.onMessage('b', conv(gp));
  c.onMessage('b', ready(gp));
  clock.advance(5000);
  const e = await rejection(p);
  t.equal(e.machine, 'a');
  t.same(events.map((x) => [x.agentId, x.kind, x.code]), [['a', 'group-cut-failed', 'MOB_ERR_GROUP_CUT']]);
  t.equal(c.labelFor('a', gp), null, 'an aborted group point labels nothing');
  c.onMessage('a', ready(gp));
  t.notOk(c.busy('g'), 'a late reply after the outcome is ignored');
});

function member(boundMs = 5000, convergeMs = 60_000) {
  const clock = new Clock();
  const sent: Record<string, unknown>[] = [];
  let settled = 0;
  const m = new GroupCutMember('gp-1', 'g', 'crash', { boundMs, convergeMs, send: (x) => sent.push(x as Record<string, unknown>), onSettled: () => { settled++; }, timers: clock });
  return { m, clock, sent, settled: () => settled };
}

t.test('member: converged, freeze, ready, commit', async (t) => {
  const { m, clock, sent, settled } = member();
  const c = m.converged();
  t.same(sent, [{ type: 'group-converged', point: 'gp-1' }]);
  m.onMessage({ type: 'group-commit', point: 'gp-1' });
  t.notOk(m.settled, 'a commit before ready is ignored');
  m.onMessage({ type: 'group-freeze', point: 'gp-1' });
  await c;
  const r = m.ready(123, 60_000);
  t.same(sent[1], { type: 'group-ready', point: 'gp-1', frozenAtMs: 123 });
  clock.advance(4000);
  m.onMessage({ type: 'group-commit', point: 'gp-1' });
  await r;
  t.ok(m.settled);
  t.equal(settled(), 1);
  m.failed(new MobilityError('MOB_ERR_CUT', 'shipping failed later'));
  t.equal(sent.length, 2, 'nothing is reported after the commit');
});

t.test('member: no commit within the bound (a dead server): it aborts on its own', async (t) => {
  const { m, clock, sent } = member(5000);
  const c = m.converged();
  m.onMessage({ type: 'group-freeze', point: 'gp-1' });
  await c;
  const r = m.ready(1, 60_000);
  clock.advance(5000);
  await t.rejects(r, { code: 'MOB_ERR_GROUP_CUT', message: /no commit from the server within 5000 ms/ });
  t.ok(m.settled);
  t.match(sent[2], { type: 'group-failed', point: 'gp-1', code: 'MOB_ERR_GROUP_CUT', message: /no commit from the server within 5000 ms/ }, 'the server is told at once why this machine left the cut');
  m.onMessage({ type: 'group-commit', point: 'gp-1' });
  m.failed(new MobilityError('MOB_ERR_GROUP_CUT', 'x'));
  t.equal(sent.length, 3, 'a late commit is ignored; nothing more is sent after the own abort');
});

t.test('member: the freeze limit shortens the commit wait', async (t) => {
  const { m, clock } = member(5000);
  const c = m.converged();
  m.onMessage({ type: 'group-freeze', point: 'gp-1' });
  await c;
  const r = m.ready(1, 800);
  clock.advance(800);
  await t.rejects(r, { message: /within 800 ms/ });
});

t.test('member: abort while waiting, abort before converging, a lost connection', async (t) => {
  {
    const { m } = member();
    const c = m.converged();
    m.onMessage({ type: 'group-abort', point: 'gp-1', reason: 'machine b did not answer' });
    await t.rejects(c, { code: 'MOB_ERR_GROUP_CUT', message: /the server aborted the group cut: machine b did not answer/ });
  }
  {
    const { m, sent } = member();
    m.onMessage({ type: 'group-abort', point: 'gp-1', reason: 'r' });
    await t.rejects(m.converged(), { code: 'MOB_ERR_GROUP_CUT' });
    t.equal(sent.length, 0, 'an aborted member reports nothing');
  }
  {
    const { m } = member();
    const c = m.converged();
    m.onMessage({ type: 'group-freeze', point: 'gp-1' });
    await c;
    const r = m.ready(1, 10_000);
    m.connectionLost();
    await t.rejects(r, { message: /control connection to the server closed/ });
  }
  {
    const { m, sent } = member();
    m.failed(new MobilityError('MOB_ERR_CUT', 'disk d0 is resyncing'));
    m.failed(new MobilityError('MOB_ERR_CUT', 'again'));
    t.same(sent, [{ type: 'group-failed', point: 'gp-1', code: 'MOB_ERR_CUT', message: 'disk d0 is resyncing' }], 'a refusal is reported once');
    t.ok(m.settled);
  }
});

t.test('groupPoints: complete only when every member named in the label recorded its part', async (t) => {
  const label = (id: string) => ({ id, name: 'g', members: ['a', 'b'] });
  const p = (id: string, gp: string | null, kind = 'crash', takenAt = '2026-01-01T00:00:00.000Z') => ({ id, n: 1, kind, recordedAt: '', takenAt, frozenMs: 1, note: '', disks: {}, ...(gp ? { group: label(gp) } : {}) }) as RecoveryPoint;
  const gps = groupPoints('g', new Map([
    ['a', [p('rp-1', null), p('rp-2', 'gp-2', 'app', '2026-01-01T00:00:01.000Z'), p('rp-3', 'gp-1', 'app')]],
    ['b', [p('rp-7', 'gp-1', 'app', '2026-01-01T00:00:00.500Z'), p('rp-8', 'gp-3')]],
  ]));
  t.same(gps.map((g) => [g.id, g.complete, g.kind, Object.keys(g.points).sort().join(',')]), [
    ['gp-1', true, 'app', 'a,b'], ['gp-2', false, 'app', 'a'], ['gp-3', false, 'crash', 'b'],
  ], 'sorted by id; machine points left out');
  t.equal(gps[0]!.takenAt, '2026-01-01T00:00:00.000Z', 'the earliest freeze');
  t.same(groupPoints('other', new Map([['a', [p('rp-3', 'gp-1')]]])), [], 'another group\'s points are not listed');
});

t.test('groups in the configuration database: members in order, at most 16, one group per machine, gone with the machine', async (t) => {
  const db = ConfigDb.open(await tmpDir(t, 'groups-db-'));
  t.teardown(() => db.close());
  for (let i = 0; i < 17; i++) db.upsertAgent({ id: `m${i}`, machineId: `mid${i}`, hostname: `host${i}`, certFingerprint: 'x', registeredWith: 'test' });
  const sixteen = Array.from({ length: 16 }, (_, i) => `m${15 - i}`);
  t.same(groupMembers(db, 'g', sixteen), sixteen, '16 machines are fine');
  t.same(groupMembers(db, 'g', ['m1', 'host1', 'm1']), ['m1'], 'by id or host name, once each');
  t.throws(() => groupMembers(db, 'g', [...sixteen, 'm16']), { code: 'MOB_ERR_GROUP_TOO_LARGE', message: /at most 16 machines; g would hold 17/ });
  t.throws(() => groupMembers(db, 'g', ['m1', 'nope']), { code: 'MOB_ERR_UNKNOWN_MACHINE' });
  t.throws(() => groupMembers(db, 'g', []), { code: 'MOB_ERR_USAGE' });
  t.throws(() => groupMembers(db, 'g', 'm1'), { code: 'MOB_ERR_USAGE' });
  const g = db.putGroup({ name: 'g', members: ['m3', 'm1', 'm2'], intervalMs: 0, boundMs: 5000, kind: 'crash' });
  t.same(g.members, ['m3', 'm1', 'm2'], 'members keep their order');
  t.equal(db.groupOf('m1'), 'g');
  t.throws(() => groupMembers(db, 'h', ['m1']), { code: 'MOB_ERR_CONFIG', message: /m1 is already in group g/ });
  t.same(groupMembers(db, 'g', ['m1']), ['m1'], 'the same group may be given again');
  db.putGroup({ name: 'g', members: ['m1'], intervalMs: 60_000, boundMs: 2000, kind: 'app' });
  t.match(db.getGroup('g'), { members: ['m1'], intervalMs: 60_000, boundMs: 2000, kind: 'app' }, 'replaced');
  t.equal(db.groupOf('m3'), null, 'a machine left out leaves the group');
  t.throws(() => db.getGroup('nope'), { code: 'MOB_ERR_UNKNOWN_GROUP' });
  t.ok(db.deleteGroup('g'));
  t.equal(db.groupOf('m1'), null, 'deleting the group frees its machines');
  t.notOk(db.deleteGroup('g'));
  t.same(db.listGroups(), []);
});

t.test('coordinator: the group schedule cuts when due and every member is connected', async (t) => {
  const { c, clock, link, tick } = coordinator(['a', 'b'], { intervalMs: 60_000 });
  c.scheduled();
  t.equal(link.sent.length, 0, 'the first interval starts when the schedule first sees the group');
  clock.advance(59_000);
  c.scheduled();
  t.equal(link.sent.length, 0, 'not due yet');
  clock.advance(1000);
  link.offline.add('b');
  c.scheduled();
  t.equal(link.sent.length, 0, 'due, but a member is offline: no cut (and nothing frozen)');
  link.offline.delete('b');
  c.scheduled();
  t.same(link.types(), ['group-prepare', 'group-prepare'], 'due and all connected: a group cut starts');
  c.scheduled();
  t.equal(link.sent.length, 2, 'one cut at a time');
  clock.advance(60_000);
  await tick();
  t.notOk(c.busy('g'), 'the scheduled cut ended (aborted: nobody answered)');
});
