/**
 * Sparse reads of page blobs, shared by the replica store, the image reader and downloads:
 * ask Get Page Ranges first, fetch only the valid ranges, and treat everything else as zeros
 * that are never transferred.
 *
 *   blobPageDigests   xxh64 per page of a blob (or snapshot); a page with no valid byte gets the
 *                     digest of a zero page computed locally, valid ranges are fetched in windows
 *                     of several MiB (a few in flight), nearby ranges merged into one request
 *   downloadBlobToFile  a blob as a local sparse file: ftruncate to size, then only valid ranges
 *                     written, in chunks, with progress
 *   copyBlobByPages   the fallback copy when the service's own copy cannot be used: the valid
 *                     ranges of the source read and written as Put Page calls
 *   runPool           runs async tasks with a bound on how many are in flight, stopping at the
 *                     first failure (after the ones in flight settle)
 */
import fsp from 'node:fs/promises';
import { xxh64 } from '@node-rs/xxhash';
import { MobilityError } from '../../errors.js';
import { MAX_PUT_PAGE_BYTES, SECTOR, type BlobRef, type PageBlobOps, type PageRange } from './page-client.js';
import type { ProgressFn } from '../replica-store.js';

const MiB = 1024 * 1024;
/** Window of a digest pass, and the largest download request. */
export const DOWNLOAD_CHUNK_BYTES = 8 * MiB;
/** Valid ranges closer than this are fetched as one request (zeros between them included). */
const MERGE_GAP_BYTES = 256 * 1024;
/** Requests in flight for reads. */
const READ_CONCURRENCY = 4;
/** Page ranges are asked for in slices of this size (bounds one answer for a fragmented blob). */
const RANGE_SLICE_BYTES = 256 * 1024 * MiB;

export function roundUpSector(n: number): number {
  return Math.ceil(n / SECTOR) * SECTOR;
}

/** Runs tasks with at most `limit` in flight; resolves when all succeeded, rejects with the first failure once the rest settled. */
export async function runPool(tasks: Iterable<() => Promise<void>>, limit: number): Promise<void> {
  const it = tasks[Symbol.iterator]();
  let failure: { err: unknown } | null = null;
  const worker = async () => {
    for (;;) {
      if (failure) return;
      const n = it.next();
      if (n.done) return;
      try {
        await n.value();
      } catch (err) {
        failure ??= { err };
        return;
      }
    }
  };
  await Promise.all(Array.from({ length: Math.max(1, limit) }, worker));
  if (failure) throw (failure as { err: unknown }).err;
}

/** Valid ranges of [start, end) of a blob, asked for in slices; clipped to [start, end). */
export async function validRanges(ops: PageBlobOps, ref: BlobRef, start: number, end: number): Promise<PageRange[]> {
  const out: PageRange[] = [];
  const a0 = Math.floor(start / SECTOR) * SECTOR;
  const b0 = roundUpSector(end);
  for (let a = a0; a < b0; a += RANGE_SLICE_BYTES) {
    const b = Math.min(b0, a + RANGE_SLICE_BYTES);
    appendClipped(out, await ops.pageRanges(ref, a, b - a), start, end);
  }
  return out;
}

/** Appends sorted `ranges`, clipped to [start, end), to `out`, merging what touches its last range. */
export function appendClipped(out: PageRange[], ranges: PageRange[], start: number, end: number): void {
  for (const r of ranges) {
    const s = Math.max(r.start, start);
    const e = Math.min(r.end, end);
    if (s >= e) continue;
    const last = out[out.length - 1];
    if (last && s <= last.end) last.end = Math.max(last.end, e);
    else out.push({ start: s, end: e });
  }
}

/** Merges ranges closer than `gap` and splits the result into requests of at most `max` bytes. */
export function requestSpans(ranges: PageRange[], gap: number, max: number): PageRange[] {
  const merged: PageRange[] = [];
  for (const r of ranges) {
    const last = merged[merged.length - 1];
    if (last && r.start - last.end <= gap && r.end - last.start <= max) last.end = r.end;
    else merged.push({ ...r });
  }
  const out: PageRange[] = [];
  for (const r of merged) for (let s = r.start; s < r.end; s += max) out.push({ start: s, end: Math.min(r.end, s + max) });
  return out;
}

const zeroDigests = new Map<number, bigint>();
function zeroDigest(len: number): bigint {
  let d = zeroDigests.get(len);
  if (d === undefined) {
    d = xxh64(Buffer.alloc(len));
    if (zeroDigests.size < 64) zeroDigests.set(len, d);
  }
  return d;
}

/**
 * xxh64 of each page in [firstPage, firstPage+count) of a blob whose content is `sizeBytes` long
 * (the last page may be short), 8 bytes LE each. MOB_ERR_OUT_OF_RANGE past the end.
 */
export async function blobPageDigests(
  ops: PageBlobOps, ref: BlobRef, sizeBytes: number, firstPage: number, count: number, pageSize: number,
  /** Where the valid ranges come from (a store's cache); Get Page Ranges of exactly [start, end) by default. */
  ranges: (start: number, end: number) => Promise<PageRange[]> = (a, b) => validRanges(ops, ref, a, b),
): Promise<Buffer> {
  const start = firstPage * pageSize;
  if (!Number.isSafeInteger(start) || firstPage < 0 || count < 0 || pageSize <= 0 || start > sizeBytes || (count > 0 && start >= sizeBytes)) {
    throw new MobilityError('MOB_ERR_OUT_OF_RANGE', `pages ${firstPage}+${count} lie beyond the ${sizeBytes}-byte disk`);
  }
  const end = Math.min(start + count * pageSize, sizeBytes);
  const n = Math.ceil((end - start) / pageSize);
  const out = Buffer.allocUnsafe(n * 8);
  if (n === 0) return out;
  const valid = await ranges(start, end);
  const win = Math.max(pageSize, Math.floor(DOWNLOAD_CHUNK_BYTES / pageSize) * pageSize);
  let ri = 0; // first range that may still intersect the current window
  const windows: (() => Promise<void>)[] = [];
  for (let ws = start; ws < end; ws += win) {
    const we = Math.min(end, ws + win);
    while (ri < valid.length && valid[ri].end <= ws) ri++;
    const inWin: PageRange[] = [];
    for (let j = ri; j < valid.length && valid[j].start < we; j++) {
      inWin.push({ start: Math.max(valid[j].start, ws), end: Math.min(valid[j].end, we) });
    }
    const firstOut = (ws - start) / pageSize;
    windows.push(async () => {
      let buf: Buffer | null = null;
      if (inWin.length) {
        buf = Buffer.alloc(we - ws);
        await runPool(requestSpans(inWin, MERGE_GAP_BYTES, DOWNLOAD_CHUNK_BYTES).map((s) => async () => {
          (await ops.download(ref, s.start, s.end - s.start)).copy(buf!, s.start - ws);
        }), READ_CONCURRENCY);
      }
      let k = 0;
      for (let p = ws; p < we; p += pageSize) {
        const pe = Math.min(p + pageSize, we);
        while (k < inWin.length && inWin[k].end <= p) k++;
        const touched = k < inWin.length && inWin[k].start < pe;
        const d = touched ? xxh64(buf!.subarray(p - ws, pe - ws)) : zeroDigest(pe - p);
        out.writeBigUInt64LE(d, 8 * (firstOut + (p - ws) / pageSize));
      }
    });
  }
  await runPool(windows, READ_CONCURRENCY);
  return out;
}

/**
 * Writes a blob's first `sizeBytes` as a local sparse file (created or truncated, mode 0600):
 * only valid ranges are downloaded and written. Returns the bytes downloaded.
 */
export async function downloadBlobToFile(ops: PageBlobOps, ref: BlobRef, sizeBytes: number, outFile: string, progress?: ProgressFn): Promise<number> {
  const ranges = await validRanges(ops, ref, 0, sizeBytes);
  const spans = requestSpans(ranges, 0, DOWNLOAD_CHUNK_BYTES);
  const total = spans.reduce((a, s) => a + s.end - s.start, 0);
  const fh = await fsp.open(outFile, 'w', 0o600);
  let done = 0;
  try {
    await fh.chmod(0o600); // an existing file keeps its mode otherwise: it holds the disk's data
    await fh.truncate(sizeBytes);
    progress?.(0, total);
    await runPool(spans.map((s) => async () => {
      const data = await ops.download(ref, s.start, s.end - s.start);
      let w = 0;
      while (w < data.length) w += (await fh.write(data, w, data.length - w, s.start + w)).bytesWritten;
      done += data.length;
      progress?.(done, total);
    }), READ_CONCURRENCY);
    await fh.sync();
  } finally {
    await fh.close();
  }
  return done;
}

/** Copies the valid ranges of `source` into a new page blob `dest` of `sizeBytes` (rounded up to 512) with `metadata`. */
export async function copyBlobByPages(ops: PageBlobOps, source: BlobRef, dest: string, sizeBytes: number, metadata: Record<string, string>): Promise<number> {
  const blobSize = roundUpSector(sizeBytes);
  await ops.create(dest, blobSize, metadata);
  const ranges = await validRanges(ops, source, 0, blobSize);
  let bytes = 0;
  await runPool(requestSpans(ranges, 0, MAX_PUT_PAGE_BYTES).map((s) => async () => {
    const data = await ops.download(source, s.start, s.end - s.start);
    await ops.putPages(dest, s.start, data);
    bytes += data.length;
  }), READ_CONCURRENCY);
  return bytes;
}
