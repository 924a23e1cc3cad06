/**
 * The local file backend (`--store file:DIR`, the default): replicas live as files
 * on the process server's own disks.
 *
 *   DIR/<agent>/<disk>/                replica.img, state.json, wal.log, undo/<point>.undo
 *                                      (see local-store.ts; nobody else reads them)
 *   IMAGES/test-failover/<agent>/<point>/<disk>.img   test-failover images
 *   IMAGES/failover/<agent>/<disk>.img                promoted images (failover)
 *
 * A point of a disk is the replica plus the undo journals of every epoch from the
 * point on (materialize.ts); the catalog's reference for a local point is empty.
 */
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { randomUUID } from 'node:crypto';
import { ID_PATTERN } from '../../constants.js';
import { MobilityError, toMobilityError } from '../../errors.js';
import { writeFileDurable } from '../../util/durable-file.js';
import type {
  DiskPoint, ImagePurpose, ImageReader, OpenOptions, PointImage, ProgressFn, ReplicaBackend, ReplicaStat,
} from '../replica-store.js';
import { checkReplicaFits } from './file-size-limit.js';
import { ImageFile } from './image-file.js';
import { LocalReplicaStore, type ReplicaState } from './local-store.js';
import { materializeDisk, run } from './materialize.js';

export interface LocalBackendOptions {
  /** Root of the replicas: DIR/<agent>/<disk>/. */
  dir: string;
  /** Root under which test-failover/ and failover/ images are written (the server's data directory). */
  imagesDir: string;
}

/** Bytes a file or directory tree occupies on disk (allocated blocks). */
export async function allocatedBytes(p: string): Promise<number> {
  let st: fs.Stats;
  try { st = await fsp.lstat(p); } catch { return 0; }
  if (!st.isDirectory()) return st.blocks * 512;
  let n = st.blocks * 512;
  for (const e of await fsp.readdir(p).catch(() => [] as string[])) n += await allocatedBytes(path.join(p, e));
  return n;
}

export class LocalBackend implements ReplicaBackend {
  readonly kind = 'file';
  readonly dir: string;
  readonly imagesDir: string;

  constructor(o: LocalBackendOptions) {
    this.dir = path.resolve(o.dir);
    this.imagesDir = path.resolve(o.imagesDir);
  }

  get location(): string { return this.dir; }

  diskDir(agentId: string, diskId: string): string { return path.join(this.dir, agentId, diskId); }

  async init(): Promise<void> {
    await fsp.mkdir(this.dir, { recursive: true, mode: 0o700 });
  }

  async checkFits(agentId: string, diskId: string, sizeBytes: number): Promise<void> {
    await checkReplicaFits(this, this.dir, this.diskDir(agentId, diskId), sizeBytes, `disk ${diskId}`);
  }

  open(agentId: string, diskId: string, sizeBytes: number, opts: OpenOptions = {}): Promise<{ store: LocalReplicaStore; created: boolean }> {
    return LocalReplicaStore.open(this.diskDir(agentId, diskId), agentId, diskId, sizeBytes, opts);
  }

  async agents(): Promise<string[]> {
    const out: string[] = [];
    for (const a of await listIds(this.dir)) if ((await this.disks(a)).length) out.push(a);
    return out;
  }

  async disks(agentId: string): Promise<string[]> {
    const out: string[] = [];
    for (const d of await listIds(path.join(this.dir, agentId))) {
      if (fs.existsSync(path.join(this.diskDir(agentId, d), 'state.json'))) out.push(d);
    }
    return out;
  }

  private async readState(agentId: string, diskId: string): Promise<ReplicaState | null> {
    const file = path.join(this.diskDir(agentId, diskId), 'state.json');
    try {
      return JSON.parse(await fsp.readFile(file, 'utf8')) as ReplicaState;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT' || (err as NodeJS.ErrnoException).code === 'ENOTDIR') return null;
      throw new MobilityError('MOB_ERR_STATE_CORRUPT', `replica state ${file} is unreadable: ${(err as Error).message}`);
    }
  }

  async stat(agentId: string, diskId: string): Promise<ReplicaStat | null> {
    const st = await this.readState(agentId, diskId);
    if (!st) return null;
    return {
      agentId, diskId, sizeBytes: st.sizeBytes, generation: st.generation, initialComplete: st.initialComplete,
      lastDurableSeq: st.lastDurableSeq, storedBytes: await allocatedBytes(this.diskDir(agentId, diskId)), updatedAt: st.updatedAt,
    };
  }

  async remove(agentId: string, diskId: string): Promise<void> {
    await fsp.rm(this.diskDir(agentId, diskId), { recursive: true, force: true });
    await fsp.rmdir(path.join(this.dir, agentId)).catch(() => undefined); // only when nothing else is left
  }

  async prunePoint(agentId: string, diskId: string, point: DiskPoint): Promise<void> {
    await fsp.rm(path.join(this.diskDir(agentId, diskId), 'undo', `${point.pointId}.undo`), { force: true });
  }

  async removeOrphans(agentId: string, diskId: string, keep: DiskPoint[]): Promise<string[]> {
    const undoDir = path.join(this.diskDir(agentId, diskId), 'undo');
    const names = new Set(keep.map((p) => `${p.pointId}.undo`));
    let files: string[];
    try {
      files = await fsp.readdir(undoDir);
    } catch {
      return [];
    }
    const orphans = files.filter((f) => f.endsWith('.undo') && !names.has(f));
    for (const f of orphans) await fsp.rm(path.join(undoDir, f), { force: true });
    return orphans;
  }

  private imagePath(agentId: string, diskId: string, pointId: string, purpose: ImagePurpose): string {
    return purpose === 'failover'
      ? path.join(this.imagesDir, 'failover', agentId, `${diskId}.img`)
      : path.join(this.imagesDir, 'test-failover', agentId, pointId, `${diskId}.img`);
  }

  async materialize(agentId: string, diskId: string, point: DiskPoint, epochs: () => Promise<DiskPoint[]>, purpose: ImagePurpose): Promise<PointImage> {
    const out = this.imagePath(agentId, diskId, point.pointId, purpose);
    await fsp.mkdir(path.dirname(out), { recursive: true, mode: 0o700 });
    const ddir = this.diskDir(agentId, diskId);
    if (!(await this.readState(agentId, diskId))) throw new MobilityError('MOB_ERR_UNKNOWN_DISK', `disk ${diskId} of agent ${agentId} has no replica on this server`);
    const m = await materializeDisk({
      diskId, replica: path.join(ddir, 'replica.img'), undoDir: path.join(ddir, 'undo'), out, sizeBytes: point.sizeBytes, epochs,
    });
    return {
      agentId, diskId, pointId: point.pointId, purpose, sizeBytes: point.sizeBytes, location: out, localPath: out,
      method: m.method, ms: m.ms, undoRecords: m.undoRecords,
    };
  }

  async download(image: PointImage, outFile: string, progress?: ProgressFn): Promise<{ bytes: number; ms: number }> {
    const t0 = Date.now();
    const src = image.localPath ?? image.location;
    if (path.resolve(outFile) === path.resolve(src)) return { bytes: 0, ms: 0 };
    await fsp.mkdir(path.dirname(outFile), { recursive: true, mode: 0o700 });
    progress?.(0, image.sizeBytes);
    const r = await run('cp', ['--reflink=auto', '--sparse=always', src, outFile]);
    if (r.code !== 0) throw new MobilityError('MOB_ERR_STORAGE', `cannot copy ${src} to ${outFile}: ${r.stderr.trim()}`);
    await fsp.chmod(outFile, 0o600); // it holds the disk's data, whatever mode an earlier file had
    progress?.(image.sizeBytes, image.sizeBytes);
    return { bytes: image.sizeBytes, ms: Date.now() - t0 };
  }

  async images(agentId: string, purpose?: ImagePurpose): Promise<PointImage[]> {
    const out: PointImage[] = [];
    const add = async (file: string, diskId: string, pointId: string, p: ImagePurpose) => {
      const st = await fsp.stat(file).catch(() => null);
      if (!st?.isFile()) return;
      out.push({ agentId, diskId, pointId, purpose: p, sizeBytes: st.size, location: file, localPath: file, method: 'file', ms: 0, undoRecords: 0 });
    };
    if (!purpose || purpose === 'test-failover') {
      const tf = path.join(this.imagesDir, 'test-failover', agentId);
      for (const point of (await fsp.readdir(tf).catch(() => [] as string[])).sort()) {
        for (const f of (await fsp.readdir(path.join(tf, point)).catch(() => [] as string[])).sort()) {
          if (f.endsWith('.img')) await add(path.join(tf, point, f), f.slice(0, -4), point, 'test-failover');
        }
      }
    }
    if (!purpose || purpose === 'failover') {
      const fo = path.join(this.imagesDir, 'failover', agentId);
      for (const f of (await fsp.readdir(fo).catch(() => [] as string[])).sort()) {
        if (f.endsWith('.img')) await add(path.join(fo, f), f.slice(0, -4), '', 'failover');
      }
    }
    return out;
  }

  async removeImage(image: PointImage): Promise<void> {
    const file = image.localPath ?? image.location;
    await fsp.rm(file, { force: true });
    // the image's directories go when nothing else is left in them
    let d = path.dirname(file);
    const stop = path.join(this.imagesDir, image.purpose);
    while (d.startsWith(stop + path.sep)) {
      try { await fsp.rmdir(d); } catch { break; }
      d = path.dirname(d);
    }
    await fsp.rmdir(stop).catch(() => undefined);
  }

  openImage(image: PointImage): Promise<ImageReader> {
    return ImageFile.open(image.localPath ?? image.location, image.sizeBytes);
  }

  /** The promoted image becomes the replica file; the state moves to a new generation; WAL and undo go. */
  async adopt(image: PointImage): Promise<void> {
    const { agentId, diskId } = image;
    const ddir = this.diskDir(agentId, diskId);
    const prev = await this.readState(agentId, diskId);
    const now = new Date().toISOString();
    const src = image.localPath ?? image.location;
    // order: the new replica file first, then its state (a crash in between leaves the failover
    // state in place, and adopt can run again: the image is then already moved)
    await fsp.mkdir(ddir, { recursive: true, mode: 0o700 });
    if (fs.existsSync(src)) await fsp.rename(src, path.join(ddir, 'replica.img'));
    else if (!fs.existsSync(path.join(ddir, 'replica.img'))) throw new MobilityError('MOB_ERR_STATE_CORRUPT', `promoted image ${src} is missing`);
    await fsp.rm(path.join(ddir, 'wal.log'), { force: true });
    await fsp.rm(path.join(ddir, 'undo'), { recursive: true, force: true });
    const next: ReplicaState = {
      version: 1, agentId, diskId, passes: 0, createdAt: now, ...(prev ?? {}),
      sizeBytes: image.sizeBytes, generation: randomUUID(), initialComplete: true, lastDurableSeq: 0, updatedAt: now,
      lastPass: { kind: 'failback', seq: 0, at: now },
    };
    await writeFileDurable(path.join(ddir, 'state.json'), JSON.stringify(next, null, 2) + '\n', 0o600);
    await fsp.rmdir(path.dirname(src)).catch(() => undefined);
  }

  async close(): Promise<void> {
    // nothing held: stores close themselves
  }
}

/** Directory entries that are ids (not temporary siblings, not files). */
async function listIds(dir: string): Promise<string[]> {
  try {
    return (await fsp.readdir(dir, { withFileTypes: true }))
      .filter((d) => d.isDirectory() && ID_PATTERN.test(d.name) && !d.name.startsWith('.'))
      .map((d) => d.name).sort();
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return [];
    throw toMobilityError(err, 'MOB_ERR_STORAGE');
  }
}
