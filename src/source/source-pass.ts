/**
 * One replication pass of one disk, source side.
 *
 *   initial / incremental (scan): read the disk in large chunks, digest every
 *     page, compare with the DigestMap (what the target holds), ship changed
 *     blocks; a block where only some pages changed ships only those pages.
 *   resync (checksum): ask the target for its page digests, compare with the
 *     source, ship only mismatching pages; rebuilds the map.
 *   verify: the same comparison, ships nothing, reports mismatching ranges.
 *
 * Map entries are set only when the server acks (durable). A pass survives
 * reconnects: resume() takes the new Welcome's last durable sequence, treats
 * frames up to it as acked, and rewinds the cursor to the first block of any
 * frame that was lost.
 */
import { DIGEST_REQUEST_PAGES, DIGEST_REQUESTS_IN_FLIGHT, READ_CHUNK_BYTES, TARGET_FRAME_PAYLOAD } from '../constants.js';
import { MobilityError } from '../errors.js';
import { Encoding, encodeMessage, type Ack, type BlockRef, type DigestReply } from '../protocol/frame-codec.js';
import type { Connection } from '../transport/client.js';
import { BufferPool } from '../util/buffer-pool.js';
import { encodeBlock, encodeBound, shouldCompress, type CompressMode } from '../protocol/block-codec.js';
import { digest, pageDigests } from '../protocol/digest.js';
import { DigestMap } from './digest-map.js';
import { ChunkReader, type DiskSource } from './disk-source.js';
import { blockRuns, type BlockRun } from './spool.js';

/** Idle data-frame buffers a pass keeps (each about 2 MiB at the default block size). */
const MSG_POOL_KEEP = 6;
/** Continuous shipping's reads in flight: runs, and bytes (see shipBlocks). */
const READ_AHEAD_RUNS = 8;
const READ_AHEAD_BYTES = 8 * 1024 * 1024;

export type PassKind = 'initial' | 'incremental' | 'resync' | 'verify';

export interface PassStats {
  bytesScanned: number;
  blocksSent: number;
  pagesSent: number;
  /** Bytes of block data shipped before compression (whole blocks or changed pages). */
  bytesChanged: number;
  /** Wire bytes of data frames (headers + payloads). */
  bytesSent: number;
  zeroBlocks: number;
  /** Blocks sent lz4-compressed (with compress auto: while the link was the bottleneck). */
  lz4Blocks: number;
  /** Ranges where source and replica differ (verify and resync). */
  mismatches: { offset: number; length: number }[];
  mismatchBytes: number;
}

interface InFlight {
  firstBlock: number;
  /** blockDigest: xxh64 of the whole block as the target holds it once this entry is applied. */
  entries: { block: number; firstPage: number; mask: number[] | null; digests: BigUint64Array; blockDigest: bigint }[];
}

export interface PassOptions {
  diskIndex: number;
  blockSize: number;
  pageSize: number;
  /** lz4 per block: see CompressMode (auto = only while the connection's link is backlogged). */
  compress: CompressMode;
  /** Persist the map (throttled by the caller). Called after acks. */
  onMapChanged?: () => void;
  /** The target made these blocks durable (continuous shipping settles them in the dirty journal). */
  onFrameAcked?: (blocks: number[]) => void;
  onProgress?: (p: { done: number; total: number; stats: PassStats }) => void;
}

export class SourcePass {
  readonly stats: PassStats = { bytesScanned: 0, blocksSent: 0, pagesSent: 0, bytesChanged: 0, bytesSent: 0, zeroBlocks: 0, lz4Blocks: 0, mismatches: [], mismatchBytes: 0 };
  private cursorBlock = 0;
  private inflight = new Map<number, InFlight>();
  private seq = 0;
  private readonly pagesPerBlock: number;
  done = false;
  /** Frames acknowledged so far (progress, for the reconnect policy). */
  ackedFrames = 0;

  /** Highest sequence used so far (a following pass on the same session continues after it). */
  get lastSeq(): number { return this.seq; }

  /** Reused lz4 output buffer (encodeBlock copies what it keeps). */
  private readonly scratch: Buffer;
  /** Data frame buffers, reused once written (see util/buffer-pool.ts). */
  private readonly msgPool: BufferPool;

  constructor(readonly kind: PassKind, private readonly src: DiskSource, readonly map: DigestMap, private readonly o: PassOptions) {
    this.pagesPerBlock = o.blockSize / o.pageSize;
    this.scratch = Buffer.allocUnsafe(encodeBound(o.blockSize));
    // a frame is at most TARGET_FRAME_PAYLOAD plus one (possibly incompressible) block, plus its header
    this.msgPool = new BufferPool(TARGET_FRAME_PAYLOAD + encodeBound(o.blockSize) + 64 * 1024, MSG_POOL_KEEP);
    map.useBlockSize(o.blockSize);
  }

  /** Before (re)running on a new connection: settle what became durable, rewind over what was lost. */
  resume(lastDurableSeq: number): void {
    this.onAck(lastDurableSeq);
    for (const f of this.inflight.values()) this.cursorBlock = Math.min(this.cursorBlock, f.firstBlock);
    this.inflight.clear();
    this.seq = Math.max(this.seq, lastDurableSeq);
  }

  /** Records acked frames into the map. */
  onAck(seq: number): void {
    let changed = false;
    for (const [s, f] of this.inflight) {
      if (s > seq) continue;
      for (const e of f.entries) {
        if (e.mask === null) for (let i = 0; i < e.digests.length; i++) this.map.set(e.firstPage + i, e.digests[i]);
        else for (const i of e.mask) this.map.set(e.firstPage + i, e.digests[i]);
        this.map.setBlock(e.block, e.blockDigest);
      }
      this.inflight.delete(s);
      this.o.onFrameAcked?.(f.entries.map((e) => e.block));
      this.ackedFrames++;
      changed = true;
    }
    if (changed) this.o.onMapChanged?.();
  }

  /** Runs (or continues) the pass on conn until the server acked its end. Throws the connection's error if it drops. */
  async run(conn: Connection): Promise<void> {
    const onAck = (a: Ack) => {
      if (a.disk === this.o.diskIndex) this.onAck(a.seq);
    };
    conn.on('ack', onAck);
    try {
      if (this.kind === 'resync' || this.kind === 'verify') await this.compareWithTarget(conn);
      else await this.scan(conn);
      if (this.kind !== 'verify') await this.finish(conn);
      this.done = true;
    } finally {
      conn.off('ack', onAck);
    }
  }

  // ---- frame building ----
  private blocks: BlockRef[] = [];
  private payloads: Buffer[] = [];
  private payloadBytes = 0;
  private entries: InFlight['entries'] = [];
  private frameFirstBlock = -1;

  private addBlock(index: number, enc: Encoding, payload: Buffer, mask: number[] | null, fullBlock: Buffer, pageDigs: BigUint64Array, pagesInBlock: number): void {
    let pageMask: Uint8Array = Buffer.alloc(0);
    if (mask) {
      pageMask = Buffer.alloc(Math.ceil(pagesInBlock / 8));
      for (const i of mask) pageMask[i >> 3] |= 1 << (i & 7);
    }
    const blockDigest = digest(fullBlock);
    const dig = Buffer.allocUnsafe(8);
    dig.writeBigUInt64LE(blockDigest, 0);
    this.blocks.push({ index, encoding: enc, length: payload.length, pageMask, digest: dig });
    this.payloads.push(payload);
    this.payloadBytes += payload.length;
    this.entries.push({ block: index, firstPage: index * this.pagesPerBlock, mask, digests: pageDigs.slice(0, pagesInBlock), blockDigest });
    if (this.frameFirstBlock < 0) this.frameFirstBlock = index;
    this.stats.blocksSent++;
    this.stats.pagesSent += mask ? mask.length : pagesInBlock;
    if (enc === Encoding.ZERO && !mask) this.stats.zeroBlocks++;
    if (enc === Encoding.LZ4) this.stats.lz4Blocks++;
  }

  private async flush(conn: Connection): Promise<void> {
    if (!this.blocks.length) return;
    const seq = ++this.seq;
    let base: Buffer | null = null;
    const msg = encodeMessage({ type: 'data', data: { disk: this.o.diskIndex, seq, blocks: this.blocks } }, this.payloads, (n) => (base = this.msgPool.take(n)));
    this.inflight.set(seq, { firstBlock: this.frameFirstBlock, entries: this.entries });
    this.blocks = [];
    this.payloads = [];
    this.payloadBytes = 0;
    this.entries = [];
    this.frameFirstBlock = -1;
    this.stats.bytesSent += msg.length;
    // the message buffer goes back to the pool once the socket has written it
    await conn.sendData(msg, () => { if (base) this.msgPool.give(base); });
  }

  private discardFrame(): void {
    this.blocks = [];
    this.payloads = [];
    this.payloadBytes = 0;
    this.entries = [];
    this.frameFirstBlock = -1;
  }

  /**
   * Ships one block given its page digests and the mask of pages that differ from the target
   * (null = ship the whole block).
   */
  private async ship(conn: Connection, index: number, data: Buffer, digs: BigUint64Array, pagesInBlock: number, mask: number[] | null): Promise<void> {
    let body: Buffer;
    if (mask === null) {
      body = data;
      this.stats.bytesChanged += data.length;
    } else {
      const parts: Buffer[] = [];
      for (const i of mask) parts.push(data.subarray(i * this.o.pageSize, Math.min((i + 1) * this.o.pageSize, data.length)));
      body = Buffer.concat(parts);
      this.stats.bytesChanged += body.length;
    }
    // A RAW payload may alias the reader's chunk buffer: safe because every chunk's
    // frames are flushed (copied into a message) before the reader reuses that buffer.
    const enc = encodeBlock(body, shouldCompress(this.o.compress, () => conn.linkBusy()), this.scratch);
    this.addBlock(index, enc.encoding, enc.payload, mask, data, digs, pagesInBlock);
    if (this.payloadBytes >= TARGET_FRAME_PAYLOAD || this.blocks.length >= 512) await this.flush(conn);
  }

  private progress(done: number): void {
    this.o.onProgress?.({ done, total: this.src.size, stats: this.stats });
  }

  private async scan(conn: Connection): Promise<void> {
    this.discardFrame();
    const bs = this.o.blockSize;
    const chunk = Math.max(bs, Math.floor(READ_CHUNK_BYTES / bs) * bs);
    const reader = new ChunkReader(this.src, this.cursorBlock * bs, this.src.size, chunk);
    const digs = new BigUint64Array(this.pagesPerBlock);
    const map = this.map.digests;
    const blockMap = this.map.blockDigests;
    const blockLevel = this.kind === 'incremental' && this.pagesPerBlock > 1;
    for (;;) {
      const c = await reader.read();
      if (!c) break;
      for (let o = 0; o < c.data.length; o += bs) {
        const index = (c.offset + o) / bs;
        const data = c.data.subarray(o, Math.min(o + bs, c.data.length));
        // one hash per unchanged block: its digest equals what the target holds
        let bd = 0n;
        if (blockLevel) {
          bd = DigestMap.normalize(digest(data));
          if (blockMap[index] === bd) continue;
        }
        const n = pageDigests(data, this.o.pageSize, digs);
        const first = index * this.pagesPerBlock;
        let mask: number[] | null = null;
        let changed = 0;
        for (let i = 0; i < n; i++) {
          if (map[first + i] !== DigestMap.normalize(digs[i])) {
            changed++;
            (mask ??= []).push(i);
          }
        }
        if (changed === 0) {
          if (blockLevel) this.map.setBlock(index, bd); // every page matches: so does the block
          continue;
        }
        await this.ship(conn, index, data, digs, n, changed === n ? null : mask);
      }
      this.stats.bytesScanned += c.data.length;
      // everything before the next chunk is either acked or in a frame we track
      await this.flush(conn);
      this.cursorBlock = (c.offset + c.data.length) / bs;
      this.progress(c.offset + c.data.length);
    }
    await this.flush(conn);
  }

  /**
   * Continuous shipping: reads the given blocks (coalesced into runs, up to READ_AHEAD_RUNS runs
   * and READ_AHEAD_BYTES read ahead), ships the pages that differ from what the target holds, and returns the blocks
   * that needed nothing. Every frame is sent before this returns, so a cut sent afterwards
   * covers them. Subscribe acks with listen() while using this outside run().
   */
  async shipBlocks(conn: Connection, blocks: number[]): Promise<number[]> {
    const runs = this.runsOf(blocks);
    // each run has its own buffer: RAW payloads may alias it until the frame is flushed
    const read = (r: BlockRun) => {
      const buf = Buffer.allocUnsafe(r.len);
      const p = this.src.read(buf, r.start, r.len).then(() => buf);
      p.catch(() => undefined);
      return p;
    };
    // scattered dirty blocks are mostly short runs, each waiting its turn at the disk: several in
    // flight (the source's small slots), bounded in bytes too (a run can be a whole read chunk)
    const ahead: { len: number; p: Promise<Buffer> }[] = [];
    let aheadBytes = 0;
    let next = 0;
    const fill = () => {
      while (next < runs.length && (ahead.length === 0 || (ahead.length < READ_AHEAD_RUNS && aheadBytes + runs[next]!.len <= READ_AHEAD_BYTES))) {
        const r = runs[next++]!;
        ahead.push({ len: r.len, p: read(r) });
        aheadBytes += r.len;
      }
    };
    return this.shipRuns(conn, runs, async () => {
      fill();
      const a = ahead.shift()!;
      aheadBytes -= a.len;
      const data = await a.p;
      fill();
      return data;
    });
  }

  /** The blocks as runs of consecutive blocks of at most one read chunk. */
  runsOf(blocks: number[]): BlockRun[] {
    return blockRuns(blocks, this.o.blockSize, this.src.size, Math.max(1, Math.floor(READ_CHUNK_BYTES / this.o.blockSize)));
  }

  /**
   * Reads runs from the disk into buffers of their own, `parallel` reads at a time (the cut's
   * spool reads the frozen remainder with this: scattered blocks, so depth matters); `each` is
   * called once per run, one call at a time, in completion order. `from`: another source of the
   * same disk (a host-mode point's view) instead of the pass's own.
   */
  async readRuns(runs: BlockRun[], each: (r: BlockRun, data: Buffer) => Promise<void>, parallel = 8, from: DiskSource = this.src): Promise<void> {
    let next = 0;
    let failed = false;
    let chain = Promise.resolve();
    const worker = async () => {
      while (next < runs.length && !failed) {
        const r = runs[next++]!;
        const buf = Buffer.allocUnsafe(r.len);
        try {
          await from.read(buf, r.start, r.len);
          if (failed) return;
          chain = chain.then(() => each(r, buf));
          await chain;
        } catch (err) {
          failed = true; // the other workers stop before their next read or call of each
          throw err;
        }
      }
    };
    // every worker has stopped before this returns or throws: nothing calls each afterwards
    const results = await Promise.allSettled(Array.from({ length: Math.min(parallel, runs.length) }, worker));
    const bad = results.find((x): x is PromiseRejectedResult => x.status === 'rejected');
    if (bad) throw bad.reason;
  }

  /**
   * Ships runs whose data `next()` gives in order (read from the disk, or from a cut's spool):
   * the pages that differ from what the target holds. Returns the blocks that needed nothing.
   * Every frame is sent before this returns.
   */
  async shipRuns(conn: Connection, runs: BlockRun[], next: (r: BlockRun, k: number) => Promise<Buffer>): Promise<number[]> {
    this.discardFrame();
    const bs = this.o.blockSize;
    const digs = new BigUint64Array(this.pagesPerBlock);
    const map = this.map.digests;
    const unchanged: number[] = [];
    for (const [k, r] of runs.entries()) {
      const data = await next(r, k);
      for (let b = 0; b < r.count; b++) {
        const index = r.first + b;
        const o = b * bs;
        if (o >= r.len) break;
        const block = data.subarray(o, Math.min(o + bs, r.len));
        const n = pageDigests(block, this.o.pageSize, digs);
        const p0 = index * this.pagesPerBlock;
        let mask: number[] | null = null;
        for (let p = 0; p < n; p++) if (map[p0 + p] !== DigestMap.normalize(digs[p])) (mask ??= []).push(p);
        if (!mask) {
          unchanged.push(index);
          continue;
        }
        await this.ship(conn, index, block, digs, n, mask.length === n ? null : mask);
      }
      this.stats.bytesScanned += r.len;
    }
    await this.flush(conn);
    return unchanged;
  }

  /** Feeds this pass the connection's acks (for shipBlocks); returns the unsubscribe function. */
  listen(conn: Connection): () => void {
    const onAck = (a: Ack) => {
      if (a.disk === this.o.diskIndex) this.onAck(a.seq);
    };
    conn.on('ack', onAck);
    return () => conn.off('ack', onAck);
  }

  /** Frames sent and not yet acknowledged. */
  get framesInFlight(): number { return this.inflight.size; }

  private async compareWithTarget(conn: Connection): Promise<void> {
    this.discardFrame();
    const ps = this.o.pageSize;
    const bs = this.o.blockSize;
    const totalPages = Math.ceil(this.src.size / ps);
    const reqPages = Math.max(this.pagesPerBlock, Math.floor(DIGEST_REQUEST_PAGES / this.pagesPerBlock) * this.pagesPerBlock);
    const replies = new Map<number, Buffer>();
    let wake: (() => void) | null = null;
    const onReply = (r: DigestReply, payload: Buffer) => {
      if (r.disk !== this.o.diskIndex) return;
      replies.set(r.firstPage, payload);
      wake?.();
    };
    conn.on('digestReply', onReply);
    const onClose = () => wake?.();
    conn.on('close', onClose);
    let requestId = 0;
    let nextReqPage = this.cursorBlock * this.pagesPerBlock;
    const request = () => {
      if (nextReqPage >= totalPages) return;
      const count = Math.min(reqPages, totalPages - nextReqPage);
      conn.send(encodeMessage({ type: 'digestRequest', digestRequest: { disk: this.o.diskIndex, requestId: ++requestId, firstPage: nextReqPage, pageCount: count } }));
      nextReqPage += count;
    };
    try {
      for (let i = 0; i < DIGEST_REQUESTS_IN_FLIGHT; i++) request();
      const chunkBytes = reqPages * ps;
      const reader = new ChunkReader(this.src, this.cursorBlock * bs, this.src.size, chunkBytes);
      const local = new BigUint64Array(reqPages);
      const digs = new BigUint64Array(this.pagesPerBlock);
      let mismatchStart = -1;
      for (;;) {
        const c = await reader.read();
        if (!c) break;
        const firstPage = c.offset / ps;
        const n = pageDigests(c.data, ps, local);
        while (!replies.has(firstPage)) {
          if (conn.closed) throw conn.closed;
          await new Promise<void>((r) => (wake = r));
          wake = null;
        }
        const remote = replies.get(firstPage)!;
        replies.delete(firstPage);
        request();
        if (remote.length !== n * 8) throw new MobilityError('MOB_ERR_FRAME_MALFORMED', `digest reply for page ${firstPage} has ${remote.length / 8} digests, expected ${n}`);
        for (let b = 0; b * this.pagesPerBlock < n; b++) {
          const p0 = b * this.pagesPerBlock;
          const pagesInBlock = Math.min(this.pagesPerBlock, n - p0);
          let mask: number[] | null = null;
          for (let i = 0; i < pagesInBlock; i++) {
            const p = p0 + i;
            const differs = remote.readBigUInt64LE(8 * p) !== local[p];
            const pageOff = (firstPage + p) * ps;
            if (differs) {
              (mask ??= []).push(i);
              if (mismatchStart < 0) mismatchStart = pageOff;
            } else {
              if (mismatchStart >= 0) this.addMismatch(mismatchStart, pageOff);
              mismatchStart = -1;
              if (this.kind === 'resync') this.map.set(firstPage + p, local[p]);
            }
          }
          if (mask && this.kind === 'resync') {
            const index = (c.offset + p0 * ps) / bs;
            const data = c.data.subarray(p0 * ps, Math.min((p0 + pagesInBlock) * ps, c.data.length));
            digs.set(local.subarray(p0, p0 + pagesInBlock));
            await this.ship(conn, index, data, digs, pagesInBlock, mask.length === pagesInBlock ? null : mask);
          }
        }
        this.stats.bytesScanned += c.data.length;
        await this.flush(conn);
        this.cursorBlock = (c.offset + c.data.length) / bs;
        this.progress(c.offset + c.data.length);
      }
      if (mismatchStart >= 0) this.addMismatch(mismatchStart, this.src.size);
      await this.flush(conn);
    } finally {
      conn.off('digestReply', onReply);
      conn.off('close', onClose);
    }
  }

  private addMismatch(start: number, end: number): void {
    const last = this.stats.mismatches[this.stats.mismatches.length - 1];
    const e = Math.min(end, this.src.size);
    if (last && last.offset + last.length === start) last.length += e - start;
    else this.stats.mismatches.push({ offset: start, length: e - start });
    this.stats.mismatchBytes += e - start;
  }

  /** Sends PassEnd and waits until the server recorded it (which also acks every earlier frame). */
  private async finish(conn: Connection): Promise<void> {
    const seq = ++this.seq;
    const acked = new Promise<void>((resolve, reject) => {
      const onAck = (a: Ack) => {
        if (a.disk === this.o.diskIndex && a.seq >= seq) {
          conn.off('ack', onAck);
          conn.off('close', onClose);
          resolve();
        }
      };
      const onClose = (err: MobilityError) => {
        conn.off('ack', onAck);
        reject(err);
      };
      conn.on('ack', onAck);
      conn.on('close', onClose);
    });
    conn.send(encodeMessage({ type: 'passEnd', passEnd: { disk: this.o.diskIndex, seq, kind: this.kind } }));
    await acked;
  }
}
