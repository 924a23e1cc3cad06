/**
 * The last health each disk reported (agent Health frames), and events the server
 * itself notes on a disk (a refused point, an unreachable target) so status shows
 * them at once, before the agent's next report.
 */
import type { Health } from '../protocol/frame-codec.js';

/** Last Health report of a disk, as kept by the server for status. */
export interface DiskHealthRecord {
  state: string; reason: string; backlogBytes: number; dataLagMs: number; churnBytesPerSec: number;
  freezeFailures: number; lastFreezeMs: number; progressPermille: number; receivedAt: number; connected: boolean;
}

/**
 * What a listener of the board hears (the history recorder): a report of a disk, a state the
 * server noted on it, or the end of its session. Called synchronously: a listener must only
 * update memory (no I/O on the data path).
 */
export interface HealthChange { kind: 'report' | 'note' | 'disconnect'; agentId: string; diskId: string; rec: DiskHealthRecord }

export class HealthBoard {
  /** agent -> disk -> last health */
  private readonly byAgent = new Map<string, Map<string, DiskHealthRecord>>();
  private readonly listeners = new Set<(c: HealthChange) => void>();

  /** Calls fn on every change from now on, until the returned function is called. */
  listen(fn: (c: HealthChange) => void): () => void {
    this.listeners.add(fn);
    return () => { this.listeners.delete(fn); };
  }

  private emit(c: HealthChange): void {
    for (const fn of this.listeners) {
      try { fn(c); } catch { /* a listener never disturbs the data path */ }
    }
  }

  get(agentId: string, diskId: string): DiskHealthRecord | null {
    return this.byAgent.get(agentId)?.get(diskId) ?? null;
  }

  /** Every disk of an agent with a record. */
  entries(agentId: string): [string, DiskHealthRecord][] {
    return [...(this.byAgent.get(agentId)?.entries() ?? [])];
  }

  /** Every disk with a record, as [agent, disk]. */
  all(): [string, string][] {
    const out: [string, string][] = [];
    for (const [a, m] of this.byAgent) for (const d of m.keys()) out.push([a, d]);
    return out;
  }

  forget(agentId: string, diskId: string): void {
    this.byAgent.get(agentId)?.delete(diskId);
  }

  private map(agentId: string): Map<string, DiskHealthRecord> {
    let m = this.byAgent.get(agentId);
    if (!m) this.byAgent.set(agentId, (m = new Map()));
    return m;
  }

  /** Marks a disk's health at once (before the agent's next report), e.g. when the server refused a point. */
  note(agentId: string, diskId: string, state: string, reason: string): void {
    const m = this.map(agentId);
    const h = m.get(diskId);
    const rec: DiskHealthRecord = {
      state, reason, backlogBytes: h?.backlogBytes ?? 0, dataLagMs: h?.dataLagMs ?? 0, churnBytesPerSec: h?.churnBytesPerSec ?? 0,
      freezeFailures: h?.freezeFailures ?? 0, lastFreezeMs: h?.lastFreezeMs ?? 0, progressPermille: h?.progressPermille ?? 0, receivedAt: Date.now(), connected: h?.connected ?? true,
    };
    m.set(diskId, rec);
    if (this.listeners.size) this.emit({ kind: 'note', agentId, diskId, rec });
  }

  record(agentId: string, diskIds: string[], h: Health): void {
    const m = this.map(agentId);
    for (const d of h.disks) {
      const id = diskIds[d.disk];
      if (!id) continue;
      const rec: DiskHealthRecord = {
        state: d.state, reason: d.reason, backlogBytes: d.backlogBytes, dataLagMs: d.dataLagMs, churnBytesPerSec: d.churnBytesPerSec,
        freezeFailures: d.freezeFailures, lastFreezeMs: d.lastFreezeMs, progressPermille: d.progressPermille, receivedAt: Date.now(), connected: true,
      };
      m.set(id, rec);
      if (this.listeners.size) this.emit({ kind: 'report', agentId, diskId: id, rec });
    }
  }

  markDisconnected(agentId: string, diskIds: string[]): void {
    const m = this.byAgent.get(agentId);
    if (!m) return;
    for (const id of diskIds) {
      const h = m.get(id);
      if (!h) continue;
      const was = h.connected;
      h.connected = false;
      if (was && this.listeners.size) this.emit({ kind: 'disconnect', agentId, diskId: id, rec: h });
    }
  }
}
