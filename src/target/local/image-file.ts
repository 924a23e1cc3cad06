/**
 * A local image file (a promoted or test-failover disk) opened read-only: what a
 * reprotect session reads to pull the differences back to the original machine.
 */
import fsp from 'node:fs/promises';
import { xxh64 } from '@node-rs/xxhash';
import { READ_CHUNK_BYTES } from '../../constants.js';
import { MobilityError } from '../../errors.js';
import type { ImageReader } from '../replica-store.js';

export class ImageFile implements ImageReader {
  private constructor(readonly file: string, private readonly fh: fsp.FileHandle, readonly sizeBytes: number) {}

  static async open(file: string, sizeBytes: number): Promise<ImageFile> {
    const fh = await fsp.open(file, 'r').catch((err: Error) => { throw new MobilityError('MOB_ERR_STATE_CORRUPT', `promoted image ${file} cannot be opened: ${err.message}`); });
    const st = await fh.stat();
    if (st.size !== sizeBytes) {
      await fh.close();
      throw new MobilityError('MOB_ERR_DISK_SIZE_CHANGED', `promoted image ${file} is ${st.size} bytes, the disk ${sizeBytes}`);
    }
    return new ImageFile(file, fh, sizeBytes);
  }

  private range(firstPage: number, count: number, pageSize: number): [number, number] {
    const start = firstPage * pageSize;
    if (!Number.isSafeInteger(start) || count <= 0 || start >= this.sizeBytes) {
      throw new MobilityError('MOB_ERR_OUT_OF_RANGE', `pages ${firstPage}+${count} lie beyond the ${this.sizeBytes}-byte disk`);
    }
    return [start, Math.min(start + count * pageSize, this.sizeBytes)];
  }

  async read(firstPage: number, count: number, pageSize: number): Promise<Buffer> {
    const [start, end] = this.range(firstPage, count, pageSize);
    const buf = Buffer.alloc(end - start);
    let done = 0;
    while (done < buf.length) {
      const { bytesRead } = await this.fh.read(buf, done, buf.length - done, start + done);
      if (bytesRead === 0) break;
      done += bytesRead;
    }
    return buf;
  }

  async pageDigests(firstPage: number, count: number, pageSize: number): Promise<Buffer> {
    const [start, end] = this.range(firstPage, count, pageSize);
    const out = Buffer.allocUnsafe(Math.ceil((end - start) / pageSize) * 8);
    let page = 0;
    for (let o = start; o < end; o += READ_CHUNK_BYTES) {
      const n = Math.min(READ_CHUNK_BYTES, end - o);
      const chunk = await this.read(o / pageSize, Math.ceil(n / pageSize), pageSize);
      for (let p = 0; p < chunk.length; p += pageSize) out.writeBigUInt64LE(xxh64(chunk.subarray(p, Math.min(p + pageSize, chunk.length))), 8 * page++);
    }
    return out;
  }

  async close(): Promise<void> {
    await this.fh.close().catch(() => undefined);
  }
}
