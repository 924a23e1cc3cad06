/**
 * What status knows of the replicas in the target, even while the target does not answer.
 *
 * Status must keep working when the replica store (Azure storage, say) is down: that is when
 * an operator looks at it. Each call lists the backend afresh (agents, disks, stat), but waits
 * at most `waitMs` for it; when the listing fails or is still running after that, the last
 * successful listing is returned with the reason (`error`), and no second listing is started
 * while one is still hanging (a target that does not answer gets one request at a time from
 * status, not one per poll). A listing that is only slow is not an outage: its disks are shown as
 * last listed, with `pending` set. A disk whose own stat fails (a damaged state, a blob with bad
 * metadata) is listed with its error; the other disks are not affected.
 */
import { MobilityError, toMobilityError } from '../errors.js';
import type { ReplicaBackend, ReplicaStat } from '../target/replica-store.js';

/** One disk of a listing: its stat, or why it could not be read. */
export interface ListedDisk { agentId: string; diskId: string; stat: ReplicaStat | null; error: MobilityError | null }

export interface ListingResult {
  disks: ListedDisk[];
  /** When the returned listing was made (ms since the epoch); null when none ever succeeded. */
  at: number | null;
  /** Why the listing failed: the target's coded error (the disks shown are the last listed). */
  error: MobilityError | null;
  /** The listing is taking longer than the wait: the disks shown are the last listed. */
  pending: boolean;
}

export class ReplicaListing {
  private last: { at: number; disks: ListedDisk[] } | null = null;
  private pending: { started: number; done: Promise<void> } | null = null;
  private lastError: MobilityError | null = null;

  constructor(private readonly backend: ReplicaBackend, private readonly waitMs = 5000) {}

  private async list(): Promise<ListedDisk[]> {
    const out: ListedDisk[] = [];
    for (const agentId of await this.backend.agents()) {
      for (const diskId of await this.backend.disks(agentId)) {
        try {
          const stat = await this.backend.stat(agentId, diskId);
          if (stat) out.push({ agentId, diskId, stat, error: null });
        } catch (err) {
          const e = toMobilityError(err, 'MOB_ERR_STORAGE');
          // the store itself is failing: the whole listing is, not this disk
          if (e.code.startsWith('MOB_ERR_TARGET_')) throw e;
          out.push({ agentId, diskId, stat: null, error: e });
        }
      }
    }
    return out;
  }

  private refresh(): Promise<void> {
    const started = Date.now();
    const done = this.list().then(
      (disks) => {
        // a slow earlier listing finishing late must not replace a newer one
        if (!this.last || started >= this.last.at) this.last = { at: started, disks };
        this.lastError = null;
      },
      (err: unknown) => { this.lastError = toMobilityError(err, 'MOB_ERR_STORAGE'); },
    ).finally(() => { if (this.pending?.done === done) this.pending = null; });
    this.pending = { started, done };
    return done;
  }

  /** The outcome of the latest listing, without listing again: when it was made, and why it failed. */
  state(): { at: number | null; error: MobilityError | null; pending: boolean } {
    return { at: this.last?.at ?? null, error: this.lastError, pending: this.pending !== null };
  }

  /** The replicas, waiting at most `waitMs` (default: the constructor's) for a fresh listing. */
  async get(waitMs = this.waitMs): Promise<ListingResult> {
    // a listing still hanging from an earlier call: do not pile another on the target
    const hanging = this.pending !== null && Date.now() - this.pending.started >= waitMs;
    const done = hanging ? null : this.refresh();
    let inTime = false;
    if (done) {
      let timer: NodeJS.Timeout | undefined;
      inTime = await Promise.race([
        done.then(() => true),
        new Promise<boolean>((r) => { timer = setTimeout(() => r(false), waitMs); }),
      ]);
      clearTimeout(timer);
    }
    return { disks: this.last?.disks ?? [], at: this.last?.at ?? null, error: this.lastError, pending: !inTime && !this.lastError };
  }
}
