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
  close(): Promise<void>;
}

async function blockDeviceSize(rdev: number): Promise<number> {
  const major = Math.floor(rdev / 256) & 0xfff | ((rdev >>> 20) & ~0xfff);
  const minor = (rdev & 0xff) | ((rdev >>> 12) & ~0xff);
  const text = await fsp.readFile(`/sys/dev/block/${major}:${minor}/size`, 'utf8');
  return Number(text.trim()) * 512;
}

export async function openDiskSource(path: string): Promise<DiskSource> {
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
    return new FileDiskSource(path, fh, size);
  } catch (err) {
    await fh.close();
    throw err instanceof MobilityError ? err : new MobilityError('MOB_ERR_SOURCE', `cannot size ${path}: ${(err as Error).message}`, { cause: err });
  }
}

class FileDiskSource implements DiskSource {
  constructor(readonly path: string, private readonly fh: fsp.FileHandle, readonly size: number) {}

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
