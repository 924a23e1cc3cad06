/**
 * Write-ahead log of block writes for one replica (redo only).
 *
 * Record: 48-byte header | data (length bytes, none for a zero record)
 *   0  u32 magic 'MWAL'     4 u16 flags (1 = zero)   6 u16 reserved
 *   8  u64 seq              16 u64 disk offset       24 u32 length   28 u32 reserved
 *   32 u64 xxh64(data)      40 u64 xxh64(header bytes 0..40)
 * Appends are made durable with one fdatasync per group commit. Replay stops at
 * the first record that does not check out (a torn tail from a crash: it was
 * never acknowledged) and the log is cut there. Re-applying a record is harmless.
 */
import fsp from 'node:fs/promises';
import { xxh64 } from '@node-rs/xxhash';

export const WAL_MAGIC = 0x4d57414c; // 'MWAL'
export const WAL_HEADER_BYTES = 48;
const FLAG_ZERO = 1;

export interface WalRecord { seq: number; offset: number; length: number; data: Buffer | null }

export function encodeRecordHeader(rec: WalRecord): Buffer {
  const h = Buffer.alloc(WAL_HEADER_BYTES);
  h.writeUInt32BE(WAL_MAGIC, 0);
  h.writeUInt16BE(rec.data ? 0 : FLAG_ZERO, 4);
  h.writeBigUInt64LE(BigInt(rec.seq), 8);
  h.writeBigUInt64LE(BigInt(rec.offset), 16);
  h.writeUInt32LE(rec.length, 24);
  h.writeBigUInt64LE(rec.data ? xxh64(rec.data) : 0n, 32);
  h.writeBigUInt64LE(xxh64(h.subarray(0, 40)), 40);
  return h;
}

export class Wal {
  private size: number;
  private constructor(readonly file: string, private readonly fh: fsp.FileHandle, size: number) {
    this.size = size;
  }

  static async open(file: string): Promise<Wal> {
    const fh = await fsp.open(file, 'a+', 0o600);
    const st = await fh.stat();
    return new Wal(file, fh, st.size);
  }

  get bytes(): number {
    return this.size;
  }

  /** Reads every intact record from the start; returns them and the length of the intact prefix. */
  async readAll(): Promise<{ records: WalRecord[]; validBytes: number }> {
    const buf = await fsp.readFile(this.file);
    const records: WalRecord[] = [];
    let o = 0;
    while (o + WAL_HEADER_BYTES <= buf.length) {
      const h = buf.subarray(o, o + WAL_HEADER_BYTES);
      if (h.readUInt32BE(0) !== WAL_MAGIC) break;
      if (xxh64(h.subarray(0, 40)) !== h.readBigUInt64LE(40)) break;
      const zero = (h.readUInt16BE(4) & FLAG_ZERO) !== 0;
      const length = h.readUInt32LE(24);
      const dataLen = zero ? 0 : length;
      if (o + WAL_HEADER_BYTES + dataLen > buf.length) break;
      const data = zero ? null : buf.subarray(o + WAL_HEADER_BYTES, o + WAL_HEADER_BYTES + dataLen);
      if (data && xxh64(data) !== h.readBigUInt64LE(32)) break;
      records.push({ seq: Number(h.readBigUInt64LE(8)), offset: Number(h.readBigUInt64LE(16)), length, data });
      o += WAL_HEADER_BYTES + dataLen;
    }
    return { records, validBytes: o };
  }

  /** Appends records and makes them durable. Not safe to call concurrently. */
  async append(records: WalRecord[]): Promise<void> {
    const parts: Buffer[] = [];
    for (const r of records) {
      parts.push(encodeRecordHeader(r));
      if (r.data) parts.push(r.data);
    }
    // writev is limited to IOV_MAX buffers per call
    for (let i = 0; i < parts.length; i += 1024) {
      const slice = parts.slice(i, i + 1024);
      let len = 0;
      for (const p of slice) len += p.length;
      const { bytesWritten } = await this.fh.writev(slice, this.size);
      if (bytesWritten !== len) throw Object.assign(new Error(`short WAL write (${bytesWritten} of ${len})`), { code: 'EIO' });
      this.size += len;
    }
    await this.fh.datasync();
  }

  /** Cuts the log to `bytes` (0 after a checkpoint) and syncs. */
  async truncate(bytes = 0): Promise<void> {
    await this.fh.truncate(bytes);
    await this.fh.sync();
    this.size = bytes;
  }

  async close(): Promise<void> {
    await this.fh.close();
  }
}
