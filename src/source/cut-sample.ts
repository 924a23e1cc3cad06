/**
 * Evidence for a recovery point: inside a cut's freeze the agent digests a sample of pages of
 * each disk (a fresh uniform random sample, plus pages written since the previous cut); the
 * server checks them against the replica at the cut's sequence before it records the point.
 *
 * Why both: the random part catches any divergence, whatever its cause (tracking switched off
 * and on again between self-checks, a replica damaged behind the server's back, an apply bug),
 * with probability growing with every cut; the written part checks exactly the pages the cut
 * is about. Cost: one small positional read per sampled page, done while the remainder ships.
 */
import type { DiskSource } from './disk-source.js';
import { digest } from '../protocol/digest.js';

export const DEFAULT_RANDOM_SAMPLES = 64;
export const DEFAULT_WRITTEN_SAMPLES = 64;
/** Written pages remembered between cuts (a reservoir: a uniform sample of everything written). */
const WRITTEN_RESERVOIR = 4096;
/** Pages one written extent contributes at most. */
const EXTENT_PICKS = 64;

/** A uniform sample (reservoir) of the pages written since the last cut. */
export class WrittenPages {
  private pages: number[] = [];
  private seen = 0;

  /**
   * Records the pages of a written byte range. Cost is bounded per call: a huge extent (a
   * discard of a whole disk) contributes a random sample of EXTENT_PICKS of its pages, each
   * standing for its share of the extent (the reservoir stays roughly uniform).
   */
  add(offset: number, length: number, pageSize: number): void {
    const first = Math.floor(offset / pageSize);
    const n = Math.floor((offset + length - 1) / pageSize) - first + 1;
    const picks = Math.min(n, EXTENT_PICKS);
    const weight = n / picks;
    for (let k = 0; k < picks; k++) {
      const p = picks === n ? first + k : first + Math.floor(Math.random() * n);
      this.seen += weight;
      if (this.pages.length < WRITTEN_RESERVOIR) this.pages.push(p);
      else {
        const j = Math.floor(Math.random() * this.seen);
        if (j < WRITTEN_RESERVOIR) this.pages[j] = p;
      }
    }
  }

  get size(): number { return this.pages.length; }
  list(): readonly number[] { return this.pages; }
  clear(): void { this.pages = []; this.seen = 0; }
}

/**
 * Chooses the pages to sample: `random` uniform pages of the disk, up to `written` of the
 * written pages (chosen at random), and every page of `include`; sorted, without duplicates.
 */
export function chooseSamples(o: { totalPages: number; written: readonly number[]; random?: number; writtenBudget?: number; include?: readonly number[] }): number[] {
  const out = new Set<number>();
  const random = Math.min(o.random ?? DEFAULT_RANDOM_SAMPLES, o.totalPages);
  for (let i = 0; i < random; i++) out.add(Math.floor(Math.random() * o.totalPages));
  const w = [...new Set(o.written)].filter((p) => p < o.totalPages);
  const budget = o.writtenBudget ?? DEFAULT_WRITTEN_SAMPLES;
  for (let i = 0; i < budget && w.length; i++) {
    const j = Math.floor(Math.random() * w.length);
    out.add(w[j]!);
    w[j] = w[w.length - 1]!;
    w.pop();
  }
  for (const p of o.include ?? []) if (Number.isSafeInteger(p) && p >= 0 && p < o.totalPages) out.add(p);
  return [...out].sort((a, b) => a - b);
}

/**
 * Reads each page (the last one may be short) and returns their xxh64 digests, 8 bytes LE each,
 * in order. Synchronous small reads: ~128 positional reads of 4 KiB cost a few milliseconds on
 * the calling thread, while a thread-pool round trip each costs more on a busy machine.
 */
/**
 * The same through the thread pool, several reads in flight: for when the freeze has other work
 * to overlap with (a remainder to ship), so the reads cost the freeze nothing.
 */
export async function digestPagesAsync(src: DiskSource, pages: readonly number[], pageSize: number): Promise<Buffer> {
  const out = Buffer.alloc(pages.length * 8);
  let next = 0;
  const worker = async () => {
    const buf = Buffer.allocUnsafe(pageSize);
    while (next < pages.length) {
      const i = next++;
      const off = pages[i]! * pageSize;
      const len = Math.min(pageSize, src.size - off);
      await src.read(buf, off, len);
      out.writeBigUInt64LE(digest(buf.subarray(0, len)), 8 * i);
    }
  };
  await Promise.all(Array.from({ length: Math.min(4, pages.length) }, worker));
  return out;
}

export function digestPages(src: DiskSource, pages: readonly number[], pageSize: number): Buffer {
  const out = Buffer.alloc(pages.length * 8);
  const buf = Buffer.allocUnsafe(pageSize);
  for (const [i, page] of pages.entries()) {
    const off = page * pageSize;
    const len = Math.min(pageSize, src.size - off);
    src.readSync(buf, off, len);
    out.writeBigUInt64LE(digest(buf.subarray(0, len)), 8 * i);
  }
  return out;
}

/**
 * Pages to sample at every cut whatever the draw (a diagnostic, e.g. after a storage incident on
 * the server): MOBILITY_CUT_SAMPLE_INCLUDE="disk:page,page;disk2:page".
 */
export function includeFromEnv(diskId: string, env = process.env.MOBILITY_CUT_SAMPLE_INCLUDE): number[] {
  if (!env) return [];
  for (const part of env.split(';')) {
    const [id, list] = part.split(':');
    if (id === diskId && list) return list.split(',').map(Number).filter((n) => Number.isSafeInteger(n) && n >= 0);
  }
  return [];
}
