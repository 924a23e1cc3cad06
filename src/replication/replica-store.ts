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
import { MobilityError, toMobilityError } from '../errors.js';
import { WAL_CHECKPOINT_BYTES, READ_CHUNK_BYTES } from '../constants.js';
import { writeFileDurable } from '../util/durable-file.js';
import { Wal, type WalRecord } from './wal.js';
import { isZero, zeroBuffer } from './digest.js';
import { UNDO_UNIT, UndoJournal, type UndoRecord } from './undo-journal.js';

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

/** A whole-range write; data null means all zeros. */
export interface WriteOp { offset: number; length: number; data: Buffer | null }

interface Pending { ops: WriteOp[]; seq: number; resolve: () => void; reject: (e: unknown) => void }

export class ReplicaStore {
  private queue: Pending[] = [];
  private committing = false;
  private failed: MobilityError | null = null;
  /** Latest not-yet-applied content per written range (keyed by offset), so reads see accepted writes. */
  private overlay = new Map<number, Buffer | null>();
  private idleWaiters: (() => void)[] = [];
  private undo: UndoJournal | null = null;
  private epochId: string | null = null;
  bytesWritten = 0;
  undoBytesWritten = 0;

  private constructor(
    readonly dir: string,
    private state: ReplicaState,
    private readonly replica: fsp.FileHandle,
    private readonly wal: Wal,
    /** Opened for a verify session: never created, grown or checkpointed. */
    readonly readOnly: boolean,
  ) {}

  get generation(): string { return this.state.generation; }
  get sizeBytes(): number { return this.state.sizeBytes; }
  get initialComplete(): boolean { return this.state.initialComplete; }
  get lastDurableSeq(): number { return this.state.lastDurableSeq; }
  get snapshot(): Readonly<ReplicaState> { return { ...this.state }; }
  get replicaPath(): string { return path.join(this.dir, 'replica.img'); }

  /**
   * Opens (creating if needed) the replica of a disk and replays its WAL.
   * Throws MOB_ERR_DISK_SIZE_CHANGED when the source is smaller than the replica,
   * MOB_ERR_STATE_CORRUPT when state.json is unreadable.
   */
  static async open(dir: string, agentId: string, diskId: string, sizeBytes: number, opts: { readOnly?: boolean; epoch?: string | null } = {}): Promise<{ store: ReplicaStore; created: boolean }> {
    if (!opts.readOnly) await fsp.mkdir(dir, { recursive: true, mode: 0o700 });
    const stateFile = path.join(dir, 'state.json');
    let state: ReplicaState | null = null;
    try {
      state = JSON.parse(await fsp.readFile(stateFile, 'utf8')) as ReplicaState;
      if (state.version !== 1 || typeof state.generation !== 'string' || typeof state.sizeBytes !== 'number') {
        throw new Error('unsupported state version');
      }
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') {
        throw new MobilityError('MOB_ERR_STATE_CORRUPT', `replica state ${stateFile} is unreadable: ${(err as Error).message}`);
      }
      state = null;
    }
    if (state === null && opts.readOnly) {
      throw new MobilityError('MOB_ERR_UNKNOWN_DISK', `disk ${diskId} of agent ${agentId} has no replica on this server`);
    }
    if (state === null && (await fsp.stat(path.join(dir, 'replica.img')).then(() => true, () => false))) {
      throw new MobilityError('MOB_ERR_STATE_CORRUPT', `replica ${path.join(dir, 'replica.img')} exists without its state.json; refusing to overwrite it (restore state.json or remove the directory)`);
    }
    const created = state === null;
    const now = new Date().toISOString();
    if (!state) {
      state = {
        version: 1, agentId, diskId, sizeBytes, generation: randomUUID(), initialComplete: false,
        lastDurableSeq: 0, passes: 0, createdAt: now, updatedAt: now, lastPass: null,
      };
    } else if (sizeBytes < state.sizeBytes && !opts.readOnly) {
      throw new MobilityError('MOB_ERR_DISK_SIZE_CHANGED', `source disk ${diskId} is ${sizeBytes} bytes but its replica is ${state.sizeBytes}; shrinking a protected disk is not supported (remove the replica directory on the server to start over)`);
    }
    const replica = await fsp.open(path.join(dir, 'replica.img'), created ? 'w+' : 'r+', 0o600);
    const wal = await Wal.open(path.join(dir, 'wal.log'));
    const store = new ReplicaStore(dir, state, replica, wal, opts.readOnly ?? false);
    try {
      if (!opts.readOnly && (created || sizeBytes > state.sizeBytes)) {
        await replica.truncate(sizeBytes); // sparse: holes read as zeros
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
    return { store, created };
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

  /** Old bytes of the ops' ranges not yet captured in this epoch (first overwrite only), in 4 KiB units. */
  private async captureUndo(ops: WriteOp[]): Promise<UndoRecord[]> {
    if (!this.undo || !this.state.initialComplete) return [];
    const recs: UndoRecord[] = [];
    const seen = new Set<number>();
    const captured = this.undo.captured;
    const take = async (start: number, end: number) => {
      const old = Buffer.allocUnsafe(end - start);
      const { bytesRead } = await this.replica.read(old, 0, old.length, start);
      if (bytesRead < old.length) old.fill(0, bytesRead);
      recs.push({ offset: start, length: old.length, data: old });
    };
    for (const op of ops) {
      const end = op.offset + op.length;
      let runStart = -1;
      for (let u = Math.floor(op.offset / UNDO_UNIT); u * UNDO_UNIT < end; u++) {
        const fresh = !captured.has(u) && !seen.has(u);
        if (fresh) {
          seen.add(u);
          if (runStart < 0) runStart = Math.max(op.offset, u * UNDO_UNIT);
        } else if (runStart >= 0) {
          await take(runStart, u * UNDO_UNIT);
          runStart = -1;
        }
      }
      if (runStart >= 0) await take(runStart, end);
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
      const cur = Buffer.allocUnsafe(length);
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

  /** Applies ops to the replica, coalescing contiguous non-zero ops into one writev. */
  private async applyOps(ops: WriteOp[]): Promise<void> {
    const sorted = [...ops].sort((a, b) => a.offset - b.offset);
    let run: Buffer[] = [];
    let runStart = 0;
    let runEnd = 0;
    const flush = async () => {
      if (run.length) await this.writeFully(run, runStart);
      run = [];
    };
    for (const op of sorted) {
      if (!op.data) {
        await flush();
        await this.writeRange(op.offset, op.length, null);
        continue;
      }
      if (run.length && op.offset === runEnd && run.length < 512) {
        run.push(op.data);
        runEnd += op.length;
      } else {
        await flush();
        run = [op.data];
        runStart = op.offset;
        runEnd = op.offset + op.length;
      }
    }
    await flush();
  }

  private check(offset: number, length: number): void {
    if (!Number.isSafeInteger(offset) || offset < 0 || length < 0 || offset + length > this.state.sizeBytes) {
      throw new MobilityError('MOB_ERR_OUT_OF_RANGE', `range ${offset}+${length} lies beyond the ${this.state.sizeBytes}-byte disk`);
    }
  }

  /** Reads the current content of a range, including accepted writes not yet applied. */
  async read(offset: number, length: number): Promise<Buffer> {
    this.check(offset, length);
    if (this.overlay.has(offset)) {
      const o = this.overlay.get(offset)!;
      if (o === null) return Buffer.alloc(length);
      if (o.length === length) return o;
    }
    await this.whenApplied();
    const buf = Buffer.alloc(length);
    await this.replica.read(buf, 0, length, offset);
    return buf;
  }

  /**
   * Queues writes (already verified by the caller) tagged with seq; resolves when durable.
   * Rejects with MOB_ERR_NO_SPACE / MOB_ERR_STORAGE on I/O failure; the store is then unusable.
   */
  submit(ops: WriteOp[], seq: number): Promise<void> {
    if (this.failed) return Promise.reject(this.failed);
    for (const op of ops) {
      this.check(op.offset, op.length);
      this.overlay.set(op.offset, op.data);
    }
    return new Promise<void>((resolve, reject) => {
      this.queue.push({ ops, seq, resolve, reject });
      void this.kick();
    });
  }

  private async kick(): Promise<void> {
    if (this.committing) return;
    this.committing = true;
    try {
      while (this.queue.length && !this.failed) {
        const batch = this.queue;
        this.queue = [];
        const ops = batch.flatMap((p) => p.ops);
        const maxSeq = batch.reduce((m, p) => Math.max(m, p.seq), 0);
        try {
          if (!this.state.initialComplete) {
            await this.applyOps(ops);
            await this.replica.datasync();
          } else {
            // old bytes are durable before the redo records commit: a committed write is always revertible
            const undo = await this.captureUndo(ops);
            if (undo.length) {
              await this.undo!.append(undo);
              for (const u of undo) this.undoBytesWritten += u.length;
            }
            const recs: WalRecord[] = [];
            for (const p of batch) for (const op of p.ops) recs.push({ seq: p.seq, offset: op.offset, length: op.length, data: op.data });
            await this.wal.append(recs);
            await this.applyOps(ops);
          }
        } catch (err) {
          this.failed = toMobilityError(err, 'MOB_ERR_STORAGE');
          for (const p of [...batch, ...this.queue]) p.reject(this.failed);
          this.queue = [];
          break;
        }
        for (const op of ops) if (this.overlay.get(op.offset) === op.data) this.overlay.delete(op.offset);
        if (maxSeq > this.state.lastDurableSeq) this.state.lastDurableSeq = maxSeq;
        for (const p of batch) p.resolve();
        if (this.wal.bytes > WAL_CHECKPOINT_BYTES) await this.checkpoint().catch((err) => { this.failed = toMobilityError(err, 'MOB_ERR_STORAGE'); });
      }
    } finally {
      this.committing = false;
      if (!this.queue.length) {
        const w = this.idleWaiters;
        this.idleWaiters = [];
        for (const f of w) f();
      }
    }
  }

  /** Resolves when every submitted write has been committed and applied. */
  whenApplied(): Promise<void> {
    if (!this.committing && !this.queue.length) return Promise.resolve();
    return new Promise((r) => this.idleWaiters.push(r));
  }

  /** Syncs the replica, empties the WAL and records the durable sequence. */
  async checkpoint(): Promise<void> {
    await this.replica.datasync();
    if (this.wal.bytes > 0) await this.wal.truncate(0);
    await this.saveState();
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
    if (this.failed) throw this.failed;
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
    await this.whenApplied();
    if (!this.failed && !this.readOnly) await this.checkpoint().catch(() => undefined);
    await this.closeHandles();
  }
}
