/**
 * What status knows of the replicas in the target, even while the target does not answer.
 *
 * Status must keep working when the replica store (Azure storage, say) is down: that is when
 * an operator looks at it. Each call lists the backend afresh (agents, disks, stat), but waits
 * at most `waitMs` for it; when the listing fails or is still running after that, the last
 * successful listing is returned with the reason (`error`), and no second listing is started
 * while one is still hanging (a target that does not answer gets one request at a time from
 * status, not one per poll).
 */
import { MobilityError, toMobilityError } from '../errors.js';
import type { ReplicaBackend, ReplicaStat } from '../target/replica-store.js';

export interface ListingResult {
  stats: ReplicaStat[];
  /** When the returned listing was made (ms since the epoch); null when none ever succeeded. */
  at: number | null;
  /** Why the listing is not fresh: the target's coded error, or that it did not answer in time. */
  error: MobilityError | null;
}

export class ReplicaListing {
  private last: { at: number; stats: ReplicaStat[] } | null = null;
  private pending: { started: number; done: Promise<void> } | null = null;
  private lastError: MobilityError | null = null;

  constructor(private readonly backend: ReplicaBackend, private readonly waitMs = 5000) {}

  private async list(): Promise<ReplicaStat[]> {
    const out: ReplicaStat[] = [];
    for (const agent of await this.backend.agents()) {
      for (const disk of await this.backend.disks(agent)) {
        const st = await this.backend.stat(agent, disk);
        if (st) out.push(st);
      }
    }
    return out;
  }

  private refresh(): Promise<void> {
    const started = Date.now();
    const done = this.list().then(
      (stats) => {
        // a slow earlier listing finishing late must not replace a newer one
        if (!this.last || started >= this.last.at) this.last = { at: started, stats };
        this.lastError = null;
      },
      (err: unknown) => { this.lastError = toMobilityError(err, 'MOB_ERR_STORAGE'); },
    ).finally(() => { if (this.pending?.done === done) this.pending = null; });
    this.pending = { started, done };
    return done;
  }

  /** The outcome of the latest listing, without listing again: when it was made, and why it failed. */
  state(): { at: number | null; error: MobilityError | null } {
    return { at: this.last?.at ?? null, error: this.lastError };
  }

  async get(): Promise<ListingResult> {
    // a listing still hanging from an earlier call: do not pile another on the target
    const hanging = this.pending && Date.now() - this.pending.started >= this.waitMs;
    const done = hanging ? null : this.refresh();
    if (done) {
      let timer: NodeJS.Timeout | undefined;
      const inTime = await Promise.race([
        done.then(() => true),
        new Promise<boolean>((r) => { timer = setTimeout(() => r(false), this.waitMs); }),
      ]);
      clearTimeout(timer);
      if (inTime && !this.lastError && this.last) return { stats: this.last.stats, at: this.last.at, error: null };
    }
    const error = this.lastError ?? new MobilityError('MOB_ERR_TARGET_UNAVAILABLE',
      `the replica store (${this.backend.kind}:${this.backend.location}) did not answer within ${this.waitMs} ms`);
    return { stats: this.last?.stats ?? [], at: this.last?.at ?? null, error };
  }
}
