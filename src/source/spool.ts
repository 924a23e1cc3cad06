/**
 * The spool of a cut: the remainder of dirty blocks read locally while the filesystems are
 * frozen, so that the freeze lasts as long as a local read, not as long as shipping over the
 * network. The cut's content is in the spool; after the thaw it is shipped from here, never
 * read again from the disk (which the application is already changing).
 *
 *   memory  runs are kept as buffers up to `memoryBytes`
 *   file    beyond that, appended to `<stateDir>/cut.spool` (mode 0600), read back in order
 *
 * A spool holds at most `budgetBytes` (memory + file); add() refuses more (the caller thaws and
 * converges further). close() removes the file. A spool file left by a killed agent is stale
 * (its cut was never sent) and is removed by the next Spool in the same directory.
 */
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { MobilityError } from '../errors.js';

/** A run of consecutive blocks: [first, first+count) starting at byte `start`, `len` bytes. */
export interface BlockRun { first: number; count: number; start: number; len: number }

interface Entry { run: BlockRun; mem: Buffer | null; fileOffset: number }

export const SPOOL_FILE = 'cut.spool';

export class Spool {
  /** disk -> its runs, in the order they were added */
  private entries = new Map<number, Entry[]>();
  private memUsed = 0;
  private fileUsed = 0;
  private fd: fs.promises.FileHandle | null = null;
  private readonly file: string;
  private closed = false;

  constructor(stateDir: string, readonly memoryBytes: number, readonly budgetBytes: number) {
    this.file = path.join(stateDir, SPOOL_FILE);
  }

  /** Bytes held (memory + file). */
  get bytes(): number { return this.memUsed + this.fileUsed; }
  get fileBytes(): number { return this.fileUsed; }
  get runs(): number { let n = 0; for (const l of this.entries.values()) n += l.length; return n; }

  private list(disk: number): Entry[] {
    let l = this.entries.get(disk);
    if (!l) this.entries.set(disk, (l = []));
    return l;
  }

  /** True when `more` bytes still fit in the budget. */
  fits(more: number): boolean { return this.bytes + more <= this.budgetBytes; }

  /** Keeps a run's data (the buffer is owned by the spool from now on). */
  async add(disk: number, run: BlockRun, data: Buffer): Promise<void> {
    if (this.closed) throw new MobilityError('MOB_ERR_CUT', 'the cut spool is closed');
    if (data.length !== run.len) throw new MobilityError('MOB_ERR_INTERNAL', `spool: run of ${run.len} bytes given ${data.length}`);
    if (!this.fits(data.length)) throw new MobilityError('MOB_ERR_CUT', `the cut's remainder exceeds the ${this.budgetBytes}-byte spool budget`);
    if (this.memUsed + data.length <= this.memoryBytes) {
      this.list(disk).push({ run, mem: data, fileOffset: -1 });
      this.memUsed += data.length;
      return;
    }
    if (!this.fd) this.fd = await fsp.open(this.file, 'w+', 0o600);
    let done = 0;
    while (done < data.length) {
      const { bytesWritten } = await this.fd.write(data, done, data.length - done, this.fileUsed + done);
      done += bytesWritten;
    }
    this.list(disk).push({ run, mem: null, fileOffset: this.fileUsed });
    this.fileUsed += data.length;
  }

  /** The runs of one disk in the order they were added. */
  runsOf(disk: number): BlockRun[] {
    return (this.entries.get(disk) ?? []).map((e) => e.run);
  }

  /** The data of the k-th run of a disk (as runsOf lists them). */
  async data(disk: number, k: number): Promise<Buffer> {
    const e = this.entries.get(disk)?.[k];
    if (!e) throw new MobilityError('MOB_ERR_INTERNAL', `spool: no run ${k} of disk ${disk}`);
    if (e.mem) return e.mem;
    const buf = Buffer.allocUnsafe(e.run.len);
    let done = 0;
    while (done < buf.length) {
      const { bytesRead } = await this.fd!.read(buf, done, buf.length - done, e.fileOffset + done);
      if (bytesRead === 0) throw new MobilityError('MOB_ERR_STATE_CORRUPT', `spool file ${this.file} is shorter than what was written to it`);
      done += bytesRead;
    }
    return buf;
  }

  /** Frees the memory and removes the file. Idempotent. */
  async close(): Promise<void> {
    this.closed = true;
    this.entries.clear();
    this.memUsed = 0;
    this.fileUsed = 0;
    const fd = this.fd;
    this.fd = null;
    if (fd) await fd.close().catch(() => undefined);
    await fsp.rm(this.file, { force: true });
  }

  /** Removes a spool file a killed agent left (its cut was never sent). */
  static async removeStale(stateDir: string): Promise<void> {
    await fsp.rm(path.join(stateDir, SPOOL_FILE), { force: true });
  }
}

/** Coalesces block numbers into runs of consecutive blocks, each at most maxRun blocks, clipped to the disk. */
export function blockRuns(blocks: number[], blockSize: number, sizeBytes: number, maxRun: number): BlockRun[] {
  const sorted = [...blocks].sort((a, b) => a - b);
  const runs: BlockRun[] = [];
  for (let i = 0; i < sorted.length;) {
    let j = i + 1;
    while (j < sorted.length && sorted[j] === sorted[j - 1] + 1 && j - i < maxRun) j++;
    const start = sorted[i] * blockSize;
    const len = Math.min((j - i) * blockSize, sizeBytes - start);
    if (len > 0) runs.push({ first: sorted[i], count: j - i, start, len });
    i = j;
  }
  return runs;
}
