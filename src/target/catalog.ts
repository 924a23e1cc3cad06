/**
 * Recovery points of one agent: the catalog (replicas/<agent>/points.json,
 * replaced durably as a whole) and the operations on it.
 *
 * A point exists exactly when it is in the catalog. Recording a cut writes the
 * catalog first and only then switches each disk's undo epoch, so a server
 * killed at any instant leaves every point complete or absent: a point in the
 * catalog whose epoch switch did not happen gets it when the store reopens
 * (the current epoch is always the newest point that includes the disk).
 * Pruning removes points from the catalog first and deletes their undo files
 * after; undo files that no point names are removed on load.
 *
 * Point P of disk D = replica of D, then the undo records of every epoch >= P
 * (newest epoch first, each file's records newest first) written back.
 */
import { spawn } from 'node:child_process';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { MobilityError } from '../errors.js';
import { writeFileDurable } from '../util/durable-file.js';
import { zeroBuffer } from '../protocol/digest.js';
import { readUndoFile } from './local/undo-journal.js';

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
  disks: Record<string, { seq: number; sizeBytes: number }>;
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

  /** Records a new point durably and returns it. */
  async add(p: Omit<RecoveryPoint, 'id' | 'n' | 'recordedAt'>): Promise<RecoveryPoint> {
    const n = this.data.next;
    const point: RecoveryPoint = { id: `rp-${String(n).padStart(6, '0')}`, n, recordedAt: new Date().toISOString(), ...p };
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
   * Removes points recorded before `cutoff` (always keeping the newest point), catalog first,
   * then their undo files. Returns the removed points.
   */
  async prune(cutoff: Date, diskDirs: (diskId: string) => string): Promise<RecoveryPoint[]> {
    const pts = this.data.points;
    const keepFrom = pts.findIndex((p, i) => i === pts.length - 1 || Date.parse(p.recordedAt) >= cutoff.getTime());
    if (keepFrom <= 0) return [];
    const removed = pts.slice(0, keepFrom);
    const next: CatalogFile = { ...this.data, points: pts.slice(keepFrom) };
    await writeFileDurable(this.file, JSON.stringify(next, null, 1) + '\n', 0o600);
    this.data = next;
    for (const p of removed) {
      for (const d of Object.keys(p.disks)) await fsp.rm(path.join(diskDirs(d), 'undo', `${p.id}.undo`), { force: true });
    }
    return removed;
  }

  /** Deletes undo files of a disk that no point in the catalog names (left by a prune cut short). */
  async removeOrphans(diskId: string, diskDir: string): Promise<string[]> {
    const names = new Set(this.data.points.filter((p) => p.disks[diskId]).map((p) => `${p.id}.undo`));
    let files: string[];
    try {
      files = await fsp.readdir(path.join(diskDir, 'undo'));
    } catch {
      return [];
    }
    const orphans = files.filter((f) => f.endsWith('.undo') && !names.has(f));
    for (const f of orphans) await fsp.rm(path.join(diskDir, 'undo', f), { force: true });
    return orphans;
  }
}

function run(cmd: string, args: string[]): Promise<{ code: number | null; stderr: string }> {
  return new Promise((resolve, reject) => {
    const c = spawn(cmd, args, { stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    c.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
    c.once('error', reject);
    c.once('close', (code) => resolve({ code, stderr }));
  });
}

export interface MaterializedDisk { diskId: string; image: string; sizeBytes: number; method: 'reflink' | 'copy'; undoRecords: number; ms: number }

/**
 * Writes a writable image of point `p` of one disk to `out`, while replication goes on:
 * the replica is cloned (reflink where the filesystem can, else a sparse copy), then the
 * undo records of every epoch >= p are written back, newest first. Records are read after
 * the copy: any write the copy may have caught had its old bytes journaled before it was
 * applied, so reverting yields exactly the point. `epochs` must be re-read by the caller
 * after the copy (a cut may have happened meanwhile): pass a function.
 */
export async function materializeDisk(o: {
  diskId: string; replica: string; undoDir: string; out: string; sizeBytes: number; epochs: () => Promise<RecoveryPoint[]>;
}): Promise<MaterializedDisk> {
  const t0 = Date.now();
  await fsp.rm(o.out, { force: true });
  let method: 'reflink' | 'copy' = 'reflink';
  let r = await run('cp', ['--reflink=always', '--sparse=always', o.replica, o.out]);
  if (r.code !== 0) {
    method = 'copy';
    await fsp.rm(o.out, { force: true });
    r = await run('cp', ['--reflink=never', '--sparse=always', o.replica, o.out]);
    if (r.code !== 0) throw new MobilityError('MOB_ERR_STORAGE', `cannot copy ${o.replica} to ${o.out}: ${r.stderr.trim()}`);
  }
  const epochs = await o.epochs();
  const fh = await fsp.open(o.out, 'r+', 0o600);
  let undoRecords = 0;
  try {
    await fh.truncate(o.sizeBytes);
    for (let i = epochs.length - 1; i >= 0; i--) {
      const recs = await readUndoFile(path.join(o.undoDir, `${epochs[i].id}.undo`));
      for (let k = recs.length - 1; k >= 0; k--) {
        const rec = recs[k];
        if (rec.offset >= o.sizeBytes) continue;
        const len = Math.min(rec.length, o.sizeBytes - rec.offset);
        const data = rec.data ? rec.data.subarray(0, len) : zeroBuffer(len);
        await fh.write(data, 0, len, rec.offset);
        undoRecords++;
      }
    }
    await fh.sync();
  } finally {
    await fh.close();
  }
  return { diskId: o.diskId, image: o.out, sizeBytes: o.sizeBytes, method, undoRecords, ms: Date.now() - t0 };
}
