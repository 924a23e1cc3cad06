/**
 * The target side's seam: where the process server keeps replica disks and their
 * recovery points. The server, its sessions, failover and the API talk to replicas
 * only through these two interfaces; how a backend lays them out (files with a WAL
 * and undo journals, page blobs with snapshots) is private to it.
 *
 *   ReplicaBackend  one per server (chosen by --store): opens, lists, stats and removes
 *                   the replicas of disks; materialises, prunes and promotes points
 *   ReplicaStore    one per open disk (one session at a time holds it): durable batch
 *                   writes, reads, page digests, passes, and the capture of a point
 *
 * Implementations: local/local-backend.ts (files), azure/azure-backend.ts (page blobs).
 * Conformance: test/target/conformance.ts runs against every backend.
 */
import type { MobilityError } from '../errors.js';

/** A whole-range write; data null means all zeros. */
export interface WriteOp { offset: number; length: number; data: Buffer | null }

/** What a backend records for one disk's replica, readable without opening it. */
export interface ReplicaStat {
  agentId: string;
  diskId: string;
  sizeBytes: number;
  /** Changes whenever the replica's content stops being the continuation of the previous one. */
  generation: string;
  initialComplete: boolean;
  /** Every write up to this sequence is durable (may lag behind what was acknowledged; never ahead). */
  lastDurableSeq: number;
  /** Bytes the replica and its point data occupy in the backend (allocated blocks, stored pages); null while not known yet. */
  storedBytes: number | null;
  updatedAt: string;
}

/**
 * What the catalog records per disk of a point so the backend can find the point again
 * (e.g. a blob snapshot's timestamp). Opaque to everyone else; {} when the backend needs nothing.
 */
export type PointRef = Record<string, string>;

/** One disk of one recovery point, as the catalog holds it. */
export interface DiskPoint { pointId: string; seq: number; sizeBytes: number; ref: PointRef }

export interface OpenOptions {
  /** A verify session: never created, grown or written (MOB_ERR_UNKNOWN_DISK when absent). */
  readOnly?: boolean;
  /**
   * false: a new replica stays invisible (not listed, not stat-able) until publish(); discard()
   * or close() drops it without a trace. Default true.
   */
  publish?: boolean;
  /** The newest point of the catalog that includes the disk (its data must stay reconstructable). */
  epoch?: string | null;
}

export interface ReplicaStore {
  readonly agentId: string;
  readonly diskId: string;
  readonly generation: string;
  readonly sizeBytes: number;
  readonly initialComplete: boolean;
  /** Highest sequence whose writes are all durable. */
  readonly lastDurableSeq: number;
  /** True for a new replica opened with publish: false, until publish() or discard(). */
  readonly unpublished: boolean;
  /** The error that stopped this store (a failed batch), or null. Once set, every submit rejects. */
  readonly failure: MobilityError | null;
  /** Bytes this store has written to the replica itself (image file, page blob) since it was opened, when it counts them (metrics). */
  readonly bytesWritten?: number;
  /**
   * How the changed pages of a patched block are written: runs of changed pages at most this many
   * bytes apart become one write (the unchanged pages between rewritten as the store holds them).
   * 0: every run of changed pages is a write of its own (fewest bytes: a local disk, where WAL,
   * replica and undo each pay for every byte). Infinity: one write from the first to the last
   * changed page (fewest requests: a remote store billed per call). Default 0.
   */
  readonly patchGapBytes?: number;

  /** Current content of a range, including accepted writes not yet applied. MOB_ERR_OUT_OF_RANGE past the end. */
  read(offset: number, length: number): Promise<Buffer>;
  /**
   * Queues writes tagged with seq; resolves only once they, and everything submitted before,
   * are durable in the backend (an ack may follow). Rejects with a coded error (MOB_ERR_OUT_OF_RANGE
   * synchronously-checked, MOB_ERR_NO_SPACE / MOB_ERR_STORAGE / MOB_ERR_TARGET_UNAVAILABLE ...);
   * after a failure the store is unusable.
   */
  submit(ops: WriteOp[], seq: number): Promise<void>;
  /** Resolves when every submitted write has been made durable (or failed). */
  whenApplied(): Promise<void>;
  /** xxh64 of each page in [firstPage, firstPage+count), 8 bytes LE each; the last page may be short. */
  pageDigests(firstPage: number, count: number, pageSize: number): Promise<Buffer>;
  /** Records a finished pass durably; 'initial' and 'resync' make the replica complete. */
  endPass(kind: string, seq: number): Promise<void>;
  /**
   * Captures the replica as it is now (every submitted write applied) as point `pointId`, before
   * the catalog records it. Returns what the catalog must keep to find the point again.
   */
  preparePoint(pointId: string): Promise<PointRef>;
  /** The catalog now holds the point: keep it reconstructable from here on. Idempotent. */
  commitPoint(pointId: string): Promise<void>;
  /** Makes a new replica opened with publish: false visible. No-op otherwise. */
  publish(): Promise<void>;
  /** Drops a new replica that was never published: nothing of it remains. No-op otherwise. */
  discard(): Promise<void>;
  /** Waits for queued writes, persists what it keeps (best effort when failed) and closes. */
  close(): Promise<void>;
}

/** Why an image of a point is made: it decides where the image lives and how long. */
export type ImagePurpose = 'test-failover' | 'failover';

/** A writable image of one disk of a point, made by the backend (test failover, failover). */
export interface PointImage {
  agentId: string;
  diskId: string;
  pointId: string;
  purpose: ImagePurpose;
  sizeBytes: number;
  /** Where the image lives: a local path, or a blob URL without credentials. */
  location: string;
  /** A local file holding the image, when the backend keeps it as one (null for cloud images until downloaded). */
  localPath: string | null;
  /** How it was made (reflink, copy, snapshot-copy) and what it cost. */
  method: string;
  ms: number;
  /** Undo records written back (local backend), 0 elsewhere. */
  undoRecords: number;
}

/** A promoted image opened for reading (a reprotect session reads what it must pull back). */
export interface ImageReader {
  readonly sizeBytes: number;
  read(firstPage: number, count: number, pageSize: number): Promise<Buffer>;
  pageDigests(firstPage: number, count: number, pageSize: number): Promise<Buffer>;
  close(): Promise<void>;
}

/** Requests a backend made to its storage service, for backends that count them (metrics). */
export interface TargetOpStats {
  /** Requests sent, per operation (a retried call counts each try). */
  readonly calls: Readonly<Record<string, number>>;
  readonly bytesUploaded: number;
  readonly bytesDownloaded: number;
  /** Tries that failed transiently and were retried. */
  readonly retries: number;
}

/** Progress of a long transfer (downloads). */
export type ProgressFn = (doneBytes: number, totalBytes: number) => void;

export interface ReplicaBackend {
  /** 'file', 'azure', ... */
  readonly kind: string;
  /** Where replicas live, safe to log and show (never a credential). */
  readonly location: string;
  /** Requests made to the storage service so far, when the backend counts them (the azure backend does). */
  readonly stats?: TargetOpStats;

  /** Checks the backend is reachable and usable (credentials, container); coded error naming the fix. */
  init(): Promise<void>;
  /** Refuses, before anything is created, a disk this backend cannot keep (MOB_ERR_DISK_TOO_LARGE). */
  checkFits(agentId: string, diskId: string, sizeBytes: number): Promise<void>;
  /**
   * Opens (creating if needed, growing if the source grew) the replica of a disk.
   * MOB_ERR_DISK_SIZE_CHANGED when the source shrank, MOB_ERR_UNKNOWN_DISK for a read-only open of
   * a disk without a replica, MOB_ERR_STATE_CORRUPT when what is there cannot be trusted.
   */
  open(agentId: string, diskId: string, sizeBytes: number, opts?: OpenOptions): Promise<{ store: ReplicaStore; created: boolean }>;
  /** Agents with at least one published replica, sorted. */
  agents(): Promise<string[]>;
  /** Disks of an agent with a published replica, sorted. */
  disks(agentId: string): Promise<string[]>;
  /** What is recorded for a replica, or null when there is none. */
  stat(agentId: string, diskId: string): Promise<ReplicaStat | null>;
  /** Deletes a disk's replica and every point's data of it. Idempotent. */
  remove(agentId: string, diskId: string): Promise<void>;

  /** Forgets the point data of a disk for a point the catalog no longer holds. Idempotent. */
  prunePoint(agentId: string, diskId: string, point: DiskPoint): Promise<void>;
  /** Deletes point data of a disk that none of `keep` names (left by a prune or a crash cut short). */
  removeOrphans(agentId: string, diskId: string, keep: DiskPoint[]): Promise<string[]>;
  /**
   * Makes a writable image of `point` of a disk while replication goes on. `epochs` returns the
   * points from `point` on that include the disk (oldest first); it is called after the copy
   * (a cut may have been recorded meanwhile).
   */
  materialize(agentId: string, diskId: string, point: DiskPoint, epochs: () => Promise<DiskPoint[]>, purpose: ImagePurpose): Promise<PointImage>;
  /** Writes an image as a local sparse file (nothing to download for a local image: a sparse copy). */
  download(image: PointImage, outFile: string, progress?: ProgressFn): Promise<{ bytes: number; ms: number }>;
  /** Images of an agent this backend holds (purpose given: only those). */
  images(agentId: string, purpose?: ImagePurpose): Promise<PointImage[]>;
  /** Deletes an image. Idempotent. */
  removeImage(image: PointImage): Promise<void>;
  /** Opens a promoted image for reading (reprotect). */
  openImage(image: PointImage): Promise<ImageReader>;
  /** Failback: the promoted image becomes the disk's replica under a new generation; its points' data goes. */
  adopt(image: PointImage): Promise<void>;
  /** Releases clients and handles. */
  close(): Promise<void>;
}
