/**
 * Group commit for replica stores: submitted writes queue up while earlier ones are being made
 * durable, and go out together as the next batch. Shared by the local and the Azure store.
 *
 *   submit(ops, seq)   resolves once these writes and every write submitted before them are
 *                      durable (in submission order, whatever order batches finish in)
 *   whenIdle()         resolves once nothing is queued or in flight (also after a failure, once
 *                      every batch in flight has settled: nothing of this store writes after it)
 *   failure            the coded error that stopped the store, or null
 *
 * Batches in flight: one by default (the next batch is formed when the previous one is durable).
 * A store whose batches are many independent requests (Azure) may allow several at once, to keep
 * its requests flowing while a batch's last ones finish: a batch is then only dispatched when its
 * footprint (the byte ranges it touches, as the store extends them) is disjoint from that of every
 * batch in flight, so two batches never write the same bytes at the same time and a later write
 * never lands before an earlier one to the same place. A queue that overlaps a batch in flight
 * waits for it.
 *
 * After a failure (a batch that failed, or a committed hook that threw): nothing more is
 * dispatched; every queued write, the failed batch and every batch after it in submission order
 * are rejected with the store's coded error (one in flight once it settled: its requests may
 * still land, harmlessly, as the agent resends what was not acknowledged), and so is every later
 * submit. A batch before the failing one in submission order that completes is still
 * acknowledged: what it wrote is durable. A batch whose committed hook threw is acknowledged too
 * (it is durable); the ones after it are not.
 */
import type { MobilityError } from '../errors.js';
import type { WriteOp } from './replica-store.js';

/** [start, end) byte spans, sorted and disjoint. */
export type Footprint = [number, number][];

export interface Batch {
  /** Every op of the batch, in submission order (a later op to the same bytes wins). */
  readonly ops: WriteOp[];
  /** The submits of the batch, in order. */
  readonly parts: readonly { ops: WriteOp[]; seq: number }[];
  /** Highest sequence number of the batch. */
  readonly maxSeq: number;
}

export interface GroupCommitHooks {
  /** Makes a batch durable; a throw stops the store. */
  apply(batch: Batch): Promise<void>;
  /**
   * Called in submission order for each batch that is durable, with every earlier one, before its
   * submits resolve. A promise returned holds back the next dispatch until it settles; a throw
   * stops the store (the batch itself is still acknowledged).
   */
  committed?(batch: Batch): void | Promise<void>;
  /** The store's coded error for what apply (or committed) threw. */
  failed(err: unknown): MobilityError;
  /** Called once, when the store stops. */
  stopped?(err: MobilityError): void;
  /** Batches in flight at once (default 1). Above 1, footprint is required. */
  maxInFlight?: number;
  /** The byte spans a batch's ops touch (sorted, disjoint), as far as the store's writes reach. */
  footprint?(ops: WriteOp[]): Footprint;
  /**
   * While a batch is in flight, the queue goes out as another one only once it holds this many
   * bytes (default 0): small batches in a row would split writes the store could coalesce.
   */
  minBytesWhileBusy?: number;
  /**
   * A queue of at least minBytes but less than fullBytes (the writes of a pass streaming in, frame
   * by frame) waits up to ms for more before it goes out, so that it goes out in fewer, larger
   * requests. Smaller queues (continuous protection) go at once; whenIdle() sends at once.
   */
  linger?: { minBytes: number; fullBytes: number; ms: number };
}

interface Entry { ops: WriteOp[]; seq: number; resolve: () => void; reject: (e: unknown) => void }

interface Flight extends Batch {
  entries: Entry[];
  footprint: Footprint | null;
  settled: boolean;
  error: unknown;
}

export class GroupCommit {
  private queue: Entry[] = [];
  private queuedBytes = 0;
  private fpMemo: { len: number; fp: Footprint } | null = null;
  /** The linger of the current queue: its timer, and whether it ended. */
  private lingerTimer: NodeJS.Timeout | null = null;
  private lingered = false;
  private flights: Flight[] = [];
  private failed: MobilityError | null = null;
  /** Set while a committed hook holds back dispatch. */
  private holding = false;
  private idleWaiters: (() => void)[] = [];
  private readonly maxInFlight: number;

  constructor(private readonly hooks: GroupCommitHooks) {
    this.maxInFlight = Math.max(1, hooks.maxInFlight ?? 1);
    if (this.maxInFlight > 1 && !hooks.footprint) throw new Error('GroupCommit: several batches in flight need a footprint');
  }

  get failure(): MobilityError | null { return this.failed; }

  /** True while something is queued or in flight. */
  get busy(): boolean { return this.queue.length > 0 || this.flights.length > 0 || this.holding; }

  submit(ops: WriteOp[], seq: number): Promise<void> {
    if (this.failed) return Promise.reject(this.failed);
    for (const op of ops) this.queuedBytes += op.length;
    return new Promise<void>((resolve, reject) => {
      this.queue.push({ ops, seq, resolve, reject });
      this.pump();
    });
  }

  whenIdle(): Promise<void> {
    if (!this.busy) return Promise.resolve();
    const p = new Promise<void>((r) => this.idleWaiters.push(r));
    this.sendNow();
    return p;
  }

  /** Ends a linger: the queue goes out as soon as it may. */
  private sendNow(): void {
    if (this.lingerTimer) {
      clearTimeout(this.lingerTimer);
      this.lingerTimer = null;
    }
    this.lingered = true;
    this.pump();
  }

  private stop(err: unknown): void {
    if (this.failed) return;
    this.failed = this.hooks.failed(err);
    for (const e of this.queue) e.reject(this.failed);
    this.queue = [];
    this.queuedBytes = 0;
    if (this.lingerTimer) clearTimeout(this.lingerTimer);
    this.lingerTimer = null;
    this.hooks.stopped?.(this.failed);
  }

  private pump(): void {
    while (!this.failed && !this.holding && this.queue.length && this.flights.length < this.maxInFlight) {
      if (this.flights.length && this.queuedBytes < (this.hooks.minBytesWhileBusy ?? 0)) break;
      const l = this.hooks.linger;
      if (l && !this.lingered && this.queuedBytes >= l.minBytes && this.queuedBytes < l.fullBytes) {
        this.lingerTimer ??= setTimeout(() => { this.lingerTimer = null; this.sendNow(); }, l.ms);
        break;
      }
      if (this.lingerTimer) {
        clearTimeout(this.lingerTimer);
        this.lingerTimer = null;
      }
      this.lingered = false;
      const allOps = () => (this.queue.length === 1 ? this.queue[0].ops : this.queue.flatMap((e) => e.ops));
      let fp: Footprint | null = null;
      if (this.maxInFlight > 1) {
        // computed once per queue length: a queue held back by an overlap is not re-scanned per pump
        if (this.fpMemo?.len !== this.queue.length) this.fpMemo = { len: this.queue.length, fp: this.hooks.footprint!(allOps()) };
        fp = this.fpMemo.fp;
        if (this.flights.some((f) => overlaps(f.footprint!, fp!))) break; // waits for the batch it overlaps
      }
      const ops = allOps();
      const entries = this.queue;
      this.queue = [];
      this.queuedBytes = 0;
      this.fpMemo = null;
      const f: Flight = {
        ops, entries, parts: entries, maxSeq: entries.reduce((m, e) => Math.max(m, e.seq), 0),
        footprint: fp, settled: false, error: undefined,
      };
      this.flights.push(f);
      let applying: Promise<void>;
      try {
        applying = this.hooks.apply(f);
      } catch (err) {
        applying = Promise.reject(err);
      }
      applying.then(() => { f.settled = true; }, (err: unknown) => {
        f.settled = true;
        f.error = err ?? new Error('batch failed');
        this.stop(f.error); // nothing more is dispatched; earlier batches may still be acknowledged
      })
        .finally(() => this.settleHead());
    }
    this.notifyIdle();
  }

  /** Acknowledges (or rejects) the settled batches at the head, in submission order, then dispatches more. */
  private settleHead(): void {
    while (!this.holding && this.flights.length && this.flights[0].settled) {
      const f = this.flights.shift()!;
      if (f.error !== undefined) this.failedInOrder = true;
      if (this.failedInOrder) {
        for (const e of f.entries) e.reject(this.failed);
        continue;
      }
      // durable, and so is every batch before it
      let held: void | Promise<void> = undefined;
      try {
        held = this.hooks.committed?.(f);
      } catch (err) {
        this.stop(err);
        this.failedInOrder = true; // batches after this one are not acknowledged
      }
      for (const e of f.entries) e.resolve();
      if (held instanceof Promise) {
        this.holding = true;
        held.catch((err: unknown) => { this.stop(err); this.failedInOrder = true; }).finally(() => {
          this.holding = false;
          this.settleHead();
        });
        return;
      }
    }
    this.pump();
  }

  /** A batch failed (or the store stopped) at or before the head: later flights are not acknowledged. */
  private failedInOrder = false;

  private notifyIdle(): void {
    if (this.busy) return;
    const w = this.idleWaiters;
    this.idleWaiters = [];
    for (const f of w) f();
  }
}

/** True when two footprints share a byte. */
export function overlaps(a: Footprint, b: Footprint): boolean {
  let i = 0;
  let j = 0;
  while (i < a.length && j < b.length) {
    if (a[i][1] <= b[j][0]) i++;
    else if (b[j][1] <= a[i][0]) j++;
    else return true;
  }
  return false;
}

/** The spans of `ops` with each end rounded out to `align` bytes, sorted and merged. */
export function footprintOf(ops: WriteOp[], align = 1): Footprint {
  const spans: [number, number][] = [];
  for (const op of ops) {
    if (op.length <= 0) continue;
    spans.push([Math.floor(op.offset / align) * align, Math.ceil((op.offset + op.length) / align) * align]);
  }
  spans.sort((x, y) => x[0] - y[0]);
  const out: Footprint = [];
  for (const s of spans) {
    const last = out[out.length - 1];
    if (last && s[0] <= last[1]) last[1] = Math.max(last[1], s[1]);
    else out.push(s);
  }
  return out;
}
