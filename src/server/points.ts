/**
 * The recovery points of every agent: catalogs (loaded once, then kept), the per-agent
 * lock that serialises cuts, pruning, failover and test failover, and recording a cut.
 *
 * A cut becomes a point only with evidence: every store has made durable what came
 * before the cut, the source's sampled page digests match the replica, then the backend
 * prepares the point's data (an undo epoch, a blob snapshot), the catalog records it,
 * and the backend commits it. Points past retention are pruned afterwards.
 */
import fsp from 'node:fs/promises';
import path from 'node:path';
import { MobilityError } from '../errors.js';
import type { Logger } from '../log.js';
import type { Cut, CutMismatch } from '../protocol/frame-codec.js';
import { diskPoint, PointCatalog, type PointKind, type RecoveryPoint } from '../target/catalog.js';
import type { PointRef, ReplicaBackend, ReplicaStore } from '../target/replica-store.js';
import type { HealthBoard } from './health.js';

/** One disk of a cut, as recordCut needs it: its store, the cut's sequence and the source's samples. */
export interface CutStore { index: number; diskId: string; store: ReplicaStore; seq: number; pageSize: number; samplePages: number[]; sampleDigests: Uint8Array }
export interface CutOutcome { pointId: string | null; mismatches: CutMismatch[]; message: string; verifiedPages: number }

/** What a cut watcher hears (watchCuts): a recorded recovery point, or a cut that failed. */
export type CutNotice = { point: RecoveryPoint } | { failed: { code: string; message: string } };

export interface PointStats { points: number; pruned: number; unverified: number }

/** Compares the source's sampled page digests with the replica's pages; returns the differences. */
async function verifySamples(s: CutStore): Promise<CutMismatch[]> {
  const out: CutMismatch[] = [];
  const src = Buffer.from(s.sampleDigests.buffer, s.sampleDigests.byteOffset, s.sampleDigests.byteLength);
  for (const [i, page] of s.samplePages.entries()) {
    const have = (await s.store.pageDigests(page, 1, s.pageSize)).readBigUInt64LE(0);
    const want = src.readBigUInt64LE(8 * i);
    if (have !== want) out.push({ disk: s.index, page, replicaDigest: have, sourceDigest: want });
  }
  return out;
}

function hex64(v: bigint): string {
  return v.toString(16).padStart(16, '0');
}

export class PointBook {
  private readonly catalogs = new Map<string, Promise<PointCatalog>>();
  private readonly agentLocks = new Map<string, Promise<unknown>>();
  private readonly cutWatchers = new Set<(agentId: string, n: CutNotice) => void>();

  constructor(private readonly o: {
    /** The server's metadata directory of an agent (points.json, failover.json). */
    agentDir: (agentId: string) => string;
    backend: ReplicaBackend;
    health: HealthBoard;
    log: Logger;
    stats: PointStats;
    retentionFor: (agentId: string) => number;
    /** The group label of a group point committed to this agent (null: not one). */
    groupLabel?: (agentId: string, groupPoint: string) => RecoveryPoint['group'] | null;
  }) {}

  /** The recovery point catalog of an agent (loaded once, then kept). */
  catalog(agentId: string): Promise<PointCatalog> {
    let c = this.catalogs.get(agentId);
    if (!c) {
      c = PointCatalog.load(this.o.agentDir(agentId));
      c.catch(() => this.catalogs.delete(agentId));
      this.catalogs.set(agentId, c);
    }
    return c;
  }

  /** Runs fn with the agent's catalog lock held (cuts, pruning, failover, test failover). */
  withAgentLock<T>(agentId: string, fn: () => Promise<T>): Promise<T> {
    const prev = this.agentLocks.get(agentId) ?? Promise.resolve();
    const run = prev.catch(() => undefined).then(fn);
    this.agentLocks.set(agentId, run.catch(() => undefined));
    return run;
  }

  /** Forgets an agent's recovery points (failback starts a new timeline; disable removes them). */
  async resetCatalog(agentId: string): Promise<void> {
    this.catalogs.delete(agentId);
    await fsp.rm(path.join(this.o.agentDir(agentId), 'points.json'), { force: true });
  }

  /** Calls fn for every recovery point recorded (and cut failure notified) from now on, until the returned function is called. */
  watchCuts(fn: (agentId: string, n: CutNotice) => void): () => void {
    this.cutWatchers.add(fn);
    return () => { this.cutWatchers.delete(fn); };
  }

  notifyCut(agentId: string, n: CutNotice): void {
    for (const fn of [...this.cutWatchers]) {
      try { fn(agentId, n); } catch (err) { this.o.log.error('cut watcher failed', { error: (err as Error).message }); }
    }
  }

  /** Has the backend drop the data of points the catalog no longer holds. */
  private async dropPoint(agentId: string, p: RecoveryPoint): Promise<void> {
    for (const d of Object.keys(p.disks)) {
      await this.o.backend.prunePoint(agentId, d, diskPoint(p, d)).catch((err: Error) => {
        // the catalog no longer names it: the orphan goes when the disk is next opened
        this.o.log.warn('could not delete the data of a pruned point', { agent: agentId, disk: d, point: p.id, error: err.message });
      });
    }
  }

  /** Removes points past the agent's retention (the newest is always kept). */
  async prune(agentId: string): Promise<RecoveryPoint[]> {
    const cat = await this.catalog(agentId);
    const removed = await cat.prune(new Date(Date.now() - this.o.retentionFor(agentId)), (p) => this.dropPoint(agentId, p));
    this.o.stats.pruned += removed.length;
    if (removed.length) this.o.log.info('recovery points pruned', { agent: agentId, points: removed.map((p) => p.id) });
    return removed;
  }

  /**
   * Records a cut as a recovery point (see the file comment). A sample that differs refuses the
   * point with MOB_ERR_POINT_UNVERIFIED (the mismatches are returned, nothing is recorded).
   */
  async recordCut(agentId: string, stores: CutStore[], cut: Cut): Promise<CutOutcome> {
    return this.withAgentLock(agentId, async () => {
      for (const s of stores) {
        await s.store.whenApplied();
        // a batch before the cut that failed (a full disk, say) means the replica is not at the cut
        if (s.store.failure) throw new MobilityError(s.store.failure.code, `disk ${s.diskId}: the replica store failed before the cut: ${s.store.failure.message}`);
        if (!s.store.initialComplete) throw new MobilityError('MOB_ERR_CUT', `disk ${s.diskId} has not completed its initial replication; a cut cannot be a recovery point yet`);
      }
      // nothing after the cut has been submitted yet (the session handles frames in order), so the
      // replica as it is now is the replica at the cut
      const mismatches: CutMismatch[] = [];
      const verification: Record<string, { pages: number }> = {};
      for (const s of stores) {
        mismatches.push(...(await verifySamples(s)));
        verification[s.diskId] = { pages: s.samplePages.length };
      }
      if (mismatches.length) {
        const byDisk = (m: CutMismatch) => stores.find((s) => s.index === m.disk)?.diskId ?? String(m.disk);
        const first = mismatches[0]!;
        const message = `sampled verification of cut ${cut.cutId} failed: ${mismatches.length} of ${stores.reduce((n, s) => n + s.samplePages.length, 0)} sampled pages differ `
          + `(first: disk ${byDisk(first)} page ${first.page} (byte ${first.page * (stores.find((s) => s.index === first.disk)?.pageSize ?? 0)}): `
          + `replica ${hex64(first.replicaDigest)}, source ${hex64(first.sourceDigest)}); no recovery point was recorded and the disk is resynced`;
        this.o.log.warn('recovery point refused', { agent: agentId, cutId: cut.cutId, code: 'MOB_ERR_POINT_UNVERIFIED', error: message, disks: [...new Set(mismatches.map(byDisk))] });
        this.o.stats.unverified++;
        const damaged = [...new Set(mismatches.map(byDisk))];
        for (const d of damaged) this.o.health.note(agentId, d, 'resync-required', message);
        // the damage predates this cut: points already recorded may hold it too
        const suspect = await (await this.catalog(agentId)).markSuspect(damaged, message);
        if (suspect) this.o.log.warn('earlier recovery points marked suspect', { agent: agentId, disks: damaged, points: suspect });
        this.notifyCut(agentId, { failed: { code: 'MOB_ERR_POINT_UNVERIFIED', message } });
        return { pointId: null, mismatches, message, verifiedPages: 0 };
      }
      const cat = await this.catalog(agentId);
      const id = cat.nextId();
      // the backend captures each disk's data first (a crash before the catalog write leaves an
      // orphan it removes later), then the catalog records the point, then the backend keeps it
      const disks: Record<string, { seq: number; sizeBytes: number; ref?: PointRef }> = {};
      for (const s of stores) {
        const ref = await s.store.preparePoint(id);
        disks[s.diskId] = { seq: s.seq, sizeBytes: s.store.sizeBytes, ...(Object.keys(ref).length ? { ref } : {}) };
      }
      // a group point the coordinator committed to this agent; anything else stays a machine point
      const group = cut.groupPoint ? this.o.groupLabel?.(agentId, cut.groupPoint) ?? null : null;
      let note = cut.note;
      if (cut.groupPoint && !group) {
        note = [note, `the cut named group point ${cut.groupPoint}, which this server did not commit to this machine: recorded as a machine point`].filter(Boolean).join('; ');
        this.o.log.warn('cut names an unknown group point', { agent: agentId, cutId: cut.cutId, groupPoint: cut.groupPoint });
      }
      const point = await cat.add({
        kind: (cut.kind === 'app' ? 'app' : 'crash') as PointKind, takenAt: new Date(cut.takenAtMs || Date.now()).toISOString(),
        frozenMs: cut.frozenMs, note, cutId: cut.cutId, verification, ...(group ? { group } : {}), disks,
      });
      for (const s of stores) await s.store.commitPoint(point.id);
      this.o.stats.points++;
      await this.prune(agentId);
      const verifiedPages = Object.values(verification).reduce((n, v) => n + v.pages, 0);
      this.o.log.info('recovery point recorded', { agent: agentId, point: point.id, group: point.group?.id, kind: point.kind, frozenMs: cut.frozenMs, disks: Object.keys(disks), verifiedPages });
      this.notifyCut(agentId, { point });
      return { pointId: point.id, mismatches: [], message: '', verifiedPages };
    });
  }
}
