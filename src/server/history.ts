/**
 * History: health samples, events and RPO alerts kept in the configuration database.
 *
 * The health board tells this recorder of every report (synchronously: it only updates memory);
 * each disk's reports are aggregated per window (10 s; MOBILITY_HISTORY_WINDOW_MS is a test knob)
 * into one sample: the highest data lag, backlog and RPO, the mean churn, the last state. A timer
 * writes the finished windows, the events noted since and the alerts fired or cleared in one
 * transaction, so no frame of the data path waits on the database. A disk whose session ended
 * goes on being sampled (state disconnected, its RPO growing) so an RPO alert fires for it too.
 *
 * Events: a disk's state changed (with its reason), a recovery point recorded or refused, a cut
 * failed, a session lost, an alert fired or cleared. Alerts: the age of a disk's newest recovery
 * point over its machine's policy threshold fires one (with the RPO and the threshold); it is
 * cleared once the RPO is back under. A disk without any recovery point yet (initial sync) fires none.
 *
 * Retention (ConfigDb.compactHistory, at start and every hour): 10 s rows older than a day become
 * 1-minute rows; rows, events and cleared alerts older than 7 days are deleted.
 */
import type { Logger } from '../log.js';
import type { AlertRow, ConfigDb, HealthSample, HistoryEvent } from './config-db.js';
import type { HealthBoard, HealthChange } from './health.js';
import type { CutNotice } from './points.js';

export const DEFAULT_HISTORY_WINDOW_MS = 10_000;
const COMPACT_EVERY_MS = 3600_000;

export interface HistoryDeps {
  db: ConfigDb;
  log: Logger;
  health: HealthBoard;
  /** Aggregation window of samples (default 10 s). */
  windowMs?: number;
  /** The time (ms) of the newest recovery point of each disk of an agent. */
  newestPoints(agentId: string): Promise<Map<string, number>>;
  /** The RPO alert threshold of an agent's disks (its policy's, else the server's default). */
  thresholdFor(agentId: string): number;
  watchCuts(fn: (agentId: string, n: CutNotice) => void): () => void;
}

interface Window {
  agentId: string; diskId: string; t: number; lastAt: number;
  maxLag: number; maxBacklog: number; churnSum: number; n: number; state: string;
}

const key = (a: string, d: string) => `${a}\u0000${d}`;

export function fmtMs(ms: number): string {
  if (ms < 1000) return `${Math.round(ms)} ms`;
  if (ms < 120_000) return `${(ms / 1000).toFixed(ms < 10_000 ? 1 : 0)} s`;
  if (ms < 7200_000) return `${(ms / 60_000).toFixed(1)} min`;
  return `${(ms / 3600_000).toFixed(1)} h`;
}

export class HistoryRecorder {
  readonly windowMs: number;
  private readonly open = new Map<string, Window>();
  private ready: Window[] = [];
  private events: Omit<HistoryEvent, 'id'>[] = [];
  private readonly lastState = new Map<string, string>();
  private readonly active = new Map<string, AlertRow>();
  /** The last coded error that ended an agent's session (the reason of a session lost just after). */
  private readonly lastSessionError = new Map<string, { code: string; at: number }>();
  private timer: NodeJS.Timeout | null = null;
  private compactTimer: NodeJS.Timeout | null = null;
  private unsub: (() => void)[] = [];
  private flushing: Promise<void> = Promise.resolve();
  stopped = false;

  constructor(private readonly d: HistoryDeps) {
    this.windowMs = d.windowMs ?? DEFAULT_HISTORY_WINDOW_MS;
  }

  start(): void {
    for (const s of this.d.db.lastStates()) this.lastState.set(key(s.agentId, s.diskId), s.state);
    for (const a of this.d.db.listAlerts({ active: true })) this.active.set(key(a.agentId, a.diskId), a);
    this.compact();
    this.unsub.push(this.d.health.listen((c) => this.onHealth(c)));
    this.unsub.push(this.d.watchCuts((agentId, n) => this.onCut(agentId, n)));
    this.timer = setInterval(() => { void this.flush(); }, this.windowMs);
    this.timer.unref();
    this.compactTimer = setInterval(() => this.compact(), COMPACT_EVERY_MS);
    this.compactTimer.unref();
  }

  /** Downsampling and retention now (also at start and every hour). */
  compact(nowMs = Date.now()): void {
    try {
      const r = this.d.db.compactHistory(nowMs);
      if (r.downsampled || r.deleted) this.d.log.info('history compacted', r);
    } catch (err) {
      this.d.log.error('history compaction failed', { error: (err as Error).message });
    }
  }

  /** An event of another part of the server (group-point, group-cut-failed), kept with the rest. */
  record(agentId: string, kind: string, code: string | null, reason: string): void {
    this.event({ agentId, diskId: null, kind, state: null, code, reason });
  }

  private event(e: Omit<HistoryEvent, 'id' | 't'> & { t?: number }): void {
    this.events.push({ t: e.t ?? Date.now(), agentId: e.agentId, diskId: e.diskId, kind: e.kind, state: e.state, code: e.code, reason: e.reason });
  }

  private onHealth(c: HealthChange): void {
    const k = key(c.agentId, c.diskId);
    const now = c.rec.receivedAt;
    if (c.kind === 'disconnect') {
      const se = this.lastSessionError.get(c.agentId);
      const code = se && now - se.at < 60_000 ? se.code : null;
      this.event({ agentId: c.agentId, diskId: c.diskId, kind: 'session-lost', state: c.rec.state, code, reason: code ? `the session ended with ${code}` : 'the session ended' });
      this.lastState.set(k, 'disconnected');
      return;
    }
    const prev = this.lastState.get(k);
    if (prev !== c.rec.state) {
      this.event({ agentId: c.agentId, diskId: c.diskId, kind: 'state', state: c.rec.state, code: null, reason: `${prev ?? 'new'} -> ${c.rec.state}${c.rec.reason ? `: ${c.rec.reason}` : ''}` });
      this.lastState.set(k, c.rec.state);
    }
    if (c.kind !== 'report') {
      // a state the server noted: it shows as the window's state, not as a figure
      const w = this.open.get(k);
      if (w) w.state = c.rec.state;
      return;
    }
    const t = Math.floor(now / this.windowMs) * this.windowMs;
    let w = this.open.get(k);
    if (w && w.t !== t) { this.ready.push(w); w = undefined; }
    if (!w) {
      w = { agentId: c.agentId, diskId: c.diskId, t, lastAt: now, maxLag: 0, maxBacklog: 0, churnSum: 0, n: 0, state: c.rec.state };
      this.open.set(k, w);
    }
    w.lastAt = now;
    w.maxLag = Math.max(w.maxLag, c.rec.dataLagMs);
    w.maxBacklog = Math.max(w.maxBacklog, c.rec.backlogBytes);
    w.churnSum += c.rec.churnBytesPerSec;
    w.n++;
    w.state = c.rec.state;
  }

  private onCut(agentId: string, n: CutNotice): void {
    if ('point' in n) {
      for (const diskId of Object.keys(n.point.disks)) {
        this.event({ agentId, diskId, kind: 'point', state: null, code: null, reason: `recovery point ${n.point.id} (${n.point.kind}) recorded` });
      }
    } else {
      const kind = n.failed.code === 'MOB_ERR_POINT_UNVERIFIED' ? 'point-refused' : 'cut-failed';
      this.event({ agentId, diskId: null, kind, state: null, code: n.failed.code, reason: n.failed.message });
    }
  }

  /** A replication session ended with a coded error (the server's SessionMetrics.sessionError). */
  sessionError(code: string, agentId: string | null, diskIds: string[]): void {
    if (!agentId) return;
    this.lastSessionError.set(agentId, { code, at: Date.now() });
    if (code === 'MOB_ERR_CUT') {
      for (const diskId of diskIds.length ? diskIds : [null]) this.event({ agentId, diskId, kind: 'cut-failed', state: null, code, reason: 'the session sent a cut the server refused; the session was closed' });
    }
  }

  /** Writes what is due: windows that ended, samples of disconnected disks, events, alerts. */
  flush(final = false): Promise<void> {
    this.flushing = this.flushing.then(() => this.doFlush(final)).catch((err: Error) => {
      this.d.log.error('history flush failed', { error: err.message });
    });
    return this.flushing;
  }

  private async doFlush(final: boolean): Promise<void> {
    const now = Date.now();
    const due = this.ready;
    this.ready = [];
    for (const [k, w] of this.open) {
      if (final || w.t + this.windowMs <= now) { due.push(w); this.open.delete(k); }
    }
    // every disk the board knows, and those with an alert open: their RPO now
    const disks = new Map<string, { agentId: string; diskId: string }>();
    for (const [agentId, diskId] of this.d.health.all()) disks.set(key(agentId, diskId), { agentId, diskId });
    for (const a of this.active.values()) disks.set(key(a.agentId, a.diskId), { agentId: a.agentId, diskId: a.diskId });
    const agents = new Set([...disks.values()].map((x) => x.agentId));
    for (const w of due) agents.add(w.agentId);
    const newest = new Map<string, Map<string, number>>();
    for (const a of agents) {
      try { newest.set(a, await this.d.newestPoints(a)); } catch { newest.set(a, new Map()); }
    }
    const pointAt = (a: string, d: string) => newest.get(a)?.get(d) ?? null;
    const samples: HealthSample[] = due.map((w) => {
      const p = pointAt(w.agentId, w.diskId);
      return {
        agentId: w.agentId, diskId: w.diskId, resMs: this.windowMs, t: w.t, rpoMs: p === null ? null : Math.max(0, w.lastAt - p),
        dataLagMs: w.maxLag, backlogBytes: w.maxBacklog, churnBytesPerSec: w.n ? w.churnSum / w.n : 0, state: w.state,
      };
    });
    const sampled = new Set(due.map((w) => `${key(w.agentId, w.diskId)}\u0000${w.t}`));
    const lastWindow = Math.floor(now / this.windowMs) * this.windowMs - this.windowMs;
    for (const { agentId, diskId } of disks.values()) {
      const h = this.d.health.get(agentId, diskId);
      if (!h || h.connected) continue;
      const k = key(agentId, diskId);
      if (this.open.has(k) || sampled.has(`${k}\u0000${lastWindow}`)) continue;
      const p = pointAt(agentId, diskId);
      samples.push({
        agentId, diskId, resMs: this.windowMs, t: lastWindow, rpoMs: p === null ? null : Math.max(0, now - p),
        dataLagMs: null, backlogBytes: null, churnBytesPerSec: null, state: h.state === 'target-unavailable' ? h.state : 'disconnected',
      });
    }
    // alerts
    const fired: Omit<AlertRow, 'id'>[] = [];
    const firedKeys: string[] = [];
    const cleared: { id: number; clearedAt: number; clearReason: string }[] = [];
    for (const { agentId, diskId } of disks.values()) {
      const k = key(agentId, diskId);
      const p = pointAt(agentId, diskId);
      const threshold = this.d.thresholdFor(agentId);
      const a = this.active.get(k);
      if (p === null) continue;
      const rpo = Math.max(0, now - p);
      if (!a && rpo > threshold) {
        const reason = `RPO ${fmtMs(rpo)} is over the threshold ${fmtMs(threshold)} (newest recovery point ${new Date(p).toISOString()})`;
        fired.push({ agentId, diskId, kind: 'rpo', firedAt: now, clearedAt: null, rpoMs: rpo, thresholdMs: threshold, reason, clearReason: null });
        firedKeys.push(k);
        this.event({ t: now, agentId, diskId, kind: 'alert-fired', state: null, code: null, reason });
      } else if (a && rpo <= threshold) {
        const clearReason = `RPO ${fmtMs(rpo)} is back under the threshold ${fmtMs(threshold)} (recovery point of ${new Date(p).toISOString()})`;
        cleared.push({ id: a.id, clearedAt: now, clearReason });
        this.active.delete(k);
        this.event({ t: now, agentId, diskId, kind: 'alert-cleared', state: null, code: null, reason: clearReason });
      }
    }
    const events = this.events;
    this.events = [];
    if (!samples.length && !events.length && !fired.length && !cleared.length) return;
    const ids = this.d.db.writeHistory({ samples, events, fired, cleared });
    ids.forEach((id, i) => this.active.set(firedKeys[i]!, { ...fired[i]!, id }));
  }

  /** Stops the timers and writes what is pending (before the database closes). */
  async stop(): Promise<void> {
    if (this.stopped) return;
    this.stopped = true;
    if (this.timer) clearInterval(this.timer);
    if (this.compactTimer) clearInterval(this.compactTimer);
    for (const u of this.unsub.splice(0)) u();
    await this.flush(true);
  }
}
