/**
 * Write-ahead log of block writes for one replica (redo only).
 *
 * Record: 48-byte header | data (length bytes, none for a zero or commit record)
 *   0  u32 magic 'MWAL'     4 u16 flags (1 = zero, 2 = commit)   6 u16 reserved
 *   8  u64 seq              16 u64 disk offset       24 u32 length   28 u32 reserved
 *   32 u64 xxh64(data)      40 u64 xxh64(header bytes 0..40)
 * Each group commit appends its records and then one commit record (seq = the
 * highest sequence of the batch), and is made durable with one fdatasync.
 * Replay applies only batches whose commit record is intact: a torn tail (a
 * crash mid-append; never acknowledged) is ignored and the log is cut after the
 * last commit, so a half-written frame can never be reported durable.
 * Re-applying a record is harmless.
 */
import fsp from 'node:fs/promises';
import { xxh64 } from '@node-rs/xxhash';

export const WAL_MAGIC = 0x4d57414c; // 'MWAL'
export const WAL_HEADER_BYTES = 48;
const FLAG_ZERO = 1;
const FLAG_COMMIT = 2;

export interface WalRecord { seq: number; offset: number; length: number; data: Buffer | null }

export function encodeRecordHeader(rec: WalRecord, commit = false): Buffer {
  const h = Buffer.alloc(WAL_HEADER_BYTES);
  h.writeUInt32BE(WAL_MAGIC, 0);
  h.writeUInt16BE(commit ? FLAG_COMMIT : rec.data ? 0 : FLAG_ZERO, 4);
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

  /** Reads the records of every committed batch; validBytes is where the last commit record ends. */
  async readAll(): Promise<{ records: WalRecord[]; validBytes: number; lastCommitSeq: number }> {
    const buf = await fsp.readFile(this.file);
    const records: WalRecord[] = [];
    let batch: WalRecord[] = [];
    let validBytes = 0;
    let lastCommitSeq = 0;
    let o = 0;
    while (o + WAL_HEADER_BYTES <= buf.length) {
      const h = buf.subarray(o, o + WAL_HEADER_BYTES);
      if (h.readUInt32BE(0) !== WAL_MAGIC) break;
      if (xxh64(h.subarray(0, 40)) !== h.readBigUInt64LE(40)) break;
      const flags = h.readUInt16BE(4);
      const seq = Number(h.readBigUInt64LE(8));
      if (flags & FLAG_COMMIT) {
        o += WAL_HEADER_BYTES;
        records.push(...batch);
        batch = [];
        validBytes = o;
        lastCommitSeq = seq;
        continue;
      }
      const zero = (flags & FLAG_ZERO) !== 0;
      const length = h.readUInt32LE(24);
      const dataLen = zero ? 0 : length;
      if (o + WAL_HEADER_BYTES + dataLen > buf.length) break;
      const data = zero ? null : buf.subarray(o + WAL_HEADER_BYTES, o + WAL_HEADER_BYTES + dataLen);
      if (data && xxh64(data) !== h.readBigUInt64LE(32)) break;
      batch.push({ seq, offset: Number(h.readBigUInt64LE(16)), length, data });
      o += WAL_HEADER_BYTES + dataLen;
    }
    return { records, validBytes, lastCommitSeq };
  }

  /** Appends one batch of records and its commit record, and makes them durable. Not safe to call concurrently. */
  async append(records: WalRecord[]): Promise<void> {
    const parts: Buffer[] = [];
    let maxSeq = 0;
    for (const r of records) {
      parts.push(encodeRecordHeader(r));
      if (r.data) parts.push(r.data);
      maxSeq = Math.max(maxSeq, r.seq);
    }
    parts.push(encodeRecordHeader({ seq: maxSeq, offset: 0, length: 0, data: null }, true));
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
