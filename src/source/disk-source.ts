/**
 * DiskSource: a file or block device read with large positional reads.
 * Callers own the buffers they pass in. Not thread-safe across concurrent
 * resizes of the underlying device: size is read once at open.
 */
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import { MobilityError } from '../errors.js';

export interface DiskSource {
  readonly path: string;
  readonly size: number;
  /** Reads exactly `length` bytes at `offset` into `buf` (zero-filled past the end). */
  read(buf: Buffer, offset: number, length: number): Promise<void>;
  /**
   * Small synchronous read (at most SYNC_READ_BYTES) on the calling thread: for a handful of
   * pages where a thread-pool round trip costs more than the read (a cut's sample, inside the
   * freeze). Same contract as read().
   */
  readSync(buf: Buffer, offset: number, length: number): void;
  close(): Promise<void>;
}

async function blockDeviceSize(rdev: number): Promise<number> {
  const major = Math.floor(rdev / 256) & 0xfff | ((rdev >>> 20) & ~0xfff);
  const minor = (rdev & 0xff) | ((rdev >>> 12) & ~0xff);
  const text = await fsp.readFile(`/sys/dev/block/${major}:${minor}/size`, 'utf8');
  return Number(text.trim()) * 512;
}

export interface OpenSourceOptions {
  /**
   * Read a block device with O_DIRECT. Needed while a mounted filesystem writes the
   * device: file data reaches the disk without passing through the device's own page
   * cache, so a buffered read of the device can return stale blocks.
   */
  direct?: boolean;
  /**
   * Read a regular file with O_DIRECT too. For a file served by FUSE without direct I/O
   * (QEMU's FUSE export of a VM disk): through a descriptor held open, buffered reads return
   * pages the kernel cached before the guest's later writes.
   */
  directFile?: boolean;
}

export async function openDiskSource(path: string, opts: OpenSourceOptions = {}): Promise<DiskSource> {
  let fh: fsp.FileHandle;
  try {
    fh = await fsp.open(path, fs.constants.O_RDONLY);
  } catch (err) {
    throw new MobilityError('MOB_ERR_SOURCE', `cannot open source disk ${path}: ${(err as Error).message}`, { cause: err });
  }
  try {
    const st = await fh.stat();
    let size: number;
    if (st.isBlockDevice()) size = await blockDeviceSize(st.rdev);
    else if (st.isFile()) size = st.size;
    else throw new MobilityError('MOB_ERR_SOURCE', `${path} is neither a regular file nor a block device`);
    if (size % 512 !== 0) throw new MobilityError('MOB_ERR_SOURCE', `${path} is ${size} bytes, not a multiple of 512`);
    if ((opts.direct && st.isBlockDevice()) || (opts.directFile && st.isFile())) {
      await fh.close();
      return DirectDiskSource.open(path, size);
    }
    return new FileDiskSource(path, fh, size);
  } catch (err) {
    await fh.close();
    throw err instanceof MobilityError ? err : new MobilityError('MOB_ERR_SOURCE', `cannot size ${path}: ${(err as Error).message}`, { cause: err });
  }
}

/** The largest readSync(). */
export const SYNC_READ_BYTES = 64 * 1024;

class FileDiskSource implements DiskSource {
  constructor(readonly path: string, private readonly fh: fsp.FileHandle, readonly size: number) {}

  readSync(buf: Buffer, offset: number, length: number): void {
    if (length > SYNC_READ_BYTES) throw new MobilityError('MOB_ERR_SOURCE', `readSync of ${length} bytes (at most ${SYNC_READ_BYTES})`);
    let done = 0;
    while (done < length) {
      let n: number;
      try {
        n = fs.readSync(this.fh.fd, buf, done, length - done, offset + done);
      } catch (err) {
        throw new MobilityError('MOB_ERR_SOURCE', `read of ${this.path} at ${offset + done} failed: ${(err as Error).message}`, { cause: err });
      }
      if (n === 0) { buf.fill(0, done, length); return; }
      done += n;
    }
  }

  async read(buf: Buffer, offset: number, length: number): Promise<void> {
    let done = 0;
    while (done < length) {
      let n: number;
      try {
        ({ bytesRead: n } = await this.fh.read(buf, done, length - done, offset + done));
      } catch (err) {
        throw new MobilityError('MOB_ERR_SOURCE', `read of ${this.path} at ${offset + done} failed: ${(err as Error).message}`, { cause: err });
      }
      if (n === 0) {
        buf.fill(0, done, length); // the file shrank under us: the next pass sees the new size
        return;
      }
      done += n;
    }
  }

  async close(): Promise<void> {
    await this.fh.close();
  }
}

const ALIGN = 4096;
/** Bounce buffers for large reads (a scan's chunks): few, because each is big. */
const DIRECT_SLOTS = 3;
const DIRECT_SLOT_BYTES = 4 * 1024 * 1024;
/**
 * Bounce buffers for small reads (continuous shipping and a cut's remainder read scattered blocks):
 * more of them, so that many reads are in flight. Under churn each read waits its turn behind the
 * disk's other requests (the application's writes and flushes), so the depth, not the size, sets
 * how fast dirty blocks are read.
 */
const SMALL_SLOTS = 8;
const SMALL_SLOT_BYTES = 256 * 1024;

/**
 * A block device read with O_DIRECT through aligned bounce buffers. Node cannot
 * allocate aligned memory, so one large buffer is allocated and the offset inside it
 * where an O_DIRECT read succeeds is found by probing (the kernel answers EINVAL for a
 * misaligned buffer); slots are carved from there.
 */
class DirectDiskSource implements DiskSource {
  private free: Buffer[];
  private freeSmall: Buffer[];
  /** Reads waiting for a slot; `small` ones take either kind, the others a large one. */
  private waiters: { small: boolean; give: (b: Buffer) => void }[] = [];

  private constructor(readonly path: string, private readonly fd: number, readonly size: number, slots: Buffer[], small: Buffer[], private readonly syncBuf: Buffer) {
    this.free = slots;
    this.freeSmall = small;
  }

  readSync(buf: Buffer, offset: number, length: number): void {
    if (length > SYNC_READ_BYTES) throw new MobilityError('MOB_ERR_SOURCE', `readSync of ${length} bytes (at most ${SYNC_READ_BYTES})`);
    const want = Math.min(length, Math.max(0, this.size - offset));
    let n = 0;
    if (want > 0) {
      try {
        n = fs.readSync(this.fd, this.syncBuf, 0, Math.ceil(want / 512) * 512, offset);
      } catch (err) {
        throw new MobilityError('MOB_ERR_SOURCE', `direct read of ${this.path} at ${offset} failed: ${(err as Error).message}`, { cause: err });
      }
    }
    const take = Math.min(n, want);
    this.syncBuf.copy(buf, 0, 0, take);
    if (take < length) buf.fill(0, take, length);
  }

  static open(path: string, size: number): DiskSource {
    let fd: number;
    try {
      fd = fs.openSync(path, fs.constants.O_RDONLY | fs.constants.O_DIRECT);
    } catch (err) {
      throw new MobilityError('MOB_ERR_SOURCE', `cannot open ${path} for direct reads: ${(err as Error).message}`, { cause: err });
    }
    const raw = Buffer.allocUnsafeSlow(DIRECT_SLOTS * DIRECT_SLOT_BYTES + SMALL_SLOTS * SMALL_SLOT_BYTES + SYNC_READ_BYTES + ALIGN);
    let base = -1;
    for (let off = 0; off < ALIGN && base < 0; off += 8) {
      try {
        fs.readSync(fd, raw, off, ALIGN, 0);
        base = off;
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== 'EINVAL') {
          fs.closeSync(fd);
          throw new MobilityError('MOB_ERR_SOURCE', `direct read of ${path} failed: ${(err as Error).message}`, { cause: err });
        }
      }
    }
    if (base < 0) {
      fs.closeSync(fd);
      throw new MobilityError('MOB_ERR_SOURCE', `no aligned buffer accepted for direct reads of ${path}`);
    }
    const slots = Array.from({ length: DIRECT_SLOTS }, (_, i) => raw.subarray(base + i * DIRECT_SLOT_BYTES, base + (i + 1) * DIRECT_SLOT_BYTES));
    const smallStart = base + DIRECT_SLOTS * DIRECT_SLOT_BYTES;
    const small = Array.from({ length: SMALL_SLOTS }, (_, i) => raw.subarray(smallStart + i * SMALL_SLOT_BYTES, smallStart + (i + 1) * SMALL_SLOT_BYTES));
    const syncStart = smallStart + SMALL_SLOTS * SMALL_SLOT_BYTES;
    return new DirectDiskSource(path, fd, size, slots, small, raw.subarray(syncStart, syncStart + SYNC_READ_BYTES));
  }

  /** A small read takes a small slot first (a large one when none is free); a large read a large one. */
  private acquire(length: number): Promise<Buffer> {
    const small = length <= SMALL_SLOT_BYTES;
    const b = (small ? this.freeSmall.pop() : undefined) ?? this.free.pop();
    if (b) return Promise.resolve(b);
    return new Promise((give) => this.waiters.push({ small, give }));
  }

  private release(b: Buffer): void {
    const isSmall = b.length === SMALL_SLOT_BYTES && SMALL_SLOT_BYTES !== DIRECT_SLOT_BYTES;
    const i = this.waiters.findIndex((w) => w.small || !isSmall);
    if (i >= 0) {
      const [w] = this.waiters.splice(i, 1);
      w!.give(b);
    } else if (isSmall) this.freeSmall.push(b);
    else this.free.push(b);
  }

  async read(buf: Buffer, offset: number, length: number): Promise<void> {
    const slot = await this.acquire(length);
    try {
      let done = 0;
      while (done < length) {
        const pos = offset + done;
        const want = Math.min(slot.length, length - done, Math.max(0, this.size - pos));
        if (want === 0) {
          buf.fill(0, done, length);
          return;
        }
        // direct I/O wants sector multiples; the device size is one, so only the tail rounds up
        const aligned = Math.ceil(want / 512) * 512;
        const n = await new Promise<number>((resolve, reject) => {
          fs.read(this.fd, slot, 0, Math.min(aligned, slot.length), pos, (err, bytes) => (err ? reject(err) : resolve(bytes)));
        }).catch((err: Error) => {
          throw new MobilityError('MOB_ERR_SOURCE', `direct read of ${this.path} at ${pos} failed: ${err.message}`, { cause: err });
        });
        if (n === 0) {
          buf.fill(0, done, length);
          return;
        }
        const take = Math.min(n, want);
        slot.copy(buf, done, 0, take);
        done += take;
      }
    } finally {
      this.release(slot);
    }
  }

  async close(): Promise<void> {
    fs.closeSync(this.fd);
  }
}

/**
 * Sequential reader over [startOffset, end) that keeps `depth` reads in flight
 * (libuv runs them on its thread pool), so copying the next chunks out of the
 * page cache overlaps the digest/compress work on the current one.
 */
export class ChunkReader {
  private readonly bufs: Buffer[];
  private next = 0;
  private readonly pending: Promise<{ offset: number; data: Buffer }>[] = [];
  private offset: number;

  constructor(private readonly src: DiskSource, startOffset: number, private readonly end: number, chunkBytes: number, private readonly depth = 2) {
    this.bufs = Array.from({ length: depth + 1 }, () => Buffer.allocUnsafe(chunkBytes));
    this.offset = startOffset;
  }

  private fill(): void {
    while (this.pending.length < this.depth && this.offset < this.end) {
      const buf = this.bufs[this.next];
      this.next = (this.next + 1) % this.bufs.length;
      const off = this.offset;
      const len = Math.min(buf.length, this.end - off);
      this.offset += len;
      const p = this.src.read(buf, off, len).then(() => ({ offset: off, data: buf.subarray(0, len) }));
      p.catch(() => undefined); // observed when awaited; never an unhandled rejection meanwhile
      this.pending.push(p);
    }
  }

  /** The next chunk, or null at the end. The returned buffer stays valid until the next call. */
  async read(): Promise<{ offset: number; data: Buffer } | null> {
    this.fill();
    const cur = this.pending.shift();
    if (!cur) return null;
    const got = await cur;
    this.fill();
    return got;
  }
}
