/**
 * Staging memory for writes a replica store holds until its target confirmed them.
 *
 * Why: a store that keeps the data it was given (a slice of the WebSocket message it arrived
 * in) while the target works keeps the whole 1 MiB message alive for tens or hundreds of
 * milliseconds. Such buffers outlive two young-generation collections, move to the old
 * generation, and every 64 MiB of them makes V8 run a full mark of the heap: in a 2 GiB initial
 * sync to Azure that was 80 full collections and about 40 % of the server's CPU. Copied at once
 * into long-lived chunks that are used again, the messages die young and cost nothing to free.
 *
 * Data is placed one after the other in chunks of CHUNK_BYTES (so writes adjacent on disk and in
 * arrival order usually stay adjacent in memory, and a target can send them as one body without
 * another copy). A chunk goes back to the pool once every write placed in it was released (the
 * chunk being filled too, so an idle store holds none); a pool shared by every store of the
 * process keeps at most `keep` idle chunks. A store that failed never releases the writes its
 * target may still be reading: those chunks are left to the garbage collector.
 */

/** One chunk: its memory, where the next write goes, and how many placed writes are still held. */
export interface StagingChunk { readonly buf: Buffer; used: number; refs: number; sealed: boolean }

import type { WriteOp } from './replica-store.js';

export class StagingPool {
  private readonly idle: Buffer[] = [];

  constructor(readonly chunkBytes: number, private readonly keep: number) {}

  take(): Buffer {
    return this.idle.pop() ?? Buffer.allocUnsafeSlow(this.chunkBytes);
  }

  give(buf: Buffer): void {
    if (this.idle.length < this.keep && buf.length === this.chunkBytes) this.idle.push(buf);
  }

  get idleChunks(): number {
    return this.idle.length;
  }
}

/** 8 MiB chunks, 4 kept idle: a busy server reuses them; an idle one holds 32 MiB at most. */
export const SHARED_STAGING = new StagingPool(8 * 1024 * 1024, 4);

export class StagingArena {
  private current: StagingChunk | null = null;

  constructor(private readonly pool: StagingPool = SHARED_STAGING) {}

  /**
   * A copy of data in staging memory, and the chunk to release() once the copy is no longer
   * used. Data larger than a chunk gets a buffer of its own (chunk null: nothing to release).
   */
  copy(data: Buffer): { data: Buffer; chunk: StagingChunk | null } {
    const n = data.length;
    if (n > this.pool.chunkBytes) return { data: Buffer.from(data), chunk: null };
    let c = this.current;
    if (!c || c.buf.length - c.used < n) {
      if (c) this.seal(c);
      c = this.current = { buf: this.pool.take(), used: 0, refs: 0, sealed: false };
    }
    const out = c.buf.subarray(c.used, c.used + n);
    data.copy(out);
    c.used += n;
    c.refs++;
    return { data: out, chunk: c };
  }

  /**
   * Copies of the ops (data in staging memory; zero ops as they are), and the chunks to give to
   * releaseAll() once the copies are no longer used.
   */
  stage(ops: readonly WriteOp[]): { ops: WriteOp[]; chunks: StagingChunk[] } {
    const chunks: StagingChunk[] = [];
    const out = ops.map((op): WriteOp => {
      if (!op.data) return { offset: op.offset, length: op.length, data: null };
      const { data, chunk } = this.copy(op.data.subarray(0, op.length));
      if (chunk) chunks.push(chunk);
      return { offset: op.offset, length: op.length, data };
    });
    return { ops: out, chunks };
  }

  releaseAll(chunks: readonly StagingChunk[]): void {
    for (const c of chunks) this.release(c);
  }

  /** The copy placed in this chunk is no longer used by anyone (each copy released once). */
  release(c: StagingChunk): void {
    if (c.refs <= 0) throw new Error('staging chunk released more often than written');
    c.refs--;
    if (c.refs > 0) return;
    // empty: back to the pool, the current chunk too (an idle store holds no staging memory)
    if (c === this.current) this.current = null;
    c.sealed = true;
    this.pool.give(c.buf);
  }

  /** No more placements (a closing store): chunks go back to the pool as their copies are released. */
  close(): void {
    if (this.current) this.seal(this.current);
    this.current = null;
  }

  private seal(c: StagingChunk): void {
    c.sealed = true;
    if (c.refs === 0) this.pool.give(c.buf);
  }
}
