/**
 * Undo journal of one replica for one epoch: the old bytes of each range the
 * first time it is overwritten after a recovery point. Recovery point P of a
 * disk = the replica with the records of every epoch >= P reverted, newest
 * record first (see local/materialize.ts).
 *
 * One file per epoch: undo/<pointId>.undo, holding records
 *   0  u32 magic 'MUND'   4 u32 flags (1 = the old bytes were all zero: no data)
 *   8  u64 offset         16 u32 length      20 u32 reserved
 *   24 u64 xxh64(data)    32 u64 xxh64(header bytes 0..32)
 *   40 data (length bytes, none when flag 1)
 *
 * Contract: append() makes the records durable (fdatasync) before it resolves,
 * and the replica store calls it before the overwritten ranges' redo records
 * are committed, so a committed write always has its old bytes on disk. A torn
 * tail (a crash mid-append, never followed by a commit) is cut on open; extra
 * records for writes that never happened are harmless (they hold the bytes the
 * replica still has). Not safe for concurrent append().
 */
import fsp from 'node:fs/promises';
import { xxh64 } from '@node-rs/xxhash';
import { isZero } from '../../protocol/digest.js';

export const UNDO_MAGIC = 0x4d554e44; // 'MUND'
export const UNDO_HEADER_BYTES = 40;
const FLAG_ZERO = 1;

export interface UndoRecord { offset: number; length: number; data: Buffer | null }

function header(rec: UndoRecord): Buffer {
  const h = Buffer.alloc(UNDO_HEADER_BYTES);
  h.writeUInt32BE(UNDO_MAGIC, 0);
  h.writeUInt32BE(rec.data ? 0 : FLAG_ZERO, 4);
  h.writeBigUInt64LE(BigInt(rec.offset), 8);
  h.writeUInt32LE(rec.length, 16);
  h.writeBigUInt64LE(rec.data ? xxh64(rec.data) : 0n, 24);
  h.writeBigUInt64LE(xxh64(h.subarray(0, 32)), 32);
  return h;
}

/** Parses the intact prefix of an undo file's bytes. */
export function parseUndo(buf: Buffer): { records: UndoRecord[]; validBytes: number } {
  const records: UndoRecord[] = [];
  let o = 0;
  while (o + UNDO_HEADER_BYTES <= buf.length) {
    const h = buf.subarray(o, o + UNDO_HEADER_BYTES);
    if (h.readUInt32BE(0) !== UNDO_MAGIC || xxh64(h.subarray(0, 32)) !== h.readBigUInt64LE(32)) break;
    const zero = (h.readUInt32BE(4) & FLAG_ZERO) !== 0;
    const length = h.readUInt32LE(16);
    const dataLen = zero ? 0 : length;
    if (o + UNDO_HEADER_BYTES + dataLen > buf.length) break;
    const data = zero ? null : buf.subarray(o + UNDO_HEADER_BYTES, o + UNDO_HEADER_BYTES + dataLen);
    if (data && xxh64(data) !== h.readBigUInt64LE(24)) break;
    records.push({ offset: Number(h.readBigUInt64LE(8)), length, data });
    o += UNDO_HEADER_BYTES + dataLen;
  }
  return { records, validBytes: o };
}

/** Capture granularity (the page size every write is aligned to). */
export const UNDO_UNIT = 4096;

export class UndoJournal {
  /**
   * 4 KiB units (offset / UNDO_UNIT) captured in this epoch: a unit is captured once, the
   * first time it is overwritten. Units, not record offsets, so a later write with another
   * length (a session with another block size) still captures what it adds.
   */
  readonly captured = new Set<number>();

  /** Marks the units a record covers as captured. */
  markCaptured(offset: number, length: number): void {
    for (let u = Math.floor(offset / UNDO_UNIT); u * UNDO_UNIT < offset + length; u++) this.captured.add(u);
  }

  private constructor(readonly file: string, private readonly fh: fsp.FileHandle, private size: number) {}

  /** Opens (creating) the journal, cuts a torn tail and rebuilds the captured set. */
  static async open(file: string): Promise<UndoJournal> {
    const fh = await fsp.open(file, 'a+', 0o600);
    try {
      const buf = await fsp.readFile(file);
      const { records, validBytes } = parseUndo(buf);
      if (validBytes !== buf.length) {
        await fh.truncate(validBytes);
        await fh.sync();
      }
      const j = new UndoJournal(file, fh, validBytes);
      for (const r of records) j.markCaptured(r.offset, r.length);
      return j;
    } catch (err) {
      await fh.close();
      throw err;
    }
  }

  get bytes(): number { return this.size; }

  /** Appends records (old bytes; all-zero data is stored as a flag) and makes them durable. */
  async append(records: UndoRecord[]): Promise<void> {
    if (!records.length) return;
    const parts: Buffer[] = [];
    for (const r of records) {
      const data = r.data && !isZero(r.data) ? r.data : null;
      parts.push(header({ ...r, data }));
      if (data) parts.push(data);
    }
    for (let i = 0; i < parts.length; i += 1024) {
      const slice = parts.slice(i, i + 1024);
      let len = 0;
      for (const p of slice) len += p.length;
      const { bytesWritten } = await this.fh.writev(slice, this.size);
      if (bytesWritten !== len) throw Object.assign(new Error(`short undo write (${bytesWritten} of ${len})`), { code: 'EIO' });
      this.size += len;
    }
    await this.fh.datasync();
    for (const r of records) this.markCaptured(r.offset, r.length);
  }

  async close(): Promise<void> {
    await this.fh.close();
  }
}

/** Reads the intact records of an undo file (for materialising a point). Missing file: no records. */
export async function readUndoFile(file: string): Promise<UndoRecord[]> {
  let buf: Buffer;
  try {
    buf = await fsp.readFile(file);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return [];
    throw err;
  }
  return parseUndo(buf).records;
}
