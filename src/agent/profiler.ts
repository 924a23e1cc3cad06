/**
 * Profile-only mode (capacity planning): the agent tracks the writes of the disks the server
 * assigned for profiling with the same tracefs tracker protection uses, ships nothing, and
 * reports per disk and per interval what it measured. The server keeps the reports
 * (churn_samples) and `mobility capacity` plans from them. Nothing here opens a replication
 * session, so a profiled disk never gets a replica or a recovery point.
 *
 * Per report interval (default 10 s) and disk:
 *   bytes, writes   the extents of completed writes (and discards) drained from the trace,
 *                   merged per drain (every 100 ms): bytes written as tracked at write
 *                   granularity, what protection would have to ship at most;
 *   sampledBytes,   up to SAMPLE_BLOCKS blocks (64 KiB) chosen at random among those written in
 *   compressedBytes the interval, read back from the disk (O_DIRECT) and encoded as the data
 *                   path does (all-zero = 0 bytes, else lz4 when it shrinks): the wire ratio;
 *   sizeBytes,      the disk's size and the bytes used by the filesystems mounted from it
 *   usedBytes       (statfs; null when nothing is mounted): what an initial sync reads;
 *   complete        false when trace events were lost in the interval (buffer overrun, tracking
 *                   switched off): bytes is then a lower bound.
 *
 * Restarts: the trace instance is closed with keep = true, so it records while the agent is
 * down; <state>/<agent>/profile-state.json (durable, 0600) holds the instance's identity, the
 * loss counters and the end of the last reported interval. The first interval after a restart
 * starts there, so writes made while the agent was down are counted over the time they took.
 * A fresh instance (reboot, instance removed) starts a new interval: the time between is a gap.
 */
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { DEFAULT_BLOCK_SIZE } from '../constants.js';
import { MobilityError, toMobilityError } from '../errors.js';
import type { Logger } from '../log.js';
import { encodeBlock } from '../protocol/block-codec.js';
import { openDiskSource, type DiskSource } from '../source/disk-source.js';
import { TracefsTracker, traceInstanceName, type LossCounters } from '../source/tracker/tracefs.js';
import { writeFileDurable } from '../util/durable-file.js';
import { deviceFamily, mountsOn } from './freeze.js';

export const DEFAULT_PROFILE_INTERVAL_MS = 10_000;
export const MIN_PROFILE_INTERVAL_MS = 1000;
const DRAIN_MS = 100;
/** Blocks read back per disk and interval for the compression ratio. */
export const SAMPLE_BLOCKS = 16;
/** Blocks of one extent considered for the sample (a huge discard is sampled evenly, not block by block). */
const MAX_BLOCKS_PER_EXTENT = 256;
const STATE_FILE = 'profile-state.json';
/** Same name and format as protection's: uninstall finds the instance by it. */
const TRACE_INSTANCE_FILE = 'trace-instance';

export interface ProfileDisk { id: string; path: string }

/** One disk's figures over one interval (the control message 'churn' carries a list of them). */
export interface ChurnReport {
  diskId: string; intervalMs: number; bytes: number; writes: number; sampledBytes: number; compressedBytes: number;
  sizeBytes: number; usedBytes: number | null; complete: boolean;
}

export interface ProfilerOptions {
  agentId: string;
  disks: ProfileDisk[];
  /** <agent state>/profile: the trace instance is named for it (not protection's), the state file lives in <stateDir>/<agentId>. */
  stateDir: string;
  intervalMs?: number;
  tracefsRoot?: string;
  lockDir?: string;
  trackerBufferKb?: number;
  logger: Logger;
  /** Called once per interval with every disk's figures (atMs = the interval's end, agent clock). */
  onReport(reports: ChurnReport[], atMs: number): void;
}

interface SavedState { instance: string; identity: string; lastReportAt: number; overrun: number; dropped: number; disks: string[] }

interface Acc {
  id: string; path: string; src: DiskSource; bytes: number; writes: number;
  /** Reservoir of block offsets written this interval, and how many blocks were offered. */
  sample: number[]; seen: number;
}

export class Profiler {
  private tracker: TracefsTracker | null = null;
  private disks: Acc[] = [];
  private readonly intervalMs: number;
  private intervalStart = 0;
  /** Events were lost (or the interval is known to be incomplete) since intervalStart. */
  private lost = false;
  private base: LossCounters = { overrun: 0, dropped: 0, lostNotices: 0 };
  private timers: NodeJS.Timeout[] = [];
  private stopping = false;
  private wake: (() => void) | null = null;
  private reporting: Promise<void> = Promise.resolve();
  private dir = '';

  constructor(private readonly o: ProfilerOptions) {
    this.intervalMs = o.intervalMs ?? DEFAULT_PROFILE_INTERVAL_MS;
    if (!Number.isInteger(this.intervalMs) || this.intervalMs < MIN_PROFILE_INTERVAL_MS) {
      throw new MobilityError('MOB_ERR_CONFIG', `the profile interval must be at least ${MIN_PROFILE_INTERVAL_MS} ms`);
    }
  }

  /** The trace instance of an agent's profiling (not the one protection uses). */
  static instanceName(agentId: string, stateDir: string): string {
    return traceInstanceName(agentId, stateDir);
  }

  /** Tears down an agent's profiling (no disk is profiled any more): the trace instance and the state. */
  static async remove(agentId: string, stateDir: string, tracefsRoot?: string, lockDir?: string): Promise<void> {
    TracefsTracker.remove(Profiler.instanceName(agentId, stateDir), tracefsRoot, lockDir);
    await fsp.rm(path.join(stateDir, agentId), { recursive: true, force: true });
  }

  /** Runs until stop(): opens the tracker, drains it, reports every interval. */
  async run(): Promise<void> {
    try {
      await this.open();
      await new Promise<void>((r) => { this.wake = r; if (this.stopping) r(); });
      await this.reporting;
    } finally {
      for (const t of this.timers) clearInterval(t);
      this.timers = [];
      this.tracker?.close({ keep: true });
      for (const d of this.disks) await d.src.close().catch(() => undefined);
    }
  }

  stop(): void {
    this.stopping = true;
    this.wake?.();
  }

  private async open(): Promise<void> {
    const o = this.o;
    this.dir = path.join(o.stateDir, o.agentId);
    await fsp.mkdir(this.dir, { recursive: true, mode: 0o700 });
    const name = Profiler.instanceName(o.agentId, o.stateDir);
    this.tracker = await TracefsTracker.open({ name, disks: o.disks.map((d) => ({ path: d.path })), bufferKb: o.trackerBufferKb, tracefsRoot: o.tracefsRoot, lockDir: o.lockDir,
      // it journals nothing: no read to recover, no shadow instance to pay for
      shadow: false });
    const tracker = this.tracker;
    await writeFileDurable(path.join(this.dir, TRACE_INSTANCE_FILE), `${tracker.name}\n${tracker.identity}\n`, 0o600);
    for (const d of o.disks) {
      const src = await openDiskSource(d.path, { direct: true });
      this.disks.push({ id: d.id, path: d.path, src, bytes: 0, writes: 0, sample: [], seen: 0 });
    }
    const now = Date.now();
    const counters = tracker.counters();
    const saved = await this.loadState();
    const sameDisks = saved !== null && JSON.stringify(saved.disks) === JSON.stringify(o.disks.map((d) => d.id));
    if (tracker.resumed && saved && saved.instance === tracker.name && saved.identity === tracker.identity && sameDisks && saved.lastReportAt <= now) {
      // the instance kept recording while the agent was down: the first interval covers that time
      this.intervalStart = saved.lastReportAt;
      this.lost = counters.overrun !== saved.overrun || counters.dropped !== saved.dropped;
      this.log('profiling resumed', { since: new Date(saved.lastReportAt).toISOString(), eventsLost: this.lost });
    } else {
      // what was written before now is unknown: drop whatever an older instance held and start here
      try { tracker.drain(); } catch { /* the first interval checks the tracker again */ }
      this.intervalStart = now;
      this.log('profiling started', { resumed: tracker.resumed });
    }
    this.base = counters;
    await this.saveState(this.intervalStart);
    this.timers.push(setInterval(() => this.drainOnce(), DRAIN_MS));
    this.timers.push(setInterval(() => {
      this.reporting = this.reporting.then(() => this.report()).catch((err: Error) => { this.o.logger.error('churn report failed', { error: err.message }); });
    }, this.intervalMs));
    for (const t of this.timers) t.unref();
  }

  private log(msg: string, meta: Record<string, unknown>): void {
    this.o.logger.info(msg, { agent: this.o.agentId, disks: this.o.disks.map((d) => d.id), intervalMs: this.intervalMs, ...meta });
  }

  private drainOnce(): void {
    const tracker = this.tracker;
    if (!tracker || this.stopping) return;
    let ext;
    try {
      ext = tracker.drain();
    } catch (err) {
      if (!this.lost) this.o.logger.warn('reading the trace failed; this interval is incomplete', { code: toMobilityError(err).code, error: (err as Error).message });
      this.lost = true;
      return;
    }
    for (const e of ext) {
      const d = this.disks[e.disk];
      if (!d) continue;
      d.bytes += e.length;
      d.writes++;
      offerBlocks(d, e.offset, e.length, DEFAULT_BLOCK_SIZE);
    }
  }

  /** Ends the interval: takes the last events, checks for losses, samples the ratio, reports, persists. */
  private async report(): Promise<void> {
    const tracker = this.tracker;
    if (!tracker || this.stopping) return;
    this.drainOnce();
    const end = Date.now();
    let complete = !this.lost;
    try {
      const problem = tracker.selfCheck();
      if (problem) {
        complete = false;
        this.o.logger.warn('change tracking was switched off under the agent; repairing it (this interval is incomplete)', { code: 'MOB_ERR_TRACKING_LOST', reason: problem });
        tracker.repair();
      }
      const c = tracker.counters();
      if (c.overrun !== this.base.overrun || c.dropped !== this.base.dropped || c.lostNotices > this.base.lostNotices) complete = false;
      this.base = c;
    } catch (err) {
      complete = false;
      this.o.logger.warn('cannot check the trace instance', { code: toMobilityError(err).code, error: (err as Error).message });
    }
    const taken = this.disks.map((d) => {
      const r = { d, bytes: d.bytes, writes: d.writes, sample: d.sample };
      d.bytes = 0; d.writes = 0; d.sample = []; d.seen = 0;
      return r;
    });
    const intervalMs = Math.max(1, end - this.intervalStart);
    this.intervalStart = end;
    this.lost = false;
    const reports: ChurnReport[] = [];
    for (const { d, bytes, writes, sample } of taken) {
      const ratio = await sampleRatio(d.src, sample, DEFAULT_BLOCK_SIZE).catch((err: unknown) => {
        this.o.logger.warn('cannot read changed blocks for the compression sample', { disk: d.id, error: (err as Error).message });
        return { sampledBytes: 0, compressedBytes: 0 };
      });
      reports.push({ diskId: d.id, intervalMs, bytes, writes, ...ratio, sizeBytes: d.src.size, usedBytes: usedBytesOf(d.path), complete });
    }
    try {
      this.o.onReport(reports, end);
    } catch (err) {
      this.o.logger.error('churn report handler failed', { error: (err as Error).message });
    }
    await this.saveState(end).catch((err: Error) => { this.o.logger.error('cannot persist the profile state', { error: err.message }); });
  }

  private async loadState(): Promise<SavedState | null> {
    try {
      const j = JSON.parse(await fsp.readFile(path.join(this.dir, STATE_FILE), 'utf8')) as Partial<SavedState>;
      if (typeof j.instance !== 'string' || typeof j.identity !== 'string' || typeof j.lastReportAt !== 'number' || !Array.isArray(j.disks)) return null;
      return { instance: j.instance, identity: j.identity, lastReportAt: j.lastReportAt, overrun: Number(j.overrun ?? 0), dropped: Number(j.dropped ?? 0), disks: j.disks.map(String) };
    } catch {
      return null;
    }
  }

  private async saveState(lastReportAt: number): Promise<void> {
    const t = this.tracker;
    if (!t) return;
    const s: SavedState = { instance: t.name, identity: t.identity, lastReportAt, overrun: this.base.overrun, dropped: this.base.dropped, disks: this.o.disks.map((d) => d.id) };
    await writeFileDurable(path.join(this.dir, STATE_FILE), JSON.stringify(s) + '\n', 0o600);
  }
}

/** Offers the blocks an extent touches to the disk's reservoir (Algorithm R). */
function offerBlocks(d: Acc, offset: number, length: number, bs: number): void {
  if (length <= 0) return;
  const first = Math.floor(offset / bs);
  const last = Math.floor((offset + length - 1) / bs);
  const n = last - first + 1;
  const step = n > MAX_BLOCKS_PER_EXTENT ? n / MAX_BLOCKS_PER_EXTENT : 1;
  for (let k = 0; k < Math.min(n, MAX_BLOCKS_PER_EXTENT); k++) {
    const b = first + Math.floor(k * step);
    d.seen++;
    if (d.sample.length < SAMPLE_BLOCKS) d.sample.push(b * bs);
    else {
      const j = Math.floor(Math.random() * d.seen);
      if (j < SAMPLE_BLOCKS) d.sample[j] = b * bs;
    }
  }
}

/** Reads the sampled blocks and encodes them as the data path would (zero blocks as 0 bytes, lz4 when it shrinks). */
export async function sampleRatio(src: DiskSource, offsets: number[], bs: number): Promise<{ sampledBytes: number; compressedBytes: number }> {
  let sampledBytes = 0;
  let compressedBytes = 0;
  const buf = Buffer.alloc(bs);
  for (const off of [...new Set(offsets)]) {
    const len = Math.min(bs, src.size - off);
    if (len <= 0) continue;
    await src.read(buf, off, len);
    const enc = encodeBlock(buf.subarray(0, len), true);
    sampledBytes += len;
    compressedBytes += enc.payload.length;
  }
  return { sampledBytes, compressedBytes };
}

/** Bytes used by the filesystems mounted from a device or its partitions (statfs); null when none is mounted. */
export function usedBytesOf(device: string): number | null {
  try {
    const mounts = mountsOn(new Set(deviceFamily(device)));
    if (!mounts.length) return null;
    let used = 0;
    const seen = new Set<string>();
    for (const m of mounts) {
      const st = fs.statfsSync(m);
      // a filesystem mounted twice (bind mounts) counts once
      const key = `${st.type}:${st.blocks}:${st.bfree}:${st.files}`;
      if (seen.has(key)) continue;
      seen.add(key);
      used += (st.blocks - st.bfree) * st.bsize;
    }
    return used;
  } catch {
    return null;
  }
}
