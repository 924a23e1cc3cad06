/**
 * The largest file the replica store's filesystem can hold (ext4 with 4 KiB blocks:
 * 16 TiB - 4 KiB; with 1 KiB blocks much less). A replica is one sparse file of the
 * disk's size, so a disk above that limit must be refused before anything is created.
 *
 * The limit is found by asking the filesystem itself: a temporary sparse file next to
 * the replicas is ftruncated to the announced size (no data is allocated). Only when
 * that fails is the exact maximum binary-searched (about 40 ftruncates). Results are
 * cached per owner (one process server) and filesystem, so a Hello normally costs no
 * probe at all. The probe file never outlives the check.
 */
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { randomBytes } from 'node:crypto';
import { MobilityError, toMobilityError } from '../../errors.js';

/** Sizes are probed in 512-byte steps (disk sizes are multiples of 512). */
const STEP = 512;

/** statfs f_type magic numbers (linux/magic.h) for the filesystems a data directory may live on. */
const FS_MAGIC: Record<number, string> = {
  0xef53: 'ext2/ext3/ext4', 0x58465342: 'xfs', 0x9123683e: 'btrfs', 0x01021994: 'tmpfs', 0x6969: 'nfs',
  0x4d44: 'vfat', 0x2011bab0: 'exfat', 0x5346544e: 'ntfs', 0x65735546: 'fuse', 0x2fc12fc1: 'zfs',
  0xf2f52010: 'f2fs', 0x794c7630: 'overlayfs', 0x3153464a: 'jfs', 0x52654973: 'reiserfs', 0xff534d42: 'cifs',
};

function isTooLarge(err: unknown): boolean {
  const code = (err as NodeJS.ErrnoException | undefined)?.code;
  return code === 'EFBIG' || code === 'EINVAL';
}

/** Human size, e.g. "20 TiB", "16 TiB - 4 KiB" or "1.5 GiB" (the exact byte count is always given too). */
export function fmtSize(bytes: number): string {
  const units = ['bytes', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB', 'EiB'];
  for (let u = units.length - 1; u >= 1; u--) {
    const unit = 1024 ** u;
    // limits are often a power of two minus one block: say so rather than round
    const up = Math.ceil(bytes / unit) * unit;
    if (up !== bytes && up - bytes <= unit / 1024) return `${up / unit} ${units[u]} - ${fmtSize(up - bytes)}`;
    if (bytes >= unit) return `${Number((bytes / unit).toFixed(2))} ${units[u]}`;
  }
  return `${bytes} bytes`;
}

/** Name of the filesystem holding `dir`: from /proc/self/mountinfo (exact, e.g. "ext4"), else from statfs. */
export async function filesystemName(dir: string): Promise<string> {
  let magicName = 'unknown filesystem';
  let bsize = 0;
  try {
    const sf = await fsp.statfs(dir);
    magicName = FS_MAGIC[sf.type] ?? `filesystem type 0x${sf.type.toString(16)}`;
    bsize = sf.bsize;
  } catch { /* keep the fallback */ }
  let name = magicName;
  try {
    const st = await fsp.stat(dir);
    const dev = st.dev;
    const major = Number((BigInt(dev) >> 8n) & 0xfffn) | Number((BigInt(dev) >> 32n) & ~0xfffn);
    const minor = Number(BigInt(dev) & 0xffn) | Number((BigInt(dev) >> 12n) & ~0xffn);
    const real = await fsp.realpath(dir);
    let best = '';
    for (const line of (await fsp.readFile('/proc/self/mountinfo', 'utf8')).split('\n')) {
      const f = line.split(' ');
      const sep = f.indexOf('-');
      if (sep < 0 || f[2] !== `${major}:${minor}`) continue;
      const mnt = f[4].replace(/\\(\d{3})/g, (_m, o: string) => String.fromCharCode(parseInt(o, 8)));
      const within = real === mnt || real.startsWith(mnt.endsWith('/') ? mnt : mnt + '/');
      if (within && mnt.length >= best.length) {
        best = mnt;
        name = f[sep + 1];
      } else if (!best && name === magicName) {
        name = f[sep + 1];
      }
    }
  } catch { /* not Linux, or no /proc: keep the statfs name */ }
  return bsize ? `${name}, ${bsize}-byte blocks` : name;
}

export class FileSizeLimit {
  /** Largest size known to be accepted. */
  private okUpTo = 0;
  /** Largest size accepted, once a probe was refused (then exact). */
  private max: number | null = null;
  private fsName: string | null = null;
  private queue: Promise<unknown> = Promise.resolve();

  constructor(readonly dir: string) {}

  /** The exact limit, if a probe has been refused so far (for tests and logs). */
  get knownLimit(): number | null { return this.max; }
  /** Every size up to this is known to fit. */
  get fitsUpTo(): number { return this.max ?? this.okUpTo; }

  /**
   * Resolves when a file of `sizeBytes` fits; otherwise throws MOB_ERR_DISK_TOO_LARGE naming the
   * limit and the filesystem. `what` names the disk in the message.
   */
  async check(sizeBytes: number, what: string, probeDir = this.dir): Promise<void> {
    if (sizeBytes <= this.okUpTo || (this.max !== null && sizeBytes <= this.max)) return;
    if (this.max === null) {
      // one probe at a time: a burst of Hellos costs one probe, not one each
      const run = this.queue.then(() => this.probe(sizeBytes, probeDir));
      this.queue = run.catch(() => undefined);
      await run;
      if (sizeBytes <= this.okUpTo || (this.max !== null && sizeBytes <= this.max)) return;
    }
    const limit = this.max!;
    this.fsName ??= await filesystemName(probeDir);
    throw new MobilityError('MOB_ERR_DISK_TOO_LARGE',
      `${what} is ${sizeBytes} bytes (${fmtSize(sizeBytes)}), but the replica store's filesystem (${this.fsName}) holds files of at most ` +
      `${limit} bytes (${fmtSize(limit)}); keep the replicas on a filesystem with a larger file size limit (e.g. xfs) or protect a smaller disk`);
  }

  /** ftruncates a temporary sparse file to `size`; on refusal, binary-searches the maximum. */
  private async probe(size: number, dir: string): Promise<void> {
    if (size <= this.okUpTo || this.max !== null) return;
    const file = path.join(dir, `.mobility-size-probe-${process.pid}-${randomBytes(4).toString('hex')}~`);
    let fh: fsp.FileHandle;
    try {
      fh = await fsp.open(file, fs.constants.O_RDWR | fs.constants.O_CREAT | fs.constants.O_EXCL, 0o600);
    } catch (err) {
      throw toMobilityError(err, 'MOB_ERR_STORAGE');
    }
    const fits = async (n: number): Promise<boolean> => {
      try {
        await fh.truncate(n);
        return true;
      } catch (err) {
        if (isTooLarge(err)) return false;
        throw toMobilityError(err, 'MOB_ERR_STORAGE');
      }
    };
    try {
      if (await fits(size)) {
        this.okUpTo = size;
        return;
      }
      let lo = Math.floor(this.okUpTo / STEP) * STEP;
      let hi = size;
      while (hi - lo > STEP) {
        const mid = lo + Math.floor((hi - lo) / 2 / STEP) * STEP;
        if (await fits(mid)) lo = mid;
        else hi = mid;
      }
      this.max = lo;
      this.okUpTo = lo;
    } finally {
      await fh.close().catch(() => undefined);
      await fsp.rm(file, { force: true }).catch(() => undefined);
    }
  }
}

const limits = new WeakMap<object, Map<string, FileSizeLimit>>();
/** Per owner: a size every filesystem it has probed so far accepts (no stat needed below it). */
const fitsEverywhere = new WeakMap<object, number>();

/**
 * Throws MOB_ERR_DISK_TOO_LARGE when a replica of `sizeBytes` cannot be a file below `dataDir`
 * (for `targetDir`, the disk's replica directory, which need not exist yet). The probe runs in
 * the deepest existing directory on the way to it; results are cached per owner and device.
 */
export async function checkReplicaFits(owner: object, dataDir: string, targetDir: string, sizeBytes: number, what: string): Promise<void> {
  if (sizeBytes <= (fitsEverywhere.get(owner) ?? 0)) return;
  let dir = path.resolve(targetDir);
  const root = path.resolve(dataDir);
  let st: fs.Stats | null = null;
  for (;;) {
    st = await fsp.stat(dir).catch(() => null);
    if ((st && st.isDirectory()) || dir === root || path.dirname(dir) === dir) break;
    dir = path.dirname(dir);
  }
  if (!st || !st.isDirectory()) throw new MobilityError('MOB_ERR_STORAGE', `data directory ${root} is missing`);
  let byDev = limits.get(owner);
  if (!byDev) limits.set(owner, (byDev = new Map()));
  const key = String(st.dev);
  let lim = byDev.get(key);
  if (!lim) byDev.set(key, (lim = new FileSizeLimit(dir)));
  try {
    await lim.check(sizeBytes, what, dir);
  } finally {
    let min = Infinity;
    for (const l of byDev.values()) min = Math.min(min, l.fitsUpTo);
    fitsEverywhere.set(owner, min);
  }
}
