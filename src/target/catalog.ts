/**
 * Recovery points of one agent: the catalog (replicas/<agent>/points.json,
 * replaced durably as a whole) and the operations on it.
 *
 * A point exists exactly when it is in the catalog. Recording a cut writes the
 * catalog first and only then switches each disk's undo epoch, so a server
 * killed at any instant leaves every point complete or absent: a point in the
 * catalog whose epoch switch did not happen gets it when the store reopens
 * (the current epoch is always the newest point that includes the disk).
 * Pruning removes points from the catalog first and then has the backend drop
 * their data; data no point names is removed when a disk is opened (the
 * backend's removeOrphans).
 *
 * What a point is made of on the target is the backend's business (undo
 * journals of the local store, blob snapshots in Azure): the catalog keeps,
 * per disk, the opaque reference the backend returned when the point was
 * prepared (see target/replica-store.ts).
 */
import fsp from 'node:fs/promises';
import path from 'node:path';
import { MobilityError } from '../errors.js';
import { writeFileDurable } from '../util/durable-file.js';
import type { DiskPoint, PointRef } from './replica-store.js';

export type PointKind = 'crash' | 'app';

export interface RecoveryPoint {
  id: string;
  /** Position in the catalog order (increasing). */
  n: number;
  kind: PointKind;
  /** Server clock when recorded. */
  recordedAt: string;
  /** Source clock when the filesystems were frozen. */
  takenAt: string;
  frozenMs: number;
  note: string;
  /** The agent's id of the cut (hooks see it as MOBILITY_CUT_ID); 0 when unknown. */
  cutId?: number;
  /**
   * Evidence: per disk, how many pages sampled at the source inside the freeze matched the
   * replica at this point's sequence (absent in points recorded before verification existed).
   */
  verification?: Record<string, { pages: number }>;
  /**
   * Set when a later cut's verification found the replica of one of its disks damaged: this
   * point may hold the damage (undo captured afterwards restores the damaged bytes), whatever its
   * own verification said. Test failover warns; prefer a point recorded after the repair.
   */
  suspect?: { at: string; disks: string[]; reason: string };
  /**
   * Set when the point is this machine's part of a group point (a cut of a consistency group,
   * committed by the configuration server): the group point's id, the group, and the machines
   * it was taken on. Absent on the machine's own points.
   */
  group?: { id: string; name: string; members: string[] };
  /** Per disk: the cut's sequence, the disk's size then, and the backend's reference to the point's data. */
  disks: Record<string, { seq: number; sizeBytes: number; ref?: PointRef }>;
}

/** One disk of a point, as the backend needs it. */
export function diskPoint(p: RecoveryPoint, diskId: string): DiskPoint {
  const d = p.disks[diskId];
  if (!d) throw new MobilityError('MOB_ERR_UNKNOWN_DISK', `recovery point ${p.id} does not include disk ${diskId}`);
  return { pointId: p.id, seq: d.seq, sizeBytes: d.sizeBytes, ref: d.ref ?? {} };
}

interface CatalogFile { version: 1; next: number; points: RecoveryPoint[] }

export class PointCatalog {
  private constructor(readonly agentDir: string, private data: CatalogFile) {}

  get file(): string { return path.join(this.agentDir, 'points.json'); }

  /** Loads the catalog of an agent (empty when none). Throws MOB_ERR_STATE_CORRUPT when unreadable. */
  static async load(agentDir: string): Promise<PointCatalog> {
    const file = path.join(agentDir, 'points.json');
    try {
      const data = JSON.parse(await fsp.readFile(file, 'utf8')) as CatalogFile;
      if (data.version !== 1 || !Array.isArray(data.points)) throw new Error('unsupported catalog version');
      return new PointCatalog(agentDir, data);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return new PointCatalog(agentDir, { version: 1, next: 1, points: [] });
      throw new MobilityError('MOB_ERR_STATE_CORRUPT', `recovery point catalog ${file} is unreadable: ${(err as Error).message}`);
    }
  }

  list(): readonly RecoveryPoint[] { return this.data.points; }

  /** Newest point that includes the disk: its undo epoch is the current one. */
  latestFor(diskId: string): RecoveryPoint | null {
    for (let i = this.data.points.length - 1; i >= 0; i--) if (this.data.points[i].disks[diskId]) return this.data.points[i];
    return null;
  }

  /** Resolves 'latest', 'latest-app' or an id. Throws MOB_ERR_UNKNOWN_POINT. */
  resolve(ref: string): RecoveryPoint {
    const pts = this.data.points;
    let p: RecoveryPoint | undefined;
    if (ref === 'latest') p = pts[pts.length - 1];
    else if (ref === 'latest-app') p = [...pts].reverse().find((x) => x.kind === 'app');
    else p = pts.find((x) => x.id === ref);
    if (!p) throw new MobilityError('MOB_ERR_UNKNOWN_POINT', ref.startsWith('latest') ? `no ${ref === 'latest-app' ? 'app-consistent ' : ''}recovery point exists yet` : `no recovery point ${ref} (see mobility points)`);
    return p;
  }

  /** Points from p (inclusive) on that include the disk, oldest first: the epochs to revert for p. */
  epochsFrom(p: RecoveryPoint, diskId: string): RecoveryPoint[] {
    return this.data.points.filter((x) => x.n >= p.n && x.disks[diskId]);
  }

  /** Every point that includes the disk, oldest first, as the backend needs them. */
  diskPoints(diskId: string): DiskPoint[] {
    return this.data.points.filter((p) => p.disks[diskId]).map((p) => diskPoint(p, diskId));
  }

  /** The id the next add() gives (the backend prepares a point's data under it before it is recorded). */
  nextId(): string {
    return `rp-${String(this.data.next).padStart(6, '0')}`;
  }

  /** Records a new point durably and returns it. */
  async add(p: Omit<RecoveryPoint, 'id' | 'n' | 'recordedAt'>): Promise<RecoveryPoint> {
    const n = this.data.next;
    const point: RecoveryPoint = { id: this.nextId(), n, recordedAt: new Date().toISOString(), ...p };
    const next: CatalogFile = { version: 1, next: n + 1, points: [...this.data.points, point] };
    await fsp.mkdir(this.agentDir, { recursive: true, mode: 0o700 });
    await writeFileDurable(this.file, JSON.stringify(next, null, 1) + '\n', 0o600);
    this.data = next;
    return point;
  }

  /** Marks every point holding one of `diskIds` as suspect (durably). Returns how many. */
  async markSuspect(diskIds: string[], reason: string): Promise<number> {
    let n = 0;
    const at = new Date().toISOString();
    const points = this.data.points.map((p) => {
      const disks = diskIds.filter((d) => p.disks[d]);
      if (!disks.length) return p;
      n++;
      return { ...p, suspect: { at, disks: [...new Set([...(p.suspect?.disks ?? []), ...disks])], reason } };
    });
    if (!n) return 0;
    const next: CatalogFile = { ...this.data, points };
    await writeFileDurable(this.file, JSON.stringify(next, null, 1) + '\n', 0o600);
    this.data = next;
    return n;
  }

  /**
   * Removes points recorded before `cutoff` (always keeping the newest point): the catalog first,
   * durably, then `drop` is called for each removed point (the backend deletes its data; a crash
   * in between leaves orphans, which the backend removes when the disk is next opened).
   */
  async prune(cutoff: Date, drop: (p: RecoveryPoint) => Promise<void>): Promise<RecoveryPoint[]> {
    const pts = this.data.points;
    const keepFrom = pts.findIndex((p, i) => i === pts.length - 1 || Date.parse(p.recordedAt) >= cutoff.getTime());
    if (keepFrom <= 0) return [];
    const removed = pts.slice(0, keepFrom);
    const next: CatalogFile = { ...this.data, points: pts.slice(keepFrom) };
    await writeFileDurable(this.file, JSON.stringify(next, null, 1) + '\n', 0o600);
    this.data = next;
    for (const p of removed) await drop(p);
    return removed;
  }
}
