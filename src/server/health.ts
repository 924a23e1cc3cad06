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

export class HealthBoard {
  /** agent -> disk -> last health */
  private readonly byAgent = new Map<string, Map<string, DiskHealthRecord>>();

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
    m.set(diskId, {
      state, reason, backlogBytes: h?.backlogBytes ?? 0, dataLagMs: h?.dataLagMs ?? 0, churnBytesPerSec: h?.churnBytesPerSec ?? 0,
      freezeFailures: h?.freezeFailures ?? 0, lastFreezeMs: h?.lastFreezeMs ?? 0, progressPermille: h?.progressPermille ?? 0, receivedAt: Date.now(), connected: h?.connected ?? true,
    });
  }

  record(agentId: string, diskIds: string[], h: Health): void {
    const m = this.map(agentId);
    for (const d of h.disks) {
      const id = diskIds[d.disk];
      if (!id) continue;
      m.set(id, {
        state: d.state, reason: d.reason, backlogBytes: d.backlogBytes, dataLagMs: d.dataLagMs, churnBytesPerSec: d.churnBytesPerSec,
        freezeFailures: d.freezeFailures, lastFreezeMs: d.lastFreezeMs, progressPermille: d.progressPermille, receivedAt: Date.now(), connected: true,
      });
    }
  }

  markDisconnected(agentId: string, diskIds: string[]): void {
    const m = this.byAgent.get(agentId);
    if (!m) return;
    for (const id of diskIds) {
      const h = m.get(id);
      if (h) h.connected = false;
    }
  }
}
