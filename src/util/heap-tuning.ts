/**
 * V8 heap sizing for the process server, which streams disk data.
 *
 * After each full collection V8 sets the next one's trigger a small factor above what survived.
 * The server keeps a small heap (10-20 MiB: code and state) but moves hundreds of MiB/s through
 * short-lived off-heap buffers (TLS records, WebSocket messages, request bodies), and V8 counts
 * every ArrayBuffer as external memory against that trigger: with the default factor a 2 GiB
 * initial sync ran 50-90 full collections in the server. Measured (2 GiB initial sync, server
 * process, growing percent 400): to local files 65-72 -> 4 full collections, CPU 7.2 -> 5.3 s,
 * wall time 8.5 -> 6.7 s; to Azure (Azurite) 24-50 -> 3-6, CPU 6.8-8.2 -> 5.3-5.9 s; peak RSS
 * within +10 MiB (what dies is mostly young). 200 did not help the local-file case.
 *
 * The factor applies only while the heap that survives a full collection stays small (up to
 * HEAP_TUNING_MAX_LIVE_BYTES): a server whose live state grows (many agents) gets V8's own,
 * memory-aware factors back from the next collection on (the check runs after each full
 * collection, so a heap that jumps past the bound gets one more five-fold limit first). The agent
 * keeps V8's defaults (about 0.2 CPU-s gained in a 2 GiB sync: not worth the memory on a
 * protected machine). MOBILITY_HEAP_GROWING_PERCENT overrides the value (0 = V8's default).
 * The flag is read at each collection, so setting it at run time takes effect.
 */
import v8 from 'node:v8';
import { PerformanceObserver, constants, type PerformanceEntry } from 'node:perf_hooks';
import { MobilityError } from '../errors.js';

export const HEAP_GROWING_PERCENT = 400;
export const HEAP_TUNING_MAX_LIVE_BYTES = 40 * 1024 * 1024;

let tuned = false;
let observer: PerformanceObserver | null = null;

/** The percent to use: MOBILITY_HEAP_GROWING_PERCENT (0-1000; 0 = leave V8 alone) or the default. */
export function heapGrowingPercent(env: NodeJS.ProcessEnv = process.env): number {
  const v = env.MOBILITY_HEAP_GROWING_PERCENT;
  if (v === undefined || v === '') return HEAP_GROWING_PERCENT;
  const n = Number(v);
  if (!Number.isInteger(n) || n < 0 || n > 1000) {
    throw new MobilityError('MOB_ERR_CONFIG', `MOBILITY_HEAP_GROWING_PERCENT must be an integer from 0 (V8's default) to 1000, got ${JSON.stringify(v)}`);
  }
  return n;
}

/** Whether the tuned factor applies for a heap of this many live bytes after a full collection. */
export function tuningApplies(liveBytes: number): boolean {
  return liveBytes <= HEAP_TUNING_MAX_LIVE_BYTES;
}

export function tuneHeapForStreaming(env: NodeJS.ProcessEnv = process.env): void {
  if (tuned) return;
  const pct = heapGrowingPercent(env);
  tuned = true;
  if (pct === 0) return;
  let on = false;
  const set = (want: boolean) => {
    if (want === on) return;
    v8.setFlagsFromString(`--heap-growing-percent=${want ? pct : 0}`);
    on = want;
  };
  set(true);
  observer = new PerformanceObserver((list) => {
    for (const e of list.getEntries()) {
      if ((e as PerformanceEntry & { detail?: { kind?: number } }).detail?.kind === constants.NODE_PERFORMANCE_GC_MAJOR) set(tuningApplies(v8.getHeapStatistics().used_heap_size));
    }
  });
  observer.observe({ entryTypes: ['gc'] });
}
