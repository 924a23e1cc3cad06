/**
 * Jobs as the console shows them:
 *
 *  - actions started from the console (test failover, its cleanup, failover, enable, disable,
 *    cut, policy changes): kept in memory while the server runs, the newest `limit` (their
 *    outcome is also in the audit log, which survives restarts);
 *  - scans (initial sync, resync) of every disk, from the status: progress, and throughput and
 *    ETA measured by the console from the progress it saw since the scan's first report.
 */
import type { DiskStatus } from '../disk-status.js';

export type JobState = 'running' | 'succeeded' | 'failed';

export interface ActionJob {
  id: number;
  kind: string;
  /** What it acts on: agent, agent/disk, policy name. */
  target: string;
  agent: string | null;
  operator: string;
  startedAt: number;
  endedAt: number | null;
  state: JobState;
  /** The outcome in one line: what was made, or the error code and message. */
  summary: string;
}

export interface ScanJob {
  agent: string; disk: string; kind: 'initial-sync' | 'resyncing';
  pct: number;
  /** Bytes per second since the console first saw this scan; null until two reports. */
  bytesPerSec: number | null;
  etaMs: number | null;
  sizeBytes: number;
}

export class JobBoard {
  private readonly jobs: ActionJob[] = [];
  private seq = 0;
  private readonly scans = new Map<string, { t0: number; p0: number; kind: string }>();
  /** Changes every time a job starts or ends (the live view re-renders on a change). */
  version = 0;

  constructor(private readonly limit = 200, private readonly now: () => number = Date.now) {}

  start(kind: string, target: string, agent: string | null, operator: string): ActionJob {
    const j: ActionJob = { id: ++this.seq, kind, target, agent, operator, startedAt: this.now(), endedAt: null, state: 'running', summary: '' };
    this.jobs.unshift(j);
    if (this.jobs.length > this.limit) this.jobs.length = this.limit;
    this.version++;
    return j;
  }

  finish(j: ActionJob, ok: boolean, summary: string): void {
    j.state = ok ? 'succeeded' : 'failed';
    j.endedAt = this.now();
    j.summary = summary;
    this.version++;
  }

  list(agent: string | null = null): ActionJob[] {
    return agent === null ? [...this.jobs] : this.jobs.filter((j) => j.agent === agent);
  }

  /** The running scans among the disks, with throughput and ETA; forgets scans that ended. */
  scanJobs(disks: readonly DiskStatus[]): ScanJob[] {
    const t = this.now();
    const out: ScanJob[] = [];
    const live = new Set<string>();
    for (const d of disks) {
      if ((d.state !== 'initial-sync' && d.state !== 'resyncing') || d.progressPermille === null) continue;
      const key = `${d.agent}/${d.disk}`;
      live.add(key);
      let s = this.scans.get(key);
      if (!s || s.kind !== d.state || d.progressPermille < s.p0) {
        s = { t0: t, p0: d.progressPermille, kind: d.state };
        this.scans.set(key, s);
      }
      const dt = (t - s.t0) / 1000;
      const done = ((d.progressPermille - s.p0) / 1000) * d.sizeBytes;
      const bytesPerSec = dt >= 1 && done > 0 ? done / dt : null;
      const left = ((1000 - d.progressPermille) / 1000) * d.sizeBytes;
      out.push({
        agent: d.agent, disk: d.disk, kind: d.state, pct: d.progressPermille / 10, sizeBytes: d.sizeBytes,
        bytesPerSec, etaMs: bytesPerSec ? Math.round((left / bytesPerSec) * 1000) : null,
      });
    }
    for (const k of this.scans.keys()) if (!live.has(k)) this.scans.delete(k);
    return out;
  }
}
