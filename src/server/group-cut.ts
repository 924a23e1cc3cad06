/**
 * Multi-machine consistency: one group cut, coordinated by the configuration server over the
 * agents' control connections (docs/protocol.md, "Group cuts").
 *
 *   server                                   every member agent
 *   group-prepare {point, group, kind, ...} ─► converge (ship until the backlog is small),
 *                                              pre-freeze hooks (app); not frozen
 *                    ◄─ group-converged {point}
 *   (all converged) group-freeze {point}    ─► freeze, drain the trace, read the remainder into
 *                                              the spool, frozen hooks; stays frozen
 *                    ◄─ group-ready {point}
 *   (all ready)     group-commit {point}    ─► thaw, ship the spool, Cut frame naming the group
 *                                              point ─► a recovery point on every member
 *   on any failure  group-abort {point, reason} ─► thaw (if frozen), no point
 *
 * Converging happens before anyone freezes, so the freeze of every member lasts its own local
 * spool read plus one round trip (ready ─► commit) and the wait for the slowest member's spool
 * read: a group cut adds at most one round trip to the freeze. A member that does not answer a
 * step within its bound (converge: convergeMs; freeze: the group's boundMs), refuses it
 * (group-failed) or disconnects aborts the whole cut: every member is told to thaw, and the
 * error names the machine. A member thaws on its own if the commit does not come within the
 * bound (the server may have died): see agent/group-member.ts.
 *
 * GroupCutRun is the state machine of one cut (timers injectable, so it is tested without
 * sleeps); GroupCoordinator runs cuts per group (on demand and on the group's schedule), waits
 * for the members' points and keeps the record of committed group points that lets a Cut frame
 * carry a group label.
 */
import crypto from 'node:crypto';
import { MobilityError, isErrorCode, type ErrorCode } from '../errors.js';
import type { Logger } from '../log.js';
import type { RecoveryPoint } from '../target/catalog.js';
import type { ConsistencyGroup } from './config-db.js';
import type { CutNotice } from './points.js';

export const MAX_GROUP_MEMBERS = 16;
/** How long every member has to answer the freeze step (freeze, spool the remainder, frozen hooks), unless the group says otherwise. */
export const DEFAULT_GROUP_BOUND_MS = 5000;
/** How long members have to converge (the agent's own convergence gives up after 30 s) and run their pre-freeze hooks. */
export const GROUP_CONVERGE_MS = 90_000;
/** After the commit: how long the server waits for every member's point (shipping the spool, verification). */
export const GROUP_POINT_WAIT_MS = 180_000;
/** Committed group points are remembered this long for the Cut frames that name them. */
const COMMITTED_TTL_MS = 30 * 60_000;
/** The group schedule is checked this often. */
const SCHEDULE_TICK_MS = 1000;

export type GroupCutKind = 'crash' | 'app';

/** server -> agent */
export type GroupServerMessage =
  | { type: 'group-prepare'; point: string; group: string; kind: GroupCutKind; boundMs: number; convergeMs: number }
  | { type: 'group-freeze'; point: string }
  | { type: 'group-commit'; point: string }
  | { type: 'group-abort'; point: string; reason: string };

/** agent -> server (validated by the control session) */
export type GroupAgentMessage =
  | { type: 'group-converged'; point: string }
  | { type: 'group-ready'; point: string; frozenAtMs: number }
  | { type: 'group-failed'; point: string; code: string; message: string };

/** How a run reaches the members. */
export interface GroupLink {
  connected(agentId: string): boolean;
  /** False when the agent is not connected. */
  send(agentId: string, m: GroupServerMessage): boolean;
}

export interface Timers {
  set(fn: () => void, ms: number): unknown;
  clear(handle: unknown): void;
  now(): number;
}

export const realTimers: Timers = {
  set: (fn, ms) => { const t = setTimeout(fn, ms); t.unref(); return t; },
  clear: (h) => clearTimeout(h as NodeJS.Timeout),
  now: () => Date.now(),
};

/** A group cut that failed; machine names the member that caused it (null when none did). */
export class GroupCutError extends MobilityError {
  /** The API sends these with the error: the machine at fault and what each member had done. */
  readonly details: { machine: string | null; members: { agentId: string; state: string; code?: string; message?: string }[] };
  constructor(code: ErrorCode, message: string, readonly machine: string | null, members: { agentId: string; state: string; code?: string; message?: string }[] = []) {
    super(code, message);
    this.details = { machine, members };
  }
}

export type GroupCutState = 'new' | 'converging' | 'freezing' | 'committed' | 'aborted';

export interface GroupCutCommitted {
  point: string; group: string; kind: GroupCutKind; members: string[];
  /** From group-prepare to the last group-converged. */
  convergeMs: number;
  /** From group-freeze to the last group-ready (the members' freezes overlap this window). */
  freezeStepMs: number;
}

/**
 * One group cut. start() sends group-prepare to every member and resolves when the commit is
 * sent, or rejects with a GroupCutError after group-abort was sent to every member. Replies are
 * fed with onMessage (duplicates, replies to an earlier step and replies after the outcome are
 * ignored); onDisconnect aborts a cut that is still waiting.
 */
export class GroupCutRun {
  state: GroupCutState = 'new';
  private readonly answered = new Set<string>();
  private timer: unknown = null;
  private t0 = 0;
  private tFreeze = 0;
  private convergeMs = 0;
  private resolve!: (c: GroupCutCommitted) => void;
  private reject!: (e: GroupCutError) => void;
  readonly done: Promise<GroupCutCommitted>;

  constructor(private readonly o: {
    point: string; group: string; kind: GroupCutKind; members: string[]; boundMs: number; convergeMs?: number;
    link: GroupLink; timers?: Timers; log?: Logger;
  }) {
    this.done = new Promise((res, rej) => { this.resolve = res; this.reject = rej; });
    this.done.catch(() => undefined);
  }

  private get timers(): Timers { return this.o.timers ?? realTimers; }
  get members(): readonly string[] { return this.o.members; }
  get point(): string { return this.o.point; }

  start(): Promise<GroupCutCommitted> {
    if (this.state !== 'new') return this.done;
    if (this.o.members.length === 0) {
      this.state = 'aborted';
      this.reject(new GroupCutError('MOB_ERR_CONFIG', `group ${this.o.group} has no machines`, null));
      return this.done;
    }
    const offline = this.o.members.find((m) => !this.o.link.connected(m));
    if (offline) {
      this.state = 'aborted';
      this.reject(new GroupCutError('MOB_ERR_GROUP_CUT', `group ${this.o.group}: machine ${offline} is not connected, so no group cut was started (nothing was frozen)`, offline,
        this.o.members.map((m) => ({ agentId: m, state: this.o.link.connected(m) ? 'connected' : 'offline' }))));
      return this.done;
    }
    this.state = 'converging';
    this.t0 = this.timers.now();
    const convergeMs = this.o.convergeMs ?? GROUP_CONVERGE_MS;
    for (const m of this.o.members) {
      this.o.link.send(m, { type: 'group-prepare', point: this.o.point, group: this.o.group, kind: this.o.kind, boundMs: this.o.boundMs, convergeMs });
    }
    this.arm(convergeMs, 'converge');
    return this.done;
  }

  private arm(ms: number, step: string): void {
    if (this.timer !== null) this.timers.clear(this.timer);
    this.timer = this.timers.set(() => {
      this.timer = null;
      const missing = this.o.members.filter((m) => !this.answered.has(m));
      if (!missing.length) return;
      this.abort(missing[0]!, 'MOB_ERR_GROUP_CUT', `machine ${missing.join(', ')} did not answer the ${step} step within ${fmtMs(ms)}`, missing);
    }, ms);
  }

  /** A reply of a member (already validated as a group message for this point). */
  onMessage(agentId: string, m: GroupAgentMessage): void {
    if (!this.o.members.includes(agentId)) return;
    if (this.state !== 'converging' && this.state !== 'freezing') {
      this.o.log?.info('late group cut reply ignored', { group: this.o.group, point: this.o.point, agent: agentId, type: m.type, state: this.state });
      return;
    }
    if (m.type === 'group-failed') {
      const code = isErrorCode(m.code) ? m.code : 'MOB_ERR_GROUP_CUT';
      this.abort(agentId, code, `machine ${agentId} could not take its part (${m.code}: ${m.message})`, [agentId], m.code, m.message);
      return;
    }
    const expected = this.state === 'converging' ? 'group-converged' : 'group-ready';
    if (m.type !== expected) return; // a reply to another step (duplicate of an earlier one)
    if (this.answered.has(agentId)) return; // duplicate
    this.answered.add(agentId);
    if (this.answered.size < this.o.members.length) return;
    this.answered.clear();
    if (this.state === 'converging') {
      this.convergeMs = this.timers.now() - this.t0;
      this.state = 'freezing';
      this.tFreeze = this.timers.now();
      for (const a of this.o.members) this.o.link.send(a, { type: 'group-freeze', point: this.o.point });
      this.arm(this.o.boundMs, 'freeze');
    } else {
      if (this.timer !== null) this.timers.clear(this.timer);
      this.timer = null;
      this.state = 'committed';
      for (const a of this.o.members) this.o.link.send(a, { type: 'group-commit', point: this.o.point });
      this.resolve({ point: this.o.point, group: this.o.group, kind: this.o.kind, members: [...this.o.members], convergeMs: this.convergeMs, freezeStepMs: this.timers.now() - this.tFreeze });
    }
  }

  /** The member's control connection closed. */
  onDisconnect(agentId: string): void {
    if (!this.o.members.includes(agentId) || (this.state !== 'converging' && this.state !== 'freezing')) return;
    this.abort(agentId, 'MOB_ERR_GROUP_CUT', `machine ${agentId} disconnected`, [agentId]);
  }

  /** Aborts a cut still waiting (the server stops, say). */
  cancel(reason: string): void {
    if (this.state !== 'converging' && this.state !== 'freezing') return;
    this.abort(null, 'MOB_ERR_GROUP_CUT', reason, []);
  }

  private abort(machine: string | null, code: ErrorCode, why: string, culprits: string[], agentCode?: string, agentMessage?: string): void {
    const step = this.state === 'converging' ? 'converge' : 'freeze';
    if (this.timer !== null) this.timers.clear(this.timer);
    this.timer = null;
    this.state = 'aborted';
    const reason = `group cut ${this.o.point} of group ${this.o.group} aborted at the ${step} step: ${why}; every machine was told to thaw, no group point was recorded`;
    for (const a of this.o.members) this.o.link.send(a, { type: 'group-abort', point: this.o.point, reason });
    const details = this.o.members.map((a) => ({
      agentId: a,
      state: culprits.includes(a) ? (agentCode ? 'failed' : 'no answer') : this.answered.has(a) ? `answered the ${step} step` : 'waiting',
      ...(a === machine && agentCode ? { code: agentCode, message: agentMessage } : {}),
    }));
    // a member that refused passes its own code on (a freeze failure stays MOB_ERR_FREEZE)
    this.reject(new GroupCutError(code === 'MOB_ERR_INTERNAL' ? 'MOB_ERR_GROUP_CUT' : code, reason, machine, details));
  }
}

function fmtMs(ms: number): string {
  return ms % 1000 === 0 ? `${ms / 1000} s` : `${ms} ms`;
}

/** A new group point id: sortable by time (gp-YYYYMMDDTHHMMSSmmmZ-xxxx). */
export function newGroupPointId(now = Date.now()): string {
  return `gp-${new Date(now).toISOString().replace(/[-:.]/g, '')}-${crypto.randomBytes(2).toString('hex')}`;
}

/** What a group point is on one machine's catalog. */
export interface GroupLabel { id: string; name: string; members: string[] }

export interface GroupPointOutcome {
  group: string;
  point: string;
  kind: GroupCutKind;
  /** Every member recorded its point. */
  complete: boolean;
  members: { agentId: string; pointId: string | null; frozenMs: number | null; error: { code: string; message: string } | null }[];
  convergeMs: number;
  freezeStepMs: number;
  waitedMs: number;
}

/** What the coordinator needs from the server (narrow: no server object). */
export interface GroupCoordinatorDeps {
  getGroup(name: string): ConsistencyGroup;
  listGroups(): ConsistencyGroup[];
  link: GroupLink;
  watchCuts(fn: (agentId: string, n: CutNotice) => void): () => void;
  /** Protection events the agents forward (a cut that failed on the agent after the commit). */
  watchEvents(fn: (agentId: string, e: Record<string, unknown>) => void): () => void;
  /** Records a history event (group-point, group-cut-failed). */
  event(agentId: string, kind: string, code: string | null, reason: string): void;
  log: Logger;
  timers?: Timers;
  convergeMs?: number;
  pointWaitMs?: number;
}

export class GroupCoordinator {
  private readonly running = new Map<string, GroupCutRun>();
  private readonly committed = new Map<string, { label: GroupLabel; at: number }>();
  private readonly lastAttempt = new Map<string, number>();
  private tick: NodeJS.Timeout | null = null;

  constructor(private readonly d: GroupCoordinatorDeps) {}

  private get timers(): Timers { return this.d.timers ?? realTimers; }

  /** The label a Cut frame of this agent naming this group point gets (null: not a group point committed to this agent). */
  labelFor(agentId: string, point: string): GroupLabel | null {
    const c = this.committed.get(point);
    return c && c.label.members.includes(agentId) ? c.label : null;
  }

  /** A group message from an agent's control connection. */
  onMessage(agentId: string, m: GroupAgentMessage): void {
    const run = [...this.running.values()].find((r) => r.point === m.point);
    if (run) run.onMessage(agentId, m);
    else this.d.log.info('group cut reply for no running cut ignored', { agent: agentId, type: m.type, point: m.point });
  }

  onDisconnect(agentId: string): void {
    for (const r of this.running.values()) r.onDisconnect(agentId);
  }

  /** Whether a cut of the group is running now. */
  busy(group: string): boolean { return this.running.has(group); }

  /**
   * One group cut of the named group, and the wait for the members' points. Resolves with the
   * outcome when every member recorded its point; throws GroupCutError (MOB_ERR_GROUP_CUT, or
   * the refusing member's code) naming the machine when the cut was aborted or a point is missing.
   */
  async cut(name: string, kind?: GroupCutKind): Promise<GroupPointOutcome> {
    const g = this.d.getGroup(name);
    if (this.running.has(g.name)) throw new MobilityError('MOB_ERR_GROUP_BUSY', `a cut of group ${g.name} is already running (point ${this.running.get(g.name)!.point})`);
    const t0 = this.timers.now();
    const point = newGroupPointId(t0);
    const k = kind ?? g.kind;
    const run = new GroupCutRun({ point, group: g.name, kind: k, members: g.members, boundMs: g.boundMs, convergeMs: this.d.convergeMs, link: this.d.link, timers: this.d.timers, log: this.d.log });
    this.running.set(g.name, run);
    this.lastAttempt.set(g.name, t0);
    const label: GroupLabel = { id: point, name: g.name, members: [...g.members] };
    const outcome: GroupPointOutcome = {
      group: g.name, point, kind: k, complete: false, convergeMs: 0, freezeStepMs: 0, waitedMs: 0,
      members: g.members.map((agentId) => ({ agentId, pointId: null, frozenMs: null, error: null })),
    };
    // watched before the commit is sent: a member's point can come right after it
    let settle: () => void = () => undefined;
    const allIn = new Promise<void>((r) => { settle = r; });
    const check = () => { if (outcome.members.every((m) => m.pointId !== null || m.error !== null)) settle(); };
    const unwatchCuts = this.d.watchCuts((agentId, n) => {
      const m = outcome.members.find((x) => x.agentId === agentId);
      if (!m || m.pointId !== null || m.error !== null || run.state !== 'committed') return;
      if ('point' in n) {
        if (n.point.group?.id !== point) return;
        m.pointId = n.point.id;
        m.frozenMs = n.point.frozenMs;
      } else {
        m.error = n.failed;
      }
      check();
    });
    const unwatchEvents = this.d.watchEvents((agentId, e) => {
      const m = outcome.members.find((x) => x.agentId === agentId);
      if (!m || m.pointId !== null || m.error !== null || run.state !== 'committed') return;
      if (e.event !== 'cut-failed' || e.groupPoint !== point) return;
      m.error = { code: typeof e.code === 'string' ? e.code : 'MOB_ERR_CUT', message: String(e.message ?? 'the cut failed on the agent') };
      check();
    });
    try {
      this.d.log.info('group cut starting', { group: g.name, point, kind: k, members: g.members, boundMs: g.boundMs });
      let c: GroupCutCommitted;
      try {
        c = await run.start();
      } catch (err) {
        const e = err as GroupCutError;
        this.d.log.warn('group cut aborted', { group: g.name, point, code: e.code, machine: e.machine, error: e.message });
        this.d.event(e.machine ?? g.members[0] ?? '', 'group-cut-failed', e.code, e.message);
        throw err;
      }
      this.committed.set(point, { label, at: this.timers.now() });
      this.prune();
      outcome.convergeMs = c.convergeMs;
      outcome.freezeStepMs = c.freezeStepMs;
      this.d.log.info('group cut committed', { group: g.name, point, convergeMs: c.convergeMs, freezeStepMs: c.freezeStepMs });
      const waitMs = this.d.pointWaitMs ?? GROUP_POINT_WAIT_MS;
      let timer: unknown = null;
      await Promise.race([allIn, new Promise<void>((r) => { timer = this.timers.set(r, waitMs); })]);
      if (timer !== null) this.timers.clear(timer);
      outcome.waitedMs = this.timers.now() - t0;
      const missing = outcome.members.filter((m) => m.pointId === null);
      outcome.complete = missing.length === 0;
      if (!outcome.complete) {
        const first = missing[0]!;
        const why = missing.map((m) => `${m.agentId}: ${m.error ? `${m.error.code}: ${m.error.message}` : `no point within ${fmtMs(waitMs)}`}`).join('; ');
        const msg = `group cut ${point} of group ${g.name} was committed, but not every machine recorded its point (${why}); the group point is incomplete and test failover of the group does not offer it`;
        this.d.log.warn('group point incomplete', { group: g.name, point, missing: missing.map((m) => m.agentId) });
        this.d.event(first.agentId, 'group-cut-failed', first.error?.code ?? 'MOB_ERR_GROUP_CUT', msg);
        throw new GroupCutError('MOB_ERR_GROUP_CUT', msg, first.agentId, outcome.members.map((m) => ({ agentId: m.agentId, state: m.pointId ? `point ${m.pointId}` : 'no point', ...(m.error ?? {}) })));
      }
      for (const m of outcome.members) this.d.event(m.agentId, 'group-point', null, `group point ${point} of group ${g.name}: recovery point ${m.pointId}`);
      this.d.log.info('group point recorded', { group: g.name, point, members: outcome.members.map((m) => `${m.agentId}:${m.pointId}`), waitedMs: outcome.waitedMs });
      return outcome;
    } finally {
      unwatchCuts();
      unwatchEvents();
      this.running.delete(g.name);
    }
  }

  private prune(): void {
    const now = this.timers.now();
    for (const [k, v] of this.committed) if (now - v.at > COMMITTED_TTL_MS) this.committed.delete(k);
  }

  /** Starts the group schedules: a group with an interval is cut when it is due and every member is connected. */
  start(): void {
    if (this.tick) return;
    this.tick = setInterval(() => this.scheduled(), SCHEDULE_TICK_MS);
    this.tick.unref();
  }

  /** One check of the group schedules (every second once started; tests call it with their clock). */
  scheduled(): void {
    let groups: ConsistencyGroup[];
    try { groups = this.d.listGroups(); } catch { return; }
    const now = this.timers.now();
    for (const g of groups) {
      if (g.intervalMs <= 0 || this.running.has(g.name) || !g.members.length) continue;
      const last = this.lastAttempt.get(g.name);
      if (last === undefined) { this.lastAttempt.set(g.name, now); continue; } // first interval starts now
      if (now - last < g.intervalMs) continue;
      if (!g.members.every((m) => this.d.link.connected(m))) continue;
      this.cut(g.name).catch((err: Error) => this.d.log.warn('scheduled group cut failed', { group: g.name, code: (err as MobilityError).code, error: err.message }));
    }
  }

  stop(): void {
    if (this.tick) clearInterval(this.tick);
    this.tick = null;
    for (const r of this.running.values()) r.cancel('the server is stopping');
  }
}

/** The group points of a set of catalogs: id -> per-agent points (complete when every member listed in the label has it). */
export function groupPoints(name: string, catalogs: Map<string, readonly RecoveryPoint[]>): { id: string; kind: GroupCutKind; takenAt: string; complete: boolean; members: string[]; points: Record<string, RecoveryPoint> }[] {
  const byId = new Map<string, { label: GroupLabel; points: Record<string, RecoveryPoint> }>();
  for (const [agentId, pts] of catalogs) {
    for (const p of pts) {
      if (!p.group || p.group.name !== name) continue;
      let e = byId.get(p.group.id);
      if (!e) { e = { label: p.group, points: {} }; byId.set(p.group.id, e); }
      e.points[agentId] = p;
    }
  }
  return [...byId.entries()].sort((a, b) => a[0].localeCompare(b[0])).map(([id, e]) => {
    const pts = Object.values(e.points);
    const takenAt = pts.map((p) => p.takenAt).sort()[0] ?? '';
    return {
      id, takenAt, members: e.label.members, points: e.points,
      kind: pts.length && pts.every((p) => p.kind === 'app') ? 'app' as const : 'crash' as const,
      complete: e.label.members.every((m) => e.points[m] !== undefined),
    };
  });
}
