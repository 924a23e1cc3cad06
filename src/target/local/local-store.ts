/**
 * ReplicaStore (local filesystem): one sparse replica file per disk, its state
 * file and its write-ahead log, in one directory.
 *
 *   replica.img   sparse, same size as the source disk
 *   state.json    geometry, generation, initial-complete flag, last durable seq (written durably)
 *   wal.log       redo log of block writes not yet checkpointed into replica.img
 *   undo/<P>.undo old bytes of ranges first overwritten after recovery point P
 *                 (the current epoch; see undo-journal.ts)
 *
 * Contract: submit() resolves only once the writes are durable (fdatasync), so
 * an ack may follow. Writes are group-committed: while one commit syncs, the
 * next batch accumulates. Until the initial replication completes there is
 * nothing to protect, so writes go straight to the replica and the replica is
 * synced; afterwards they go through the WAL (sequential log + one fdatasync),
 * are then applied in place, and the replica is synced at checkpoints.
 * Once a recovery point exists (setEpoch), each batch first captures the old
 * bytes of ranges not yet captured in the epoch into the undo journal (durable
 * before the batch's WAL commit), so every point stays reconstructable.
 * One ReplicaStore per disk at a time (the server holds a lock per disk).
 */
import fsp from 'node:fs/promises';
import path from 'node:path';
import { randomUUID } from 'node:crypto';
import { xxh64 } from '@node-rs/xxhash';
import { MobilityError, toMobilityError } from '../../errors.js';
import { WAL_CHECKPOINT_BYTES, READ_CHUNK_BYTES } from '../../constants.js';
import { fsyncDir, writeFileDurable } from '../../util/durable-file.js';
import { Wal, type WalRecord } from './wal.js';
import { isZero, zeroBuffer } from '../../protocol/digest.js';
import { UNDO_UNIT, UndoJournal, type UndoRecord } from './undo-journal.js';
import type { PointRef, ReplicaStore, WriteOp } from '../replica-store.js';
import { GroupCommit, type Batch } from '../group-commit.js';
import { StagingArena, type StagingChunk } from '../staging.js';
import { WriteOverlay, overlayInto, resolveOverlaps } from '../overlay.js';

/** Zero ranges up to this size are checked for already-zero content in one reused buffer. */
const ZERO_CHECK_SCRATCH = 1024 * 1024;

export interface ReplicaState {
  version: 1;
  agentId: string;
  diskId: string;
  sizeBytes: number;
  generation: string;
  initialComplete: boolean;
  lastDurableSeq: number;
  passes: number;
  createdAt: string;
  updatedAt: string;
  lastPass: { kind: string; seq: number; at: string } | null;
}

export type { WriteOp };

export class LocalReplicaStore implements ReplicaStore {
  /** Batches one at a time: WAL (and undo) records, then the image (see ../group-commit.ts). */
  private readonly commits: GroupCommit = new GroupCommit({
    apply: (batch) => this.applyBatch(batch),
    committed: (batch) => this.committed(batch),
    failed: (err) => toMobilityError(err, 'MOB_ERR_STORAGE'),
  });
  /** Accepted writes not yet applied, in submission order, so reads see them. */
  private readonly overlay = new WriteOverlay();
  /** The overlay ids of each submit's ops. */
  private readonly overlayIds = new WeakMap<WriteOp[], number[]>();
  private zeroScratch: Buffer | null = null;
  /** Where each submit's data was copied, released when its batch is durable. */
  private readonly stagedIn = new WeakMap<WriteOp[], StagingChunk[]>();
  private readonly staging = new StagingArena();
  private undo: UndoJournal | null = null;
  private epochId: string | null = null;
  bytesWritten = 0;
  undoBytesWritten = 0;

  /** Set while a new replica lives in its temporary sibling directory (not yet published). */
  private pending: PendingCreation | null = null;
  private discarded = false;
  /** Batches applied, and how many of them the last checkpoint covers: close() skips a checkpoint with nothing new. */
  private appliedBatches = 0;
  private checkpointedBatches = 0;

  private constructor(
    private dirPath: string,
    private state: ReplicaState,
    private readonly replica: fsp.FileHandle,
    private readonly wal: Wal,
    /** Opened for a verify session: never created, grown or checkpointed. */
    readonly readOnly: boolean,
  ) {}

  /** The replica's directory (its temporary sibling until a new replica is published). */
  get dir(): string { return this.dirPath; }
  /** True for a new replica opened with publish: false, until publish() or discard(). */
  get unpublished(): boolean { return this.pending !== null; }
  get agentId(): string { return this.state.agentId; }
  get diskId(): string { return this.state.diskId; }
  get generation(): string { return this.state.generation; }
  get sizeBytes(): number { return this.state.sizeBytes; }
  get initialComplete(): boolean { return this.state.initialComplete; }
  get lastDurableSeq(): number { return this.state.lastDurableSeq; }
  get snapshot(): Readonly<ReplicaState> { return { ...this.state }; }
  get replicaPath(): string { return path.join(this.dir, 'replica.img'); }

  /**
   * Opens (creating if needed) the replica of a disk and replays its WAL.
   * Throws MOB_ERR_DISK_SIZE_CHANGED when the source is smaller than the replica,
   * MOB_ERR_STATE_CORRUPT when state.json is unreadable or a replica.img holding data has
   * no state.json, MOB_ERR_DISK_TOO_LARGE when the filesystem cannot hold a file of that size,
   * MOB_ERR_UNKNOWN_DISK for a read-only open of a disk without a replica (nothing is created).
   *
   * A new replica is created atomically: in a temporary sibling directory, with state.json
   * written durably, then renamed into place (and the parent fsynced), so a failure or a crash
   * never leaves a half-created replica behind its disk id. With `publish: false` the rename
   * is left to the caller (publish(), or discard() to drop it), so a session refused after
   * some of its disks were opened creates nothing.
   */
  static async open(dir: string, agentId: string, diskId: string, sizeBytes: number, opts: { readOnly?: boolean; epoch?: string | null; publish?: boolean } = {}): Promise<{ store: LocalReplicaStore; created: boolean }> {
    const stateFile = path.join(dir, 'state.json');
    let state: ReplicaState | null = null;
    try {
      state = JSON.parse(await fsp.readFile(stateFile, 'utf8')) as ReplicaState;
      if (state === null || typeof state !== 'object' || state.version !== 1 || typeof state.generation !== 'string' || typeof state.sizeBytes !== 'number') {
        throw new Error('unsupported state version');
      }
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code !== 'ENOENT' && code !== 'ENOTDIR') {
        throw new MobilityError('MOB_ERR_STATE_CORRUPT', `replica state ${stateFile} is unreadable: ${(err as Error).message}`);
      }
      state = null;
    }
    if (state === null && opts.readOnly) {
      throw new MobilityError('MOB_ERR_UNKNOWN_DISK', `disk ${diskId} of agent ${agentId} has no replica on this server`);
    }
    if (state === null) return LocalReplicaStore.create(dir, agentId, diskId, sizeBytes, opts);
    if (sizeBytes < state.sizeBytes && !opts.readOnly) {
      throw new MobilityError('MOB_ERR_DISK_SIZE_CHANGED', `source disk ${diskId} is ${sizeBytes} bytes but its replica is ${state.sizeBytes}; shrinking a protected disk is not supported (remove the replica directory on the server to start over)`);
    }
    if (!opts.readOnly && !swept.has(path.dirname(dir))) await sweepStale(path.dirname(dir));
    let replica: fsp.FileHandle;
    try {
      replica = await fsp.open(path.join(dir, 'replica.img'), 'r+');
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') {
        throw new MobilityError('MOB_ERR_STATE_CORRUPT', `replica ${path.join(dir, 'replica.img')} is missing although its state.json exists (restore it, or remove the directory to start over)`);
      }
      throw toMobilityError(err, 'MOB_ERR_STORAGE');
    }
    let wal: Wal;
    try {
      wal = await Wal.open(path.join(dir, 'wal.log'));
    } catch (err) {
      await replica.close().catch(() => undefined);
      throw toMobilityError(err, 'MOB_ERR_STORAGE');
    }
    const store = new LocalReplicaStore(dir, state, replica, wal, opts.readOnly ?? false);
    try {
      if (!opts.readOnly && sizeBytes > state.sizeBytes) {
        await growFile(replica, sizeBytes); // sparse: holes read as zeros
        state.sizeBytes = sizeBytes;
        await replica.sync();
        await store.saveState();
      }
      await store.recover();
      if (opts.epoch && !opts.readOnly) await store.setEpoch(opts.epoch);
    } catch (err) {
      await store.closeHandles();
      throw err;
    }
    return { store, created: false };
  }

  /** Creates a new replica in a temporary sibling directory; publishes it unless told not to. */
  private static async create(dir: string, agentId: string, diskId: string, sizeBytes: number, opts: { epoch?: string | null; publish?: boolean }): Promise<{ store: LocalReplicaStore; created: boolean }> {
    const parent = path.dirname(dir);
    const base = path.basename(dir);
    const leftover = await inspectLeftover(dir);
    const made = await fsp.mkdir(parent, { recursive: true, mode: 0o700 });
    await sweepStale(parent);
    const tmp = path.join(parent, `.${base}~new-${process.pid}-${randomUUID().slice(0, 8)}`);
    liveTemps.add(tmp);
    let replica: fsp.FileHandle | null = null;
    let wal: Wal | null = null;
    try {
      // recursive: recreates the parent should a refused session of the same agent remove it meanwhile
      await fsp.mkdir(tmp, { recursive: true, mode: 0o700 });
      replica = await fsp.open(path.join(tmp, 'replica.img'), 'wx+', 0o600);
      wal = await Wal.open(path.join(tmp, 'wal.log'));
      await growFile(replica, sizeBytes); // sparse: holes read as zeros
      await replica.sync();
      const now = new Date().toISOString();
      const state: ReplicaState = {
        version: 1, agentId, diskId, sizeBytes, generation: randomUUID(), initialComplete: false,
        lastDurableSeq: 0, passes: 0, createdAt: now, updatedAt: now, lastPass: null,
      };
      const store = new LocalReplicaStore(tmp, state, replica, wal, false);
      await store.saveState();
      store.pending = { target: dir, leftover, madeParents: made ?? null, epoch: opts.epoch ?? null };
      if (opts.publish !== false) await store.publish();
      return { store, created: true };
    } catch (err) {
      await replica?.close().catch(() => undefined);
      await wal?.close().catch(() => undefined);
      await fsp.rm(tmp, { recursive: true, force: true }).catch(() => undefined);
      liveTemps.delete(tmp);
      await removeEmptyParents(parent, made ?? null);
      throw toMobilityError(err, 'MOB_ERR_STORAGE');
    }
  }

  /**
   * Moves a new replica from its temporary directory into place (replacing a leftover directory
   * that holds no data), fsyncs the parent, then starts the undo epoch if a point names the disk.
   */
  async publish(): Promise<void> {
    const p = this.pending;
    if (!p) return;
    const parent = path.dirname(p.target);
    let aside: string | null = null;
    if (p.leftover) {
      aside = path.join(parent, `.${path.basename(p.target)}~old-${process.pid}-${randomUUID().slice(0, 8)}`);
      liveTemps.add(aside);
      await fsp.rename(p.target, aside);
    }
    try {
      await fsp.rename(this.dirPath, p.target);
    } catch (err) {
      if (aside) await fsp.rename(aside, p.target).then(() => liveTemps.delete(aside!), () => undefined);
      throw err;
    }
    await fsyncDir(parent);
    liveTemps.delete(this.dirPath);
    this.dirPath = p.target;
    this.pending = null;
    if (aside) {
      await fsp.rm(aside, { recursive: true, force: true }).catch(() => undefined);
      liveTemps.delete(aside);
    }
    if (p.epoch) await this.setEpoch(p.epoch);
  }

  /** Drops a new replica that was never published: nothing of it remains. No-op otherwise. */
  async discard(): Promise<void> {
    const p = this.pending;
    if (!p || this.discarded) return;
    this.discarded = true;
    this.staging.close();
    await this.closeHandles();
    await fsp.rm(this.dirPath, { recursive: true, force: true }).catch(() => undefined);
    liveTemps.delete(this.dirPath);
    this.pending = null;
    await removeEmptyParents(path.dirname(p.target), p.madeParents);
  }

  /** The recovery point whose undo epoch is current (null before the first point). */
  get epoch(): string | null { return this.epochId; }
  get undoDir(): string { return path.join(this.dir, 'undo'); }

  /**
   * Starts capturing old bytes for point `id`: called after the point is in the catalog,
   * with no batch in progress (the caller awaited whenApplied()). Idempotent.
   */
  async setEpoch(id: string): Promise<void> {
    if (this.epochId === id) return;
    await this.whenApplied();
    await fsp.mkdir(this.undoDir, { recursive: true, mode: 0o700 });
    const next = await UndoJournal.open(path.join(this.undoDir, `${id}.undo`));
    const prev = this.undo;
    this.undo = next;
    this.epochId = id;
    await prev?.close().catch(() => undefined);
  }

  /** The replica as it is now is the point: the undo journal of the epoch it starts keeps it reconstructable. */
  async preparePoint(_pointId: string): Promise<PointRef> {
    await this.whenApplied();
    if (this.commits.failure) throw this.commits.failure;
    return {};
  }

  /** The catalog holds the point: its undo epoch starts (old bytes are captured from now on). */
  async commitPoint(pointId: string): Promise<void> {
    await this.setEpoch(pointId);
  }

  /**
   * Old bytes of the ops' ranges not yet captured in this epoch (first overwrite only), in whole
   * 4 KiB units: a unit is marked captured as a whole, so a write covering part of it (a span of
   * 512-byte pages) captures all of it, or the rest of the unit's old bytes would be lost.
   */
  private async captureUndo(ops: WriteOp[]): Promise<UndoRecord[]> {
    if (!this.undo || !this.state.initialComplete) return [];
    const recs: UndoRecord[] = [];
    const seen = new Set<number>();
    const captured = this.undo.captured;
    const size = this.state.sizeBytes;
    const take = async (start: number, end: number) => {
      end = Math.min(end, size);
      if (end <= start) return;
      const old = Buffer.allocUnsafe(end - start);
      const { bytesRead } = await this.replica.read(old, 0, old.length, start);
      if (bytesRead < old.length) old.fill(0, bytesRead);
      recs.push({ offset: start, length: old.length, data: old });
    };
    for (const op of ops) {
      if (op.length <= 0) continue;
      const last = Math.floor((op.offset + op.length - 1) / UNDO_UNIT);
      let runStart = -1;
      for (let u = Math.floor(op.offset / UNDO_UNIT); u <= last; u++) {
        const fresh = !captured.has(u) && !seen.has(u);
        if (fresh) {
          seen.add(u);
          if (runStart < 0) runStart = u * UNDO_UNIT;
        } else if (runStart >= 0) {
          await take(runStart, u * UNDO_UNIT);
          runStart = -1;
        }
      }
      if (runStart >= 0) await take(runStart, (last + 1) * UNDO_UNIT);
    }
    return recs;
  }

  private async saveState(): Promise<void> {
    this.state.updatedAt = new Date().toISOString();
    await writeFileDurable(path.join(this.dir, 'state.json'), JSON.stringify(this.state, null, 2) + '\n', 0o600);
  }

  /** Replays intact WAL records into the replica, then checkpoints. Idempotent. */
  private async recover(): Promise<void> {
    if (this.wal.bytes === 0) return;
    const { records, validBytes, lastCommitSeq } = await this.wal.readAll();
    for (const r of records) await this.writeRange(r.offset, r.length, r.data);
    if (lastCommitSeq > this.state.lastDurableSeq) this.state.lastDurableSeq = lastCommitSeq;
    if (validBytes !== this.wal.bytes) await this.wal.truncate(validBytes);
    await this.checkpoint();
  }

  /** Writes data (or zeros) at offset. Zero ranges that already read as zero (holes) are left sparse. */
  private async writeRange(offset: number, length: number, data: Buffer | null): Promise<void> {
    if (!data) {
      // batches apply one at a time: one scratch buffer serves every zero range up to its size
      const cur = length <= ZERO_CHECK_SCRATCH ? (this.zeroScratch ??= Buffer.allocUnsafeSlow(ZERO_CHECK_SCRATCH)).subarray(0, length) : Buffer.allocUnsafe(length);
      const { bytesRead } = await this.replica.read(cur, 0, length, offset);
      if (bytesRead === length && isZero(cur)) return;
      data = zeroBuffer(length);
    }
    await this.writeFully([data], offset);
  }

  private async writeFully(bufs: Buffer[], offset: number): Promise<void> {
    let len = 0;
    for (const b of bufs) len += b.length;
    const { bytesWritten } = await this.replica.writev(bufs, offset);
    if (bytesWritten !== len) {
      // rare short write: finish the rest one buffer at a time
      let o = offset;
      for (const b of bufs) {
        let done = 0;
        while (done < b.length) {
          const r = await this.replica.write(b, done, b.length - done, o + done);
          done += r.bytesWritten;
        }
        o += b.length;
      }
    }
    this.bytesWritten += len;
  }

  /**
   * Applies ops to the replica, in submission order where they overlap (a later write wins on
   * the bytes both cover), coalescing contiguous data pieces into one writev.
   */
  private async applyOps(ops: WriteOp[]): Promise<void> {
    let run: Buffer[] = [];
    let runStart = 0;
    let runEnd = 0;
    const flush = async () => {
      if (run.length) await this.writeFully(run, runStart);
      run = [];
    };
    for (const seg of resolveOverlaps(ops)) {
      const len = seg.end - seg.start;
      if (!seg.data) {
        await flush();
        await this.writeRange(seg.start, len, null);
        continue;
      }
      const data = seg.dataOffset === 0 && seg.data.length === len ? seg.data : seg.data.subarray(seg.dataOffset, seg.dataOffset + len);
      if (run.length && seg.start === runEnd && run.length < 512) {
        run.push(data);
        runEnd += len;
      } else {
        await flush();
        run = [data];
        runStart = seg.start;
        runEnd = seg.end;
      }
    }
    await flush();
  }

  private check(offset: number, length: number): void {
    if (!Number.isSafeInteger(offset) || offset < 0 || length < 0 || offset + length > this.state.sizeBytes) {
      throw new MobilityError('MOB_ERR_OUT_OF_RANGE', `range ${offset}+${length} lies beyond the ${this.state.sizeBytes}-byte disk`);
    }
  }

  /**
   * Reads the current content of a range: accepted writes not yet applied (copied out at once,
   * see WriteOverlay.read) over what the replica file holds. A batch being applied meanwhile is
   * still in the overlay, so a half-written range of it is covered.
   */
  async read(offset: number, length: number): Promise<Buffer> {
    this.check(offset, length);
    // a stopped store no longer knows its newest content (rejected writes may be in the overlay)
    if (this.commits.failure) throw this.commits.failure;
    const { whole, pieces } = this.overlay.read(offset, offset + length);
    if (whole) return whole;
    const buf = Buffer.alloc(length);
    if (length) {
      const { bytesRead } = await this.replica.read(buf, 0, length, offset);
      if (bytesRead < length) buf.fill(0, bytesRead);
    }
    for (const p of pieces) overlayInto(buf, offset, p);
    return buf;
  }

  /**
   * Queues writes (already verified by the caller) tagged with seq; resolves when durable.
   * Rejects with MOB_ERR_NO_SPACE / MOB_ERR_STORAGE on I/O failure; the store is then unusable.
   */
  submit(ops: WriteOp[], seq: number): Promise<void> {
    if (this.commits.failure) return Promise.reject(this.commits.failure);
    for (const op of ops) this.check(op.offset, op.length);
    // the data is copied into staging memory at once (see target/staging.ts): the caller's
    // buffers (a whole WebSocket message) are free to die young
    const staged = this.staging.stage(ops);
    this.overlayIds.set(staged.ops, this.overlay.add(staged.ops));
    this.stagedIn.set(staged.ops, staged.chunks);
    return this.commits.submit(staged.ops, seq);
  }

  private async applyBatch(batch: Batch): Promise<void> {
    const ops = batch.ops;
    if (!this.state.initialComplete) {
      await this.applyOps(ops);
      await this.replica.datasync();
      return;
    }
    // old bytes are durable before the redo records commit: a committed write is always revertible
    const undo = await this.captureUndo(ops);
    if (undo.length) {
      await this.undo!.append(undo);
      for (const u of undo) this.undoBytesWritten += u.length;
    }
    const recs: WalRecord[] = [];
    for (const p of batch.parts) for (const op of p.ops) recs.push({ seq: p.seq, offset: op.offset, length: op.length, data: op.data });
    await this.wal.append(recs);
    await this.applyOps(ops);
  }

  /** A batch is durable: it leaves the overlay; past WAL_CHECKPOINT_BYTES a checkpoint runs before the next batch. */
  private committed(batch: Batch): Promise<void> | void {
    this.appliedBatches++;
    // written and synced: nothing reads these copies any more
    for (const p of batch.parts) {
      this.overlay.remove(this.overlayIds.get(p.ops) ?? []);
      this.overlayIds.delete(p.ops);
      this.staging.releaseAll(this.stagedIn.get(p.ops) ?? []);
      this.stagedIn.delete(p.ops);
    }
    if (batch.maxSeq > this.state.lastDurableSeq) this.state.lastDurableSeq = batch.maxSeq;
    if (this.wal.bytes > WAL_CHECKPOINT_BYTES) return this.checkpoint();
  }

  /** The error that stopped this store (a failed batch or checkpoint), or null. */
  get failure(): MobilityError | null { return this.commits.failure; }

  /** Resolves when every submitted write has been committed and applied. */
  whenApplied(): Promise<void> {
    return this.commits.whenIdle();
  }

  /** Syncs the replica, empties the WAL and records the durable sequence. */
  async checkpoint(): Promise<void> {
    const applied = this.appliedBatches;
    await this.replica.datasync();
    if (this.wal.bytes > 0) await this.wal.truncate(0);
    await this.saveState();
    this.checkpointedBatches = applied;
  }

  /** xxh64 of each page in [firstPage, firstPage+count) of the replica, 8 bytes LE each. */
  async pageDigests(firstPage: number, count: number, pageSize: number): Promise<Buffer> {
    const start = firstPage * pageSize;
    const end = Math.min(start + count * pageSize, this.state.sizeBytes);
    if (!Number.isSafeInteger(start) || count < 0 || start > this.state.sizeBytes || (count > 0 && start >= this.state.sizeBytes)) {
      throw new MobilityError('MOB_ERR_OUT_OF_RANGE', `pages ${firstPage}+${count} lie beyond the ${this.state.sizeBytes}-byte disk`);
    }
    await this.whenApplied();
    const n = Math.ceil((end - start) / pageSize);
    const out = Buffer.allocUnsafe(n * 8);
    const chunk = Buffer.allocUnsafe(Math.min(READ_CHUNK_BYTES, Math.max(pageSize, end - start)));
    let page = 0;
    for (let o = start; o < end; o += chunk.length) {
      const len = Math.min(chunk.length, end - o);
      const { bytesRead } = await this.replica.read(chunk, 0, len, o);
      if (bytesRead < len) chunk.fill(0, bytesRead, len);
      for (let p = 0; p < len; p += pageSize) {
        out.writeBigUInt64LE(xxh64(chunk.subarray(p, Math.min(p + pageSize, len))), 8 * page++);
      }
    }
    return out;
  }

  /** Records a finished pass durably (the initial pass flips the store to WAL mode). */
  async endPass(kind: string, seq: number): Promise<void> {
    await this.whenApplied();
    if (this.commits.failure) throw this.commits.failure;
    if (seq > this.state.lastDurableSeq) this.state.lastDurableSeq = seq;
    if (kind === 'initial' || kind === 'resync') this.state.initialComplete = true;
    this.state.passes++;
    this.state.lastPass = { kind, seq, at: new Date().toISOString() };
    await this.checkpoint();
  }

  private async closeHandles(): Promise<void> {
    await this.undo?.close().catch(() => undefined);
    this.undo = null;
    await this.replica.close().catch(() => undefined);
    await this.wal.close().catch(() => undefined);
  }

  /** Waits for queued writes, checkpoints (best effort when failed) and closes. */
  async close(): Promise<void> {
    // a new replica nobody published is dropped, never left half-created
    if (this.pending || this.discarded) return this.discard();
    await this.whenApplied();
    // nothing applied since the last checkpoint (e.g. a verify or a refused session): nothing to sync
    if (!this.commits.failure && !this.readOnly && this.appliedBatches !== this.checkpointedBatches) await this.checkpoint().catch(() => undefined);
    this.staging.close();
    await this.closeHandles();
  }
}

interface PendingCreation {
  /** Final directory of the replica. */
  target: string;
  /** The final directory exists and holds no data (no state.json, empty or all-hole files): replaced on publish. */
  leftover: boolean;
  /** First directory mkdir created on the way to the parent (removed again, if empty, on discard). */
  madeParents: string | null;
  epoch: string | null;
}

/** Temporary directories this process is using (never swept). */
const liveTemps = new Set<string>();
/** Parent directories swept since this process started (stale siblings come from earlier processes). */
const swept = new Set<string>();
/** Temporary siblings: `.<disk>~new-<pid>-<rand>` (being created), `.<disk>~old-<pid>-<rand>` (leftover set aside). `~` is never part of an id. */
const TEMP_NAME = /^\..+~(?:new|old)-(\d+)-[0-9a-f]+$/;
/** writeFileDurable's temporary file: never renamed over state.json, so never a state. */
const STATE_TMP = /^state\.json\.tmp-\d+$/;
/** Up to this size a leftover replica.img is read to check that it holds only zeros. */
const LEFTOVER_READ_MAX = 64 * 1024 * 1024;

function pidAlive(pid: number): boolean {
  if (pid === process.pid) return true;
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/** Removes temporary siblings left by a crash (their owner is gone, or is this process and no longer uses them). */
async function sweepStale(parent: string): Promise<void> {
  swept.add(parent);
  let names: string[];
  try {
    names = await fsp.readdir(parent);
  } catch {
    return;
  }
  for (const n of names) {
    const m = TEMP_NAME.exec(n);
    if (!m) continue;
    const full = path.join(parent, n);
    const pid = Number(m[1]);
    if (liveTemps.has(full) || (pid !== process.pid && pidAlive(pid))) continue;
    await fsp.rm(full, { recursive: true, force: true }).catch(() => undefined);
  }
}

/** Removes `dir` and its parents up to `made` (the first directory a recursive mkdir created), while they are empty. */
async function removeEmptyParents(dir: string, made: string | null): Promise<void> {
  if (!made) return;
  for (let d = dir; ; d = path.dirname(d)) {
    try {
      await fsp.rmdir(d);
    } catch {
      return; // not empty (another disk or session uses it) or already gone
    }
    if (d === made || path.dirname(d) === d || !d.startsWith(made)) return;
  }
}

/**
 * A replica directory without state.json: false when it does not exist; true when it holds nothing
 * but an empty or all-zero (all-hole) replica.img, an empty wal.log and unrenamed state temp files
 * (what a creation interrupted before its state.json leaves), which is then treated as new.
 * Anything else, in particular a replica.img with data, is refused with MOB_ERR_STATE_CORRUPT.
 */
async function inspectLeftover(dir: string): Promise<boolean> {
  let names: string[];
  try {
    names = await fsp.readdir(dir);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOENT') return false;
    if (code === 'ENOTDIR') throw new MobilityError('MOB_ERR_STATE_CORRUPT', `${dir} is not a directory; refusing to replace it (remove it to start over)`);
    throw toMobilityError(err, 'MOB_ERR_STORAGE');
  }
  const refuse = (why: string) => new MobilityError('MOB_ERR_STATE_CORRUPT',
    `replica directory ${dir} has no state.json but ${why}; refusing to overwrite it (restore state.json or remove the directory)`);
  for (const n of names) {
    const full = path.join(dir, n);
    const st = await fsp.lstat(full);
    if (n === 'replica.img' && st.isFile()) {
      if (st.size === 0) continue;
      if (st.size > LEFTOVER_READ_MAX) {
        if (st.blocks === 0) continue; // nothing allocated: all holes
        throw refuse(`its replica.img exists with data`);
      }
      if (!isZero(await fsp.readFile(full))) throw refuse(`its replica.img exists with data`);
    } else if (n === 'wal.log' && st.isFile()) {
      if (st.size !== 0) throw refuse('its wal.log is not empty');
    } else if (STATE_TMP.test(n) && st.isFile()) {
      continue;
    } else {
      throw refuse(`it holds ${JSON.stringify(n)}`);
    }
  }
  return true;
}

/** ftruncate up to `size`; a size above the filesystem's file size limit is MOB_ERR_DISK_TOO_LARGE. */
async function growFile(fh: fsp.FileHandle, size: number): Promise<void> {
  try {
    await fh.truncate(size);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'EFBIG' || code === 'EINVAL') {
      throw new MobilityError('MOB_ERR_DISK_TOO_LARGE', `the replica store's filesystem cannot hold a file of ${size} bytes (${code})`, { cause: err });
    }
    throw toMobilityError(err, 'MOB_ERR_STORAGE');
  }
}
