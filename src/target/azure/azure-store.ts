/**
 * ReplicaStore (Azure page blobs): one page blob per disk, `replicas/<agent>/<disk>`, in the
 * backend's container; its state in the blob's metadata; recovery points as blob snapshots.
 *
 *   blob          page blob of the disk's size rounded up to 512 B; sparse (never-written and
 *                 cleared ranges are not stored and read as zeros)
 *   metadata      mobversion, agent, disk, sizebytes, generation, initialcomplete, lastdurableseq,
 *                 passes, lastpass, createdat, updatedat, and pending=1 while a new replica is
 *                 unpublished (such a blob is invisible to listings and stat, and is overwritten
 *                 as new by the next open)
 *   snapshots     one per recovery point (preparePoint), carrying mobilitypoint=<point id>
 *
 * Contract: submit() resolves only once the service confirmed every Put Page / Clear Pages call
 * of its batch and of every earlier batch: an acknowledged write is durable in Azure, so an ack
 * may follow. Writes are group-committed (../group-commit.ts): what is submitted while batches are
 * in flight goes out as the next batch, which may start before the previous ones are confirmed
 * (up to BATCHES_IN_FLIGHT) when it touches none of their sectors; acknowledgements still follow
 * submission order. A batch is planned before it is sent: ops sorted by offset, a later op to the
 * same bytes wins, ranges not aligned to 512 B completed by reading their edge sectors (the blob
 * as the previous batches left it: no batch in flight touches them), adjacent non-zero ranges
 * coalesced into Put Page calls of at most 4 MiB (short zero gaps between them included as zeros,
 * ZERO_GAP_MERGE_BYTES), longer zero ranges sent as Clear Pages (the blob stays sparse), up to 8
 * calls in flight over all batches. Calls in flight never touch the same sector, so their order
 * does not matter. A put's body is assembled when it is sent, in a pooled buffer.
 *
 * lastDurableSeq in memory follows the confirmed batches; in the metadata it is written at
 * endPass, preparePoint and close, so it may lag but is never ahead of what was confirmed.
 *
 * Failure: a call the retry layer gave up on (see page-client.ts, ../retry.ts) sets `failure` to
 * its coded error (MOB_ERR_TARGET_UNAVAILABLE / _AUTH / _QUOTA, else MOB_ERR_STORAGE); no further
 * call starts; that batch, every batch after it (in flight ones once they settled), every queued
 * one and every later submit reject with it, and so do reads. Batches before it that complete
 * are still acknowledged. Nothing of an unconfirmed batch is acknowledged; some of its calls may
 * have landed, which is harmless: the agent resends them. close() returns only once every call
 * has settled, so nothing of this store lands after the next session opened the replica.
 *
 * read() returns the newest content: accepted writes not yet confirmed (the overlay, in
 * submission order) over what the blob holds. pageDigests() waits for the queue, then hashes
 * the blob from Get Page Ranges (cached per 64 MiB slice, RANGE_CACHE_SLICE) and downloads of
 * the valid ranges only (see blob-io.ts).
 *
 * One AzureReplicaStore per disk at a time (the server holds a lock per disk). Created by
 * AzureBackend.open() (azure-backend.ts).
 */
import { randomUUID } from 'node:crypto';
import { MobilityError } from '../../errors.js';
import type { Logger } from '../../log.js';
import type { PointRef, ReplicaStore, WriteOp } from '../replica-store.js';
import { zeroBuffer } from '../../protocol/digest.js';
import { GroupCommit, footprintOf, type Batch } from '../group-commit.js';
import { StagingArena, type StagingChunk } from '../staging.js';
import { WriteOverlay, overlayInto, resolveOverlaps, type Seg } from '../overlay.js';
import { appendClipped, blobPageDigests, roundUpSector, runPool, validRanges } from './blob-io.js';
import { MAX_PUT_PAGE_BYTES, SECTOR, type PageBlobOps, type PageRange } from './page-client.js';

/** Put Page / Clear Pages calls in flight at once (over every batch in flight). */
export const PUT_CONCURRENCY = 8;
/**
 * Batches in flight at once: the next batch starts while the last calls of the previous one are
 * still out, when the two touch different sectors and the next one holds at least two full Put
 * Page calls' worth of writes, zeros included (smaller batches would split writes that coalesce;
 * see ../group-commit.ts).
 */
export const BATCHES_IN_FLIGHT = 4;
/**
 * A pass streams its writes in frame by frame: a queue of 1 MiB to 8 MiB waits this long for more
 * before it goes out, so puts are larger and fewer. Continuous protection's small batches go at once.
 */
const LINGER_MS = 20;
/** A single Clear Pages call covers at most this much (bounds one request's work on the service). */
const MAX_CLEAR_BYTES = 1024 * 1024 * 1024;
export const METADATA_VERSION = '1';
/**
 * Digests (verify, checksum resync) are asked for 4 MiB at a time: the blob's valid ranges are
 * fetched per slice of this size and kept until a write to the slice is submitted (a slice fetched
 * while any write was queued or in flight is not kept), so one Get Page Ranges serves many digest
 * requests.
 */
const RANGE_CACHE_SLICE = 64 * 1024 * 1024;
const RANGE_CACHE_SLICES = 8;
/** Past this many separate written ranges, a fresh blob's zero ranges are cleared like any other. */
const MAX_FRESH_INTERVALS = 100_000;

export interface AzureReplicaState {
  agentId: string;
  diskId: string;
  /** The source disk's size (the blob is this rounded up to 512). */
  sizeBytes: number;
  generation: string;
  initialComplete: boolean;
  lastDurableSeq: number;
  passes: number;
  lastPass: { kind: string; seq: number } | null;
  createdAt: string;
  updatedAt: string;
  /** A new replica opened with publish: false, not yet published. */
  pending: boolean;
}

export function newReplicaState(agentId: string, diskId: string, sizeBytes: number, pending: boolean): AzureReplicaState {
  const now = new Date().toISOString();
  return {
    agentId, diskId, sizeBytes, generation: randomUUID(), initialComplete: false, lastDurableSeq: 0,
    passes: 0, lastPass: null, createdAt: now, updatedAt: now, pending,
  };
}

export function encodeState(s: AzureReplicaState): Record<string, string> {
  const md: Record<string, string> = {
    mobversion: METADATA_VERSION,
    agent: s.agentId,
    disk: s.diskId,
    sizebytes: String(s.sizeBytes),
    generation: s.generation,
    initialcomplete: s.initialComplete ? '1' : '0',
    lastdurableseq: String(s.lastDurableSeq),
    passes: String(s.passes),
    createdat: s.createdAt,
    updatedat: s.updatedAt,
  };
  if (s.lastPass) md.lastpass = `${s.lastPass.kind}:${s.lastPass.seq}`;
  if (s.pending) md.pending = '1';
  return md;
}

/** The state a blob's metadata records; null when the blob carries no Mobility state; MOB_ERR_STATE_CORRUPT when it is damaged. */
export function decodeState(md: Record<string, string>, where: string): AzureReplicaState | null {
  if (md.mobversion === undefined) return null;
  const bad = (why: string) => new MobilityError('MOB_ERR_STATE_CORRUPT', `replica blob ${where}: its metadata ${why}; refusing to use it (remove the blob to start over)`);
  if (md.mobversion !== METADATA_VERSION) throw bad(`has version ${md.mobversion}, this server knows ${METADATA_VERSION}`);
  const int = (k: string): number => {
    const v = md[k];
    if (v === undefined || !/^\d+$/.test(v) || !Number.isSafeInteger(Number(v))) throw bad(`field ${k} is missing or not a number`);
    return Number(v);
  };
  const str = (k: string): string => {
    const v = md[k];
    if (!v) throw bad(`field ${k} is missing`);
    return v;
  };
  let lastPass: AzureReplicaState['lastPass'] = null;
  if (md.lastpass) {
    const m = /^(.+):(\d+)$/.exec(md.lastpass);
    if (m) lastPass = { kind: m[1], seq: Number(m[2]) };
  }
  return {
    agentId: str('agent'), diskId: str('disk'), sizeBytes: int('sizebytes'), generation: str('generation'),
    initialComplete: md.initialcomplete === '1', lastDurableSeq: int('lastdurableseq'), passes: int('passes'),
    lastPass, createdAt: str('createdat'), updatedAt: str('updatedat'), pending: md.pending === '1',
  };
}


/**
 * One request of a planned batch. A put's body is the concatenation of `parts` (subarrays of the
 * batch's data, and zeros filling small gaps); it is assembled only when the request is sent.
 */
export type PlannedCall = { kind: 'put'; offset: number; length: number; parts: Buffer[] } | { kind: 'clear'; offset: number; length: number };

/**
 * A zero range at most this long between two data ranges of a batch is sent inside one Put Page
 * with them, as zeros, rather than splitting the write in two requests (and clearing it): sending
 * 256 KiB costs about what a request's round trip does at a page blob's throughput, and it halves
 * the requests of data with scattered small zero regions. Longer zero ranges stay sparse.
 */
export const ZERO_GAP_MERGE_BYTES = 256 * 1024;


/**
 * Plans a batch: disjoint pieces, edge sectors completed with `readSector` (for ranges not on
 * 512-byte boundaries), then Put Page calls (≤ 4 MiB, adjacent data coalesced, zero gaps of at
 * most ZERO_GAP_MERGE_BYTES between data included as zeros) and Clear Pages calls (adjacent zero
 * ranges merged), sorted by offset.
 */
export async function planBatch(ops: WriteOp[], readSectors: (offset: number, length: number) => Promise<Buffer>): Promise<PlannedCall[]> {
  const segs = resolveOverlaps(ops);
  // sectors only partly covered by some piece: their other bytes come from the blob as it is
  const partial = new Set<number>();
  for (const s of segs) {
    if (s.start % SECTOR) partial.add(Math.floor(s.start / SECTOR));
    if (s.end % SECTOR) partial.add(Math.floor(s.end / SECTOR));
  }
  const pieces: Seg[] = [];
  if (partial.size) {
    const sectors = [...partial].sort((a, b) => a - b);
    const images = new Map<number, Buffer>();
    await runPool(sectors.map((sec) => async () => { images.set(sec, await readSectors(sec * SECTOR, SECTOR)); }), PUT_CONCURRENCY);
    for (const s of segs) {
      const a = Math.ceil(s.start / SECTOR) * SECTOR;
      const b = Math.floor(s.end / SECTOR) * SECTOR;
      if (a < b) pieces.push({ start: a, end: b, data: s.data, dataOffset: s.dataOffset + (a - s.start) });
      const first = Math.floor(s.start / SECTOR);
      const last = Math.floor((s.end - 1) / SECTOR);
      for (const sec of first === last ? [first] : [first, last]) {
        const img = images.get(sec);
        if (!img) continue; // a whole sector inside the piece: covered by [a, b)
        const from = Math.max(s.start, sec * SECTOR);
        const to = Math.min(s.end, (sec + 1) * SECTOR);
        if (s.data) s.data.copy(img, from - sec * SECTOR, s.dataOffset + (from - s.start), s.dataOffset + (to - s.start));
        else img.fill(0, from - sec * SECTOR, to - sec * SECTOR);
      }
    }
    for (const sec of sectors) pieces.push({ start: sec * SECTOR, end: (sec + 1) * SECTOR, data: images.get(sec)!, dataOffset: 0 });
    pieces.sort((x, y) => x.start - y.start);
  } else {
    pieces.push(...segs);
  }
  // adjacent zero pieces as one (one per block otherwise): a zero range is judged by its whole length
  let kept = 0;
  for (const p of pieces) {
    const last = kept ? pieces[kept - 1] : null;
    if (last && last.data === null && p.data === null && last.end === p.start) last.end = p.end;
    else pieces[kept++] = p;
  }
  pieces.length = kept;
  const calls: PlannedCall[] = [];
  let run: Buffer[] = [];
  let runStart = 0;
  let runLen = 0;
  const flush = () => {
    if (!runLen) return;
    calls.push({ kind: 'put', offset: runStart, length: runLen, parts: run });
    run = [];
    runLen = 0;
  };
  const append = (o: number, end: number, slice: (from: number, to: number) => Buffer) => {
    while (o < end) {
      if (runLen && (runStart + runLen !== o || runLen === MAX_PUT_PAGE_BYTES)) flush();
      if (!runLen) runStart = o;
      const take = Math.min(end - o, MAX_PUT_PAGE_BYTES - runLen);
      const part = slice(o, o + take);
      const prev = run[run.length - 1];
      // consecutive in memory too (blocks decoded into one buffer): one part, no copy when sent
      if (prev && prev.buffer === part.buffer && prev.byteOffset + prev.length === part.byteOffset) {
        run[run.length - 1] = Buffer.from(prev.buffer, prev.byteOffset, prev.length + part.length);
      } else {
        run.push(part);
      }
      runLen += take;
      o += take;
    }
  };
  for (let i = 0; i < pieces.length; i++) {
    const p = pieces[i];
    if (p.data === null) {
      // a short zero gap between data ranges rides along in the put (see ZERO_GAP_MERGE_BYTES)
      const next = pieces[i + 1];
      if (runLen && runStart + runLen === p.start && p.end - p.start <= ZERO_GAP_MERGE_BYTES && next && next.data !== null && next.start === p.end) {
        append(p.start, p.end, (a, b) => zeroBuffer(b - a));
        continue;
      }
      flush();
      const last = calls[calls.length - 1];
      if (last?.kind === 'clear' && last.offset + last.length === p.start && last.length + (p.end - p.start) <= MAX_CLEAR_BYTES) last.length += p.end - p.start;
      else for (let o = p.start; o < p.end; o += MAX_CLEAR_BYTES) calls.push({ kind: 'clear', offset: o, length: Math.min(MAX_CLEAR_BYTES, p.end - o) });
      continue;
    }
    const data = p.data;
    append(p.start, p.end, (a, b) => data.subarray(p.dataOffset + (a - p.start), p.dataOffset + (b - p.start)));
  }
  flush();
  return calls;
}

/** What a store needs of its backend. */
export interface AzureStoreContext {
  ops: PageBlobOps;
  /** The same operations with one try only: for best-effort work after a failure (close of a failed store). */
  bestEffortOps: PageBlobOps;
  blobName: string;
  log?: Logger;
}

export class AzureReplicaStore implements ReplicaStore {
  private readonly commits: GroupCommit;
  /** Accepted writes not yet confirmed, in submission order. */
  private readonly overlay = new WriteOverlay();
  /** The overlay ids of each submit's ops. */
  private readonly overlayIds = new WeakMap<WriteOp[], number[]>();
  /** Where each submit's data was copied, released when its batch is confirmed. */
  private readonly stagedIn = new WeakMap<WriteOp[], StagingChunk[]>();
  private readonly staging = new StagingArena();
  /** Calls in flight, over every batch, and the calls waiting for a slot. */
  private callsInFlight = 0;
  private readonly callWaiters: (() => void)[] = [];
  /** Put bodies of MAX_PUT_PAGE_BYTES kept for reuse. */
  private readonly bodyPool: Buffer[] = [];
  /** Valid ranges per RANGE_CACHE_SLICE slice (by its start), and a write counter per slice. */
  private readonly rangeCache = new Map<number, PageRange[]>();
  private readonly sliceWrites = new Map<number, number>();
  private readonly rangeFetches = new Map<number, Promise<PageRange[]>>();
  /** The first call that failed (the retry layer gave up on it). */
  private callFailed: MobilityError | null = null;
  private discarded = false;
  private closed = false;
  /** Batches confirmed, and how many of them the metadata last written covers. */
  private appliedBatches = 0;
  private savedBatches = 0;
  /** Bytes sent in Put Page calls by this store (data, completed edge sectors and the zeros of short gaps). */
  bytesWritten = 0;
  /** A patched block is one Put Page from its first to its last changed page: calls are billed, bytes within a block are not. */
  readonly patchGapBytes = Infinity;

  /**
   * For a blob created by this store's open: the ranges written since, merged and sorted. Zeros
   * written anywhere else are already what the blob holds, so no Clear Pages is sent for them (an
   * initial sync would otherwise clear every zero region of a fresh, empty blob). null once the
   * blob was not fresh, or when the list grew past MAX_FRESH_INTERVALS (then every zero range is
   * cleared, as always correct).
   */
  private written: [number, number][] | null;

  constructor(
    private readonly ctx: AzureStoreContext,
    private state: AzureReplicaState,
    /** Opened for a verify session: never written, grown or its metadata touched. */
    readonly readOnly: boolean,
    /** The blob was created empty by this open. */
    fresh = false,
  ) {
    this.written = fresh && !readOnly ? [] : null;
    this.commits = new GroupCommit({
      maxInFlight: BATCHES_IN_FLIGHT,
      minBytesWhileBusy: 2 * MAX_PUT_PAGE_BYTES,
      linger: { minBytes: 1024 * 1024, fullBytes: 2 * MAX_PUT_PAGE_BYTES, ms: LINGER_MS },
      footprint: (ops) => footprintOf(ops, SECTOR),
      apply: (batch) => this.applyBatch(batch),
      committed: (batch) => this.committed(batch),
      failed: (err) => this.callFailed ?? this.coded(err),
      stopped: (err) => {
        this.ctx.log?.error('azure replica write failed; the store stops', { blob: this.ctx.blobName, code: err.code, error: err.message });
        this.overlay.clear(); // what the blob holds is all there is now
      },
    });
  }

  /** True when [start, end) lies where nothing was written since the fresh blob was created. */
  private neverWritten(start: number, end: number): boolean {
    const w = this.written;
    if (!w) return false;
    // the first interval ending after start
    let lo = 0;
    let hi = w.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (w[mid][1] <= start) lo = mid + 1;
      else hi = mid;
    }
    return lo === w.length || w[lo][0] >= end;
  }

  /** Records [start, end) as written (fresh blobs only). */
  private markWritten(start: number, end: number): void {
    const w = this.written;
    if (!w) return;
    let lo = 0;
    let hi = w.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (w[mid][1] < start) lo = mid + 1;
      else hi = mid;
    }
    let k = lo;
    let s = start;
    let e = end;
    while (k < w.length && w[k][0] <= e) {
      s = Math.min(s, w[k][0]);
      e = Math.max(e, w[k][1]);
      k++;
    }
    w.splice(lo, k - lo, [s, e]);
    if (w.length > MAX_FRESH_INTERVALS) this.written = null;
  }

  get agentId(): string { return this.state.agentId; }
  get diskId(): string { return this.state.diskId; }
  get generation(): string { return this.state.generation; }
  get sizeBytes(): number { return this.state.sizeBytes; }
  get initialComplete(): boolean { return this.state.initialComplete; }
  get lastDurableSeq(): number { return this.state.lastDurableSeq; }
  get unpublished(): boolean { return this.state.pending && !this.discarded; }
  /** The error that stopped the store: set at the first call that failed, before its batch settled. */
  get failure(): MobilityError | null { return this.commits.failure ?? this.callFailed; }

  private coded(err: unknown): MobilityError {
    return err instanceof MobilityError ? err
      : new MobilityError('MOB_ERR_STORAGE', `writing replica blob ${this.ctx.blobName} failed: ${(err as Error)?.message ?? String(err)}`);
  }
  /** The page blob holding the replica. */
  get blobName(): string { return this.ctx.blobName; }
  get snapshot(): Readonly<AzureReplicaState> { return { ...this.state }; }

  private check(offset: number, length: number): void {
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > this.state.sizeBytes) {
      throw new MobilityError('MOB_ERR_OUT_OF_RANGE', `range ${offset}+${length} lies beyond the ${this.state.sizeBytes}-byte disk`);
    }
  }

  private async saveState(ops: PageBlobOps = this.ctx.ops): Promise<void> {
    const applied = this.appliedBatches;
    this.state.updatedAt = new Date().toISOString();
    await ops.setMetadata(this.ctx.blobName, encodeState(this.state));
    this.savedBatches = applied;
  }

  /** Current content of a range: accepted writes not yet confirmed, over what the blob holds. */
  async read(offset: number, length: number): Promise<Buffer> {
    this.check(offset, length);
    // a stopped store no longer knows its newest content (the overlay of rejected writes is gone)
    if (this.failure) throw this.failure;
    // accepted-not-confirmed writes over the range, oldest first (a later one wins); the parts
    // they cover are copied out before the download (see WriteOverlay.read)
    const { whole, pieces } = this.overlay.read(offset, offset + length);
    if (whole) return whole;
    const buf = length ? await this.ctx.ops.download({ name: this.ctx.blobName }, offset, length) : Buffer.alloc(0);
    for (const p of pieces) overlayInto(buf, offset, p);
    return buf;
  }

  /**
   * Queues writes tagged with seq; resolves once they and everything submitted before are confirmed
   * by the service. MOB_ERR_OUT_OF_RANGE is thrown synchronously; after a failure every submit rejects.
   */
  submit(ops: WriteOp[], seq: number): Promise<void> {
    if (this.failure) return Promise.reject(this.failure);
    if (this.readOnly) return Promise.reject(new MobilityError('MOB_ERR_INTERNAL', `the replica of disk ${this.diskId} was opened read-only (verify) and cannot be written`));
    if (this.closed) return Promise.reject(new MobilityError('MOB_ERR_INTERNAL', `the replica store of disk ${this.diskId} is closed`));
    for (const op of ops) {
      this.check(op.offset, op.length);
      if (op.data && op.data.length < op.length) throw new MobilityError('MOB_ERR_INTERNAL', `write ${op.offset}+${op.length} carries only ${op.data.length} bytes`);
    }
    // the data is copied into staging memory at once (see target/staging.ts): the caller's
    // buffers (a whole WebSocket message) are free to die young
    const staged = this.staging.stage(ops);
    ops = staged.ops;
    this.overlayIds.set(ops, this.overlay.add(ops));
    this.stagedIn.set(ops, staged.chunks);
    for (const op of ops) {
      for (let a = Math.floor(op.offset / RANGE_CACHE_SLICE); a <= Math.floor((op.offset + Math.max(op.length, 1) - 1) / RANGE_CACHE_SLICE); a++) {
        this.rangeCache.delete(a);
        this.sliceWrites.set(a, (this.sliceWrites.get(a) ?? 0) + 1);
      }
    }
    return this.commits.submit(ops, seq);
  }

  /** A batch and every one before it are confirmed: they leave the overlay, and the durable sequence moves. */
  private committed(batch: Batch): void {
    this.appliedBatches++;
    for (const p of batch.parts) {
      this.overlay.remove(this.overlayIds.get(p.ops) ?? []);
      // the calls of the batch are over: nothing reads these copies any more
      this.staging.releaseAll(this.stagedIn.get(p.ops) ?? []);
      this.stagedIn.delete(p.ops);
    }
    if (batch.maxSeq > this.state.lastDurableSeq) this.state.lastDurableSeq = batch.maxSeq;
  }

  private async applyBatch(batch: Batch): Promise<void> {
    const name = this.ctx.blobName;
    const planned = await planBatch(batch.ops, (o, l) => this.ctx.ops.download({ name }, o, l));
    // zeros where a fresh blob was never written are there already
    const calls = planned.filter((c) => c.kind === 'put' || !this.neverWritten(c.offset, c.offset + c.length));
    for (const c of calls) if (c.kind === 'put') this.markWritten(c.offset, c.offset + c.length);
    await runPool(calls.map((c) => () => this.withSlot(async () => {
      if (c.kind === 'put') {
        const body = this.body(c.parts, c.length);
        try {
          await this.ctx.ops.putPages(name, c.offset, body);
        } finally {
          this.releaseBody(body, c.parts);
        }
        this.bytesWritten += c.length;
      } else {
        await this.ctx.ops.clearPages(name, c.offset, c.length);
      }
    })), PUT_CONCURRENCY);
  }

  /**
   * Runs fn once a call slot is free (PUT_CONCURRENCY over every batch; slots are handed over in
   * the order they were asked for). A stopped store starts no more calls.
   */
  private async withSlot(fn: () => Promise<void>): Promise<void> {
    if (this.callsInFlight >= PUT_CONCURRENCY) await new Promise<void>((r) => this.callWaiters.push(r)); // the slot is handed over
    else this.callsInFlight++;
    try {
      if (this.failure) throw this.failure;
      await fn();
    } catch (err) {
      this.callFailed ??= this.coded(err); // no other call starts from now on
      throw err;
    } finally {
      const next = this.callWaiters.shift();
      if (next) next();
      else this.callsInFlight--;
    }
  }

  /** A put's body: its one part as it is, or the parts copied into a pooled buffer. */
  private body(parts: Buffer[], length: number): Buffer {
    if (parts.length === 1) return parts[0];
    const buf = (this.bodyPool.pop() ?? Buffer.allocUnsafe(MAX_PUT_PAGE_BYTES)).subarray(0, length);
    let at = 0;
    for (const p of parts) at += p.copy(buf, at);
    return buf;
  }

  private releaseBody(body: Buffer, parts: Buffer[]): void {
    if (parts.length === 1) return; // not ours
    if (this.bodyPool.length < PUT_CONCURRENCY) this.bodyPool.push(Buffer.from(body.buffer, body.byteOffset, MAX_PUT_PAGE_BYTES));
  }

  /** Resolves when every submitted write has been confirmed (or failed). */
  whenApplied(): Promise<void> {
    return this.commits.whenIdle();
  }

  /** xxh64 of each page in [firstPage, firstPage+count) of the replica, 8 bytes LE each. */
  async pageDigests(firstPage: number, count: number, pageSize: number): Promise<Buffer> {
    const start = firstPage * pageSize;
    if (!Number.isSafeInteger(start) || count < 0 || start > this.state.sizeBytes || (count > 0 && start >= this.state.sizeBytes)) {
      throw new MobilityError('MOB_ERR_OUT_OF_RANGE', `pages ${firstPage}+${count} lie beyond the ${this.state.sizeBytes}-byte disk`);
    }
    await this.whenApplied();
    return blobPageDigests(this.ctx.ops, { name: this.ctx.blobName }, this.state.sizeBytes, firstPage, count, pageSize, (a, b) => this.validRanges(a, b));
  }

  /**
   * Valid ranges of [start, end) of the blob, from the slice cache (see RANGE_CACHE_SLICE). A
   * slice is kept only when no write was queued or in flight, nor submitted to it, while it was
   * fetched; concurrent misses of a slice share one fetch.
   */
  private async validRanges(start: number, end: number): Promise<PageRange[]> {
    const out: PageRange[] = [];
    const blobEnd = roundUpSector(this.state.sizeBytes);
    for (let k = Math.floor(start / RANGE_CACHE_SLICE); k * RANGE_CACHE_SLICE < end; k++) {
      let slice = this.rangeCache.get(k);
      if (!slice) {
        let fetching = this.rangeFetches.get(k);
        if (!fetching) {
          const writes = this.sliceWrites.get(k) ?? 0;
          const quiet = !this.commits.busy;
          fetching = validRanges(this.ctx.ops, { name: this.ctx.blobName }, k * RANGE_CACHE_SLICE, Math.min(blobEnd, (k + 1) * RANGE_CACHE_SLICE));
          this.rangeFetches.set(k, fetching);
          const key = k;
          void fetching.then((r) => {
            if (quiet && !this.commits.busy && (this.sliceWrites.get(key) ?? 0) === writes) {
              if (this.rangeCache.size >= RANGE_CACHE_SLICES) this.rangeCache.delete(this.rangeCache.keys().next().value!);
              this.rangeCache.set(key, r);
            }
          }, () => undefined).finally(() => { if (this.rangeFetches.get(key) === fetching) this.rangeFetches.delete(key); });
        }
        slice = await fetching;
      }
      appendClipped(out, slice, start, end);
    }
    return out;
  }

  /** Records a finished pass in the metadata ('initial' and 'resync' make the replica complete). */
  async endPass(kind: string, seq: number): Promise<void> {
    await this.whenApplied();
    if (this.failure) throw this.failure;
    if (seq > this.state.lastDurableSeq) this.state.lastDurableSeq = seq;
    if (kind === 'initial' || kind === 'resync') this.state.initialComplete = true;
    this.state.passes++;
    this.state.lastPass = { kind, seq };
    await this.saveState();
  }

  /** Snapshots the blob as it is once every submitted write is confirmed: the point is that snapshot. */
  async preparePoint(pointId: string): Promise<PointRef> {
    await this.whenApplied();
    if (this.failure) throw this.failure;
    await this.saveState();
    const snapshot = await this.ctx.ops.snapshot(this.ctx.blobName, { ...encodeState(this.state), mobilitypoint: pointId });
    this.ctx.log?.info('azure recovery point snapshot', { blob: this.ctx.blobName, point: pointId, snapshot });
    return { snapshot };
  }

  /** A snapshot is complete by itself: nothing to do. */
  async commitPoint(_pointId: string): Promise<void> {
    /* idempotent no-op */
  }

  /** Makes a new replica visible (drops the pending mark). No-op otherwise. */
  async publish(): Promise<void> {
    if (!this.state.pending || this.discarded) return;
    await this.whenApplied();
    this.state.pending = false;
    try {
      await this.saveState();
    } catch (err) {
      this.state.pending = true;
      throw err;
    }
  }

  /** Drops a new replica never published: its blob is deleted. No-op otherwise. */
  async discard(): Promise<void> {
    if (!this.state.pending || this.discarded) return;
    this.discarded = true;
    this.closed = true;
    await this.whenApplied();
    this.staging.close();
    try {
      await this.ctx.ops.delete({ name: this.ctx.blobName }, true);
    } catch (err) {
      // left behind, it is still marked pending: invisible, and overwritten by the next open
      this.ctx.log?.warn('could not delete an unpublished replica blob', { blob: this.ctx.blobName, error: (err as Error).message });
    }
  }

  /** Waits for queued writes, records the durable sequence (best effort when failed) and closes. */
  async close(): Promise<void> {
    if (this.closed) return;
    if (this.state.pending || this.discarded) return this.discard();
    this.closed = true;
    await this.whenApplied();
    this.bodyPool.length = 0;
    this.staging.close();
    if (!this.readOnly && this.appliedBatches !== this.savedBatches) {
      // a failed store's target is likely down: one try, no backoff
      await this.saveState(this.failure ? this.ctx.bestEffortOps : this.ctx.ops).catch((err) => {
        this.ctx.log?.warn('could not record the durable sequence at close', { blob: this.ctx.blobName, error: (err as Error).message });
      });
    }
  }
}

export { roundUpSector, resolveOverlaps };
