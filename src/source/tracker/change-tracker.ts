/**
 * The change-tracker seam: what the agent needs from whatever records where a disk was
 * written, so the protector and the dirty journal can work with either backend:
 *
 *   - tracefs (src/source/tracker/tracefs.ts): in-guest, kernel block events in a private
 *     tracefs instance;
 *   - qemu (src/source/tracker/qemu.ts): host mode, QEMU dirty bitmaps over QMP, extents
 *     read over NBD.
 *
 * The shape follows how src/agent/protector.ts and src/source/dirty-journal.ts use the
 * tracefs tracker today: open (resumed or fresh), drain every ~100 ms into the durable
 * journal, a self-check every second and inside every cut, repair when tracking was
 * switched off, close with keep = true at an agent stop so a restart resumes.
 *
 * Methods may answer synchronously (tracefs reads sysfs files) or with a promise (qemu
 * talks QMP and runs nbdinfo): callers always `await` them.
 */

/** disk = index into the disks given to open(); offset and length in bytes from the start of that disk. */
export interface DirtyExtent { disk: number; offset: number; length: number }

/** Whether tracking was lost (writes may be missing from what drain() delivered) and why. */
export type TrackingLoss = { lost: false; reason: null } | { lost: true; reason: string };

export type MaybePromise<T> = T | Promise<T>;

/**
 * Where drain() records what it takes out of the tracker, around every read, so an agent
 * killed between taking changes and recording their extents can recover them. The dirty
 * journal implements it; parseText() on the same tracker turns a recorded `raw` back into
 * extents on replay.
 */
export interface DrainJournal {
  /**
   * Called right before changes leave the tracker (they may be gone from it afterwards).
   * source: set by a tracker that records every change twice (tracefs: an instance and its
   * shadow) to say which copy this read takes from; without it, a read whose result was
   * never recorded means changes were lost.
   */
  beforeRead(source?: DrainSource): void;
  /** Called right after, with the raw record of what was taken (empty for nothing: that copy is empty now). */
  afterRead(raw: Buffer): void;
  /**
   * Copy `name` may hold changes its twin does not (the twin was created after it): a read of
   * `name` cut short cannot be recovered from the twin until `name` has been read empty once.
   * Called by drain() before its first read after open() or repair() created a copy.
   */
  soleHolder?(name: string): void;
}

/**
 * One of two copies of the same change record (tracefs: the instance and its shadow instance,
 * both fed by the same tracepoint). A read takes changes out of one copy only: until they are
 * recorded, the other copy (heldBy) still holds them, as long as it is not read meanwhile.
 */
export interface DrainSource {
  /** This copy's name in the journal: [a-z]+ */
  name: string;
  /** The other copy, which still holds what this read takes. */
  heldBy: string;
}

export interface ChangeTracker {
  /** Stable name of what this tracker set up (trace instance, bitmap prefix): one per agent installation. */
  readonly name: string;
  /**
   * open() found tracking that kept running since the last close({ keep: true }) (agent
   * restart, upgrade): everything written meanwhile will be drained. false: tracking starts
   * now, and what was written before is unknown: the caller resyncs (checksum scan).
   */
  readonly resumed: boolean;
  /**
   * Identity of the underlying recorder (an instance inode, bitmap generations): a recorder
   * removed and recreated under the same name has another one, which a restart compares
   * against what it recorded.
   */
  readonly identity: string;
  /**
   * Takes every change recorded since the last drain and returns its extents, merged and
   * sorted by disk and offset. Changes are consumed: they are not delivered again. Throws a
   * coded MobilityError when the tracker cannot be read (the caller treats it as a loss).
   */
  drain(journal?: DrainJournal): MaybePromise<DirtyExtent[]>;
  /** Extents of a raw record a journal kept (replay after the agent died mid-drain). */
  parseText(text: string): DirtyExtent[];
  /**
   * Is tracking live as open() set it up? null when it is, else what differs, in words an
   * operator can act on. Any difference means writes may be missing: the caller resyncs.
   */
  selfCheck(): MaybePromise<string | null>;
  /** Puts tracking back as open() set it up after selfCheck() found a difference; throws when it cannot. */
  repair(): MaybePromise<void>;
  /**
   * keep = true: leave tracking running for the next open() (agent stop, upgrade);
   * keep = false: tear it down (protection disabled).
   */
  close(o?: { keep?: boolean }): MaybePromise<void>;
}

/** The loss report of a self-check answer. */
export function lossOf(problem: string | null): TrackingLoss {
  return problem === null ? { lost: false, reason: null } : { lost: true, reason: problem };
}

/** Sorts and merges overlapping or adjacent extents of the same disk (the list is sorted in place). */
export function coalesceExtents(list: DirtyExtent[]): DirtyExtent[] {
  if (list.length < 2) return list.map((e) => ({ ...e }));
  list.sort((a, b) => a.disk - b.disk || a.offset - b.offset);
  const out: DirtyExtent[] = [{ ...list[0]! }];
  for (let i = 1; i < list.length; i++) {
    const e = list[i]!;
    const last = out[out.length - 1]!;
    if (e.disk === last.disk && e.offset <= last.offset + last.length) {
      last.length = Math.max(last.length, e.offset + e.length - last.offset);
    } else {
      out.push({ ...e });
    }
  }
  return out;
}
