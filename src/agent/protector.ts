/**
 * Continuous protection of a Linux machine's block devices (`mobility protect`).
 *
 *   tracefs tracker ─► dirty journal (durable across agent restarts)
 *        ─► shipper: read dirty blocks (O_DIRECT), ship changed pages, settle on ack
 *        ─► cuts: converge, freeze, ship the remainder, thaw, Cut frame ─► recovery point
 *
 * Per disk state: initial-sync → continuous; a loss of tracking (trace buffer overrun,
 * lost trace instance, agent died mid-drain) makes it resync-required (with the reason),
 * then resyncing (an incremental scan against the digest map: never a full copy), then
 * continuous again. Cuts happen only while every disk is continuous.
 *
 * Persistence: the digest map of each disk and the dirty journal are snapshotted
 * together (see dirty-journal.ts), so a block leaves the durable dirty set only once
 * a durable map holds what the target acknowledged for it. Blocks dirty at start are
 * forgotten in the map (the target may hold a newer version than the map says).
 *
 * The state directory must not live on a protected disk: the agent writes it while
 * the protected filesystems are frozen.
 */
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import path from 'node:path';
import {
  AGENT_VERSION, DEFAULT_BLOCK_SIZE, ID_PATTERN, PAGE_SIZE, RECONNECT_MAX_MS, RECONNECT_MIN_MS,
} from '../constants.js';
import { MobilityError, toMobilityError } from '../errors.js';
import type { Logger } from '../log.js';
import { Connection } from '../transport/client.js';
import { encodeMessage, type CutAck, type DiskState } from '../protocol/frame-codec.js';
import { RateLimiter } from '../transport/rate-limiter.js';
import { DigestMap } from '../source/digest-map.js';
import { openDiskSource, type DiskSource } from '../source/disk-source.js';
import { SourcePass, type PassKind } from '../source/source-pass.js';
import { DirtyJournal, type LossBaseline } from '../source/dirty-journal.js';
import { TracefsTracker, traceInstanceName } from '../source/tracker/tracefs.js';
import { QemuTracker, qemuTrackerName, type QemuPoint } from '../source/tracker/qemu.js';
import { unmountUnder } from '../source/qemu/fuse-source.js';
import type { ChangeTracker, DirtyExtent } from '../source/tracker/change-tracker.js';
import { chooseSamples, digestPagesAsync, includeFromEnv, WrittenPages, DEFAULT_RANDOM_SAMPLES, DEFAULT_WRITTEN_SAMPLES } from '../source/cut-sample.js';
import { Spool } from '../source/spool.js';
import { writeFileDurable } from '../util/durable-file.js';
import { devOf, deviceFamily, mountsOn, runHooks, thawAll, type HookResult } from './freeze.js';
import { FsfreezeQuiescer, type Quiescer } from './quiesce.js';
import { GuestAgentQuiescer } from './guest-agent-quiescer.js';
import type { CompressMode } from '../protocol/block-codec.js';
import type { GroupCutLink } from './group-member.js';

export type DiskStateName = 'initial-sync' | 'continuous' | 'resync-required' | 'resyncing' | 'error';
import type { CutKind } from './cut-kind.js';
export type { CutKind };

export const DEFAULT_CRASH_INTERVAL_MS = 5 * 60_000;
export const MIN_CRASH_INTERVAL_MS = 15_000;
export const DEFAULT_APP_INTERVAL_MS = 60 * 60_000;
export const DEFAULT_FREEZE_LIMIT_MS = 10_000;
export const DEFAULT_HOOK_TIMEOUT_MS = 60_000;
/**
 * A cut starts its freeze once the unshipped backlog is below this, or once it stops
 * shrinking (a hot working set larger than this never converges further), or at the timeout.
 */
const CONVERGE_BYTES = 16 * 1024 * 1024;
const CONVERGE_STALL_MS = 2000;
/** What a cut may read into its spool while frozen (memory + file), unless the options say otherwise. */
export const DEFAULT_SPOOL_BUDGET_BYTES = 256 * 1024 * 1024;
/** The part of the spool kept in memory; the rest goes to a file in the state directory. */
export const DEFAULT_SPOOL_MEMORY_BYTES = 32 * 1024 * 1024;
/** Freezes a cut tries when the remainder is over the spool budget, converging further between them. */
const SPOOL_ATTEMPTS = 3;
const CONVERGE_TIMEOUT_MS = 30_000;
const DRAIN_MS = 100;
/** Host mode: a drain is a QMP transaction and an nbdinfo run; a few per second are plenty for sub-second lag. */
const QEMU_DRAIN_MS = 1000;
const NO_COUNTERS: LossBaseline = { overrun: 0, dropped: 0, lostNotices: 0 };
const COUNTER_CHECK_MS = 1000;
const PERSIST_MS = 2000;
/** Health report period: status figures on the server are at most about this old (plus the send queue, SEND_QUEUE_BYTES). */
const HEALTH_MS = 1000;
const CHURN_WEIGHT = 1 - 0.5 ** (HEALTH_MS / 3000);
/** Dirty data one shipping round takes per disk (128 blocks at the default 64 KiB; more, smaller blocks at smaller block sizes). */
const TAKE_BYTES = 8 * 1024 * 1024;

export interface ProtectOptions {
  serverUrl: string;
  token: string;
  ca?: string;
  pin?: string;
  /** Client certificate and key of a registered agent (PEM); replaces the token. */
  cert?: string;
  key?: string;
  agentId: string;
  disks: { path: string; id: string }[];
  stateDir: string;
  blockSize?: number;
  /** Default 'auto': lz4 only while the link is the bottleneck. */
  compress?: CompressMode;
  maxRateBytes?: number;
  crashIntervalMs?: number;
  appIntervalMs?: number;
  hooksDir?: string;
  hookTimeoutMs?: number;
  freezeLimitMs?: number;
  /** Most a cut reads into its spool while frozen (default 256 MiB); a larger remainder converges further first. */
  spoolBudgetBytes?: number;
  /** The part of the spool held in memory (default 32 MiB); the rest goes to a file in the state directory. */
  spoolMemoryBytes?: number;
  trackerBufferKb?: number;
  tracefsRoot?: string;
  /** Where trace instance locks live (default /run/mobility/trace-locks). */
  lockDir?: string;
  /** Pages sampled at random per disk at each cut (default 64); pages written since the last cut add up to as many again. */
  cutSamples?: number;
  /**
   * Host mode: the disks are block nodes of a running QEMU (disks[].path = the format node's
   * name), tracked with dirty bitmaps over QMP, read through QEMU's exports; a cut is a
   * copy-before-write view of every disk started in one QMP transaction (the guest does not
   * pause). Absent: in-guest mode (block devices, tracefs, fsfreeze).
   */
  qemu?: {
    qmpSocket: string;
    /** The VM's QEMU guest agent socket: app-consistent cuts freeze the guest's filesystems through it. */
    guestAgentSocket?: string;
    /** The QEMU process's own NBD server socket, if it runs one (else the tracker starts one). */
    nbdSocket?: string;
  };
  /**
   * What app-consistent cuts freeze. Default: fsfreeze of the filesystems mounted from the
   * disks in-guest; in host mode the caller passes the guest agent's (without one, app cuts are
   * recorded as crash-consistent, with a note).
   */
  quiescer?: Quiescer;
  logger: Logger;
  signal?: AbortSignal;
  onEvent?: (e: ProtectEvent) => void;
}

export type ProtectEvent =
  | { event: 'started'; agentId: string; trackerResumed: boolean; journalFound: boolean; scanRequired: Record<string, string | null> }
  | { event: 'state'; disk: string; state: DiskStateName; reason: string }
  | { event: 'pass'; disk: string; kind: PassKind; reason: string }
  | { event: 'pass-done'; disk: string; kind: PassKind; bytesScanned: number; bytesSent: number; blocksSent: number; ms: number }
  | { event: 'connected' }
  | { event: 'disconnected'; code: string; message: string }
  | { event: 'cut'; cutId: number; kind: CutKind; pointId: string; groupPoint?: string; frozenMs: number; mounts: string[]; note: string; samplePages: number; sampleWaitMs: number; sampleReadMs: number; spoolBytes: number; spoolFileBytes: number; shipMs: number; overBudgetFreezesMs: number[] }
  | { event: 'cut-failed'; cutId: number; kind: CutKind; code: string; message: string; overBudgetFreezesMs?: number[]; groupPoint?: string }
  | { event: 'tracking-lost'; reason: string; repaired: boolean }
  | { event: 'hook'; phase: string; hook: string; ok: boolean; ms: number; output: string }
  | { event: 'stopped' };

interface PDisk {
  i: number;
  id: string;
  path: string;
  src: DiskSource;
  mapFile: string;
  map: DigestMap | null;
  mapProblem: string | null;
  state: DiskStateName;
  reason: string;
  /** The scan pass running or interrupted (initial, incremental or resync). */
  scan: SourcePass | null;
  /** Continuous shipping (kind 'incremental', used through shipBlocks). */
  shipper: SourcePass | null;
  unlisten: (() => void) | null;
  scanStarted: number;
  progressPermille: number;
  churnBytes: number;
  churnRate: number;
  /** Pages written since the last cut (a uniform sample), for the cut's verification. */
  written: WrittenPages;
  /** Set when a cut's sampled verification found the replica differs: the next scan is a checksum resync against the replica. */
  checksumResync: string | null;
}

export class Protector {
  private readonly bs: number;
  private readonly log: Logger;
  private disks: PDisk[] = [];
  private tracker!: ChangeTracker;
  /** In-guest mode: the tracefs tracker (loss counters); null in host mode. */
  private tracefs: TracefsTracker | null = null;
  /** Host mode: the QEMU tracker (points are its views); null in-guest. */
  private qemu: QemuTracker | null = null;
  /** What a cut freezes (null: nothing to freeze; host mode without a guest agent). */
  private quiescer: Quiescer | null = null;
  /** Drains run one at a time (the QEMU tracker's are asynchronous): the tail of the chain. */
  private drainChain: Promise<void> = Promise.resolve();
  private drainActive = false;
  private drainQueued = false;
  private journal!: DirtyJournal;
  private family = new Set<string>();
  private conn: Connection | null = null;
  private stopping = false;
  private wakeLoop: (() => void) | null = null;
  private timers: NodeJS.Timeout[] = [];
  private persisting: Promise<void> | null = null;
  private lastPersist = 0;
  /** Cut ids increase across agent restarts (hooks and logs use them). */
  private cutNo = Date.now();
  private lastAppCut = 0;
  private lastCut = 0;
  private retryCutAt = 0;
  private requestedCut: CutKind | null = null;
  /** A group cut the configuration server asked for (through the daemon), taken next. */
  private groupCut: GroupCutLink | null = null;
  private freezeFailures = 0;
  private lastFreezeMs = 0;
  private pendingCuts = new Map<number, { kind: CutKind; groupPoint?: string; frozenMs: number; mounts: string[]; note: string; samplePages: number; sampleWaitMs: number; sampleReadMs: number; spoolBytes: number; spoolFileBytes: number; shipMs: number; overBudgetFreezesMs: number[] }>();
  private readonly crashMs: number;
  private readonly appMs: number;
  private lastCounterCheck = 0;
  private started = false;
  /** Why tracking is not live and could not be repaired yet (no scan or cut until it is). */
  private trackerProblem: string | null = null;
  /** How long reading the last cut's samples took (all of it inside the freeze). */
  private lastSampleReadMs = 0;
  /** Losses of tracking noticed so far (by any check): a cut compares it across its freeze. */
  private lossEvents = 0;
  private stateDir = '';
  /** In-guest: the trace instance found at start is a look-alike of the one the last agent left (events lost). */
  private replaced = false;
  /** Host mode: when the last drain of QEMU's bitmaps ended, and the disks it found written (status: data lag). */
  private lastDrainAt = 0;
  private lastDrainHad = new Set<number>();
  /** Why protection stopped on its own (host mode: QEMU went away); run() rejects with it. */
  private fatal: MobilityError | null = null;

  constructor(private readonly o: ProtectOptions) {
    this.bs = o.blockSize ?? DEFAULT_BLOCK_SIZE;
    this.log = o.logger;
    this.crashMs = o.crashIntervalMs ?? DEFAULT_CRASH_INTERVAL_MS;
    // 0: no scheduled app-consistent cuts (a policy's "none"); asked-for ones still run
    this.appMs = o.appIntervalMs === 0 ? Infinity : o.appIntervalMs ?? DEFAULT_APP_INTERVAL_MS;
    if (this.crashMs < MIN_CRASH_INTERVAL_MS) throw new MobilityError('MOB_ERR_USAGE', `the crash-consistent interval must be at least ${MIN_CRASH_INTERVAL_MS / 1000} s`);
    if (this.appMs < this.crashMs) throw new MobilityError('MOB_ERR_USAGE', 'the app-consistent interval must not be shorter than the crash-consistent one');
  }

  private emit(e: ProtectEvent): void {
    this.o.onEvent?.(e);
  }

  /** Asks for a cut as soon as every disk is continuous (e.g. on SIGUSR1 / SIGUSR2). */
  requestCut(kind: CutKind): void {
    this.requestedCut = this.requestedCut === 'app' ? 'app' : kind;
    this.wakeLoop?.();
  }

  /**
   * Takes part in a group cut (agent/group-member.ts): the next cut converges, reports, freezes
   * when the group does, reports ready while frozen and completes only on the commit. Refused at
   * once (link.failed) while a disk is not continuous: the group should not wait for a scan.
   */
  requestGroupCut(link: GroupCutLink): void {
    if (this.groupCut) this.groupCut.failed(new MobilityError('MOB_ERR_GROUP_CUT', `superseded by group cut ${link.point}`));
    this.groupCut = null;
    if (!this.started || this.stopping) {
      link.failed(new MobilityError('MOB_ERR_NOT_PROTECTING', 'protection is starting or stopping'));
      return;
    }
    const notReady = this.disks.filter((d) => d.state !== 'continuous' || d.shipper === null || this.conn === null);
    if (notReady.length) {
      link.failed(new MobilityError('MOB_ERR_CUT', `not every disk is continuous: ${notReady.map((d) => `${d.id} ${d.state}${d.reason ? ` (${d.reason})` : ''}`).join(', ')}${this.conn ? '' : '; not connected to the server'}`));
      return;
    }
    this.groupCut = link;
    this.wakeLoop?.();
  }

  private setState(d: PDisk, state: DiskStateName, reason: string): void {
    if (d.state === state && d.reason === reason) return;
    d.state = state;
    d.reason = reason;
    this.log.info('disk state', { disk: d.id, state, reason });
    this.emit({ event: 'state', disk: d.id, state, reason });
    // the server (and status) learn a state change at once, not at the next periodic report
    if (this.journal) this.sendHealth(false);
  }

  async run(): Promise<void> {
    const o = this.o;
    const stateDir = path.join(o.stateDir, o.agentId);
    this.stateDir = stateDir;
    // an agent killed inside a cut's freeze left its filesystems frozen: thawed before anything is
    // written (the state directory may be on one of them); a filesystem that is not frozen is left as it is
    if (o.qemu) {
      this.quiescer = o.quiescer ?? (o.qemu.guestAgentSocket ? new GuestAgentQuiescer({ socket: o.qemu.guestAgentSocket }) : null);
      // a guest agent left frozen by a killed agent: thawed first
      if (this.quiescer?.releaseStale) await this.quiescer.releaseStale().catch((err: Error) => this.log.warn('could not thaw the guest at start', { error: err.message }));
    } else {
      const family = new Set<string>();
      for (const d of o.disks) {
        try { for (const f of deviceFamily(d.path)) family.add(f); } catch { /* reported by open() */ }
      }
      const thawed = await thawAll(mountsOn(family)).catch(() => [] as string[]);
      if (thawed.length) this.log.warn('could not thaw at start', { mounts: thawed });
      this.quiescer = o.quiescer ?? new FsfreezeQuiescer(() => mountsOn(this.family));
    }
    await fsp.mkdir(stateDir, { recursive: true, mode: 0o700 });
    try {
      await this.open(stateDir);
      this.started = true;
      await this.loop();
    } catch (err) {
      // reads through QEMU's exports fail once QEMU is gone: the reason is QEMU, not the read
      if (this.qemuLost()) this.hostGone();
      throw this.fatal ?? err;
    } finally {
      await this.shutdown();
    }
    if (this.fatal) throw this.fatal;
  }

  private async openTracefs(stateDir: string): Promise<void> {
    const o = this.o;
    for (const d of o.disks) {
      const st = await fsp.stat(d.path).catch((err: Error) => { throw new MobilityError('MOB_ERR_SOURCE', `cannot open ${d.path}: ${err.message}`); });
      if (!st.isBlockDevice()) throw new MobilityError('MOB_ERR_TRACKER', `${d.path} is not a block device: continuous protection tracks block devices (use 'mobility replicate' for image files)`);
      for (const f of deviceFamily(d.path)) this.family.add(f);
    }
    const sd = devOf(fs.statSync(stateDir).dev);
    if (this.family.has(`${sd.major}:${sd.minor}`)) {
      throw new MobilityError('MOB_ERR_CONFIG', `the state directory ${stateDir} is on a protected disk; put it on another disk (it is written while the protected filesystems are frozen)`);
    }
    // a cut spool left by a killed agent: its cut was never sent, its blocks are still in the journal
    await Spool.removeStale(stateDir);
    // the tracker starts before anything is read, so no write between our read and its first event is missed
    const tracker = await TracefsTracker.open({
      name: traceInstanceName(o.agentId, o.stateDir), disks: o.disks.map((d) => ({ path: d.path })), bufferKb: o.trackerBufferKb, tracefsRoot: o.tracefsRoot, lockDir: o.lockDir,
    });
    this.tracker = tracker;
    this.tracefs = tracker;
    // "<name>\n<instance inode>\n": uninstall finds this installation's instance by it, and a restart
    // tells the instance it left from a look-alike recreated meanwhile (same settings, events lost)
    const idFile = path.join(stateDir, 'trace-instance');
    const before = (await fsp.readFile(idFile, 'utf8').catch(() => '')).split('\n');
    this.replaced = this.tracker.resumed && before[0] === this.tracker.name && before[1] !== undefined && before[1] !== '' && before[1] !== this.tracker.identity;
    await writeFileDurable(idFile, `${this.tracker.name}\n${this.tracker.identity}\n`, 0o600);
    // an instance named the way agents before per-installation names did (mobility-<agent id>):
    // rmdir alone, which the kernel refuses while any reader (an older agent) holds it
    try { fs.rmdirSync(path.join(path.dirname(tracker.instanceDir), `mobility-${o.agentId}`)); } catch { /* absent or in use */ }
  }

  /**
   * Host mode: the QEMU tracker resumes the dirty bitmaps an earlier agent left (qcow2 keeps them
   * across a clean QEMU restart too) or creates them; a disk whose bitmap is gone or
   * inconsistent is a loss with its reason (a checksum resync against the replica, never a
   * full copy).
   */
  private async openQemu(stateDir: string, q: NonNullable<ProtectOptions['qemu']>): Promise<void> {
    const o = this.o;
    await fsp.mkdir(this.viewDir(), { recursive: true, mode: 0o700 });
    // exports a QEMU that was killed left mounted here (dead: ENOTCONN on every access)
    const stuck = unmountUnder(this.viewDir());
    if (stuck.length) this.log.warn('cannot lift dead QEMU exports', { mounts: stuck });
    const tracker = await QemuTracker.open({
      name: qemuTrackerName(o.agentId, o.stateDir), qmpSocket: q.qmpSocket, nbdSocket: q.nbdSocket, runDir: this.viewDir(), disks: o.disks.map((d) => ({ node: d.path })),
    });
    this.tracker = tracker;
    this.qemu = tracker;
    // point views a killed agent left: open() removed them from QEMU; their images are ours to delete
    for (const f of await fsp.readdir(this.viewDir())) if (f.endsWith('.qcow2')) await fsp.rm(path.join(this.viewDir(), f), { force: true });
    await writeFileDurable(path.join(stateDir, 'qemu-tracker'), `${tracker.name}\n${tracker.identity}\n`, 0o600);
  }

  /** Host mode: QEMU's exports (FUSE files, NBD socket) and point views live here (not on a guest disk: they are the host's). */
  private viewDir(): string {
    return path.join(this.stateDir, 'qemu');
  }

  private async open(stateDir: string): Promise<void> {
    const o = this.o;
    for (const d of o.disks) {
      if (!ID_PATTERN.test(d.id)) throw new MobilityError('MOB_ERR_BAD_DISK_ID', `disk id ${JSON.stringify(d.id)} is not [A-Za-z0-9._-]{1,64}`);
    }
    if (o.qemu) {
      // a cut spool left by a killed agent: its cut was never sent, its blocks are still in the journal
      await Spool.removeStale(stateDir);
      await this.openQemu(stateDir, o.qemu);
    } else {
      await this.openTracefs(stateDir);
    }
    for (const [i, d] of o.disks.entries()) {
      const src = this.qemu ? await this.qemu.openSource(i, this.viewDir()) : await openDiskSource(d.path, { direct: true });
      const mapFile = path.join(stateDir, `${d.id}.map`);
      let map: DigestMap | null = null;
      let mapProblem: string | null = null;
      // a refused point's checksum resync that did not finish before the agent stopped: the map
      // is not to be trusted (it may say the replica holds what it does not)
      const checksumResync = (await fsp.readFile(checksumMarker(mapFile), 'utf8').catch(() => '')).trim() || null;
      try {
        map = checksumResync ? null : await DigestMap.load(mapFile);
        if (checksumResync) mapProblem = checksumResync;
        else if (!map) mapProblem = 'digest map missing';
      } catch (err) {
        mapProblem = toMobilityError(err, 'MOB_ERR_STATE_CORRUPT').message;
      }
      this.disks.push({
        i, id: d.id, path: d.path, src, mapFile, map, mapProblem, state: 'initial-sync', reason: 'starting', scan: null, shipper: null, unlisten: null,
        scanStarted: 0, progressPermille: 0, churnBytes: 0, churnRate: 0, written: new WrittenPages(), checksumResync,
      });
    }
    const { journal, found, torn } = DirtyJournal.open(stateDir, this.disks.map((d) => ({ id: d.id, sizeBytes: d.src.size, blockSize: this.bs })), (text) => this.tracker.parseText(text));
    this.journal = journal;
    const now = this.tracefs?.counters() ?? NO_COUNTERS;
    if (this.qemu) {
      // per disk: a bitmap QEMU lost (raw image and QEMU restarted, QEMU killed, removed) is explained
      for (const [i, l] of this.qemu.openLoss.entries()) if (l.lost) journal.disks[i].scanRequired ??= `dirty tracking was lost: ${l.reason}`;
      if (torn) for (const jd of journal.disks) jd.scanRequired ??= 'the agent stopped while taking changes out of QEMU';
    } else if (!this.tracker.resumed) {
      for (const jd of journal.disks) jd.scanRequired ??= 'the trace instance was not running (machine restarted or tracking was removed)';
      journal.counters = now;
    } else if (this.replaced) {
      for (const jd of journal.disks) jd.scanRequired ??= 'tracking was disabled: the trace instance was removed and recreated while the agent was down';
      journal.counters = now;
    } else if (torn) {
      for (const jd of journal.disks) jd.scanRequired ??= 'the agent stopped while taking events out of the tracker';
    } else if (lossSince(journal.counters, now)) {
      for (const jd of journal.disks) jd.scanRequired ??= `trace events were lost while the agent was down (${describeLoss(journal.counters, now)})`;
      journal.counters = now;
    }
    // the target may hold a newer version of a dirty block than the map says
    for (const d of this.disks) {
      const jd = journal.disks[d.i];
      if (d.map) for (const b of new Set([...jd.dirty.keys(), ...jd.inflight.keys()])) d.map.forgetBlock(b, this.bs);
    }
    this.log.info('protection starting', {
      agent: o.agentId, trackerResumed: this.tracker.resumed, journalFound: found, torn,
      scanRequired: Object.fromEntries(journal.disks.map((jd) => [jd.id, jd.scanRequired])),
      dirtyBlocks: Object.fromEntries(journal.disks.map((jd) => [jd.id, jd.dirty.size])),
    });
    this.emit({ event: 'started', agentId: o.agentId, trackerResumed: this.tracker.resumed, journalFound: found, scanRequired: Object.fromEntries(journal.disks.map((jd) => [jd.id, jd.scanRequired])) });
    for (const d of this.disks) {
      const sr = journal.disks[d.i].scanRequired;
      if (sr && found) this.setState(d, 'resync-required', sr);
    }
    await this.persist(true);
    this.timers.push(setInterval(() => this.drainOnce(), this.qemu ? QEMU_DRAIN_MS : DRAIN_MS));
    this.timers.push(setInterval(() => this.sendHealth(true), HEALTH_MS));
    this.timers.push(setInterval(() => { if (Date.now() - this.lastPersist >= PERSIST_MS || this.journal.logSize > 4 << 20) void this.persist(false).catch((err) => this.log.error('cannot persist state', { error: (err as Error).message })); }, 500));
    for (const t of this.timers) t.unref?.();
  }

  /**
   * Takes every pending change out of the tracker into the durable journal; watches the loss
   * counters. Drains run one at a time; a call while one runs waits for it and then drains again
   * (so whatever was written before the call is in the journal when it resolves). Never rejects.
   */
  private drainOnce(): Promise<void> {
    if (!this.tracker) return Promise.resolve();
    // the periodic timer does not pile drains up behind a slow one (QMP)
    if (this.drainQueued) return this.drainChain;
    this.drainQueued = true;
    const p = this.drainChain.then(async () => {
      this.drainQueued = false;
      this.drainActive = true;
      try {
        await this.drainNow();
      } finally {
        this.drainActive = false;
      }
    });
    this.drainChain = p.catch((err: Error) => { this.log.error('drain failed', { error: err.message }); });
    return this.drainChain;
  }

  private async drainNow(): Promise<void> {
    // QEMU gone, or a tracker call already reconnected to a restarted one (the exports this agent
    // reads through are dead): protection stops, the next start opens everything anew
    if (this.qemuLost()) {
      this.hostGone();
      return;
    }
    if (this.trackerProblem) {
      // tracking is off and the last repair failed: retry it every check interval
      const t = Date.now();
      if (t - this.lastCounterCheck >= COUNTER_CHECK_MS) {
        this.lastCounterCheck = t;
        await this.checkTracking();
      }
      return;
    }
    const n = this.journal.beginDrain();
    let ext: DirtyExtent[];
    try {
      // tracefs answers synchronously: nothing else runs between the journal's begin and end
      const r = this.tracker.drain(this.journal);
      ext = r instanceof Promise ? await r : r;
    } catch (err) {
      this.journal.endDrain(n);
      if (this.qemu) {
        // a QEMU round that fails leaves its bitmaps in QEMU (nothing is lost by the failure itself):
        // the self-check tells a real loss (a bitmap disabled, removed, QEMU restarted) from a hiccup
        if (this.qemuLost()) return this.hostGone();
        this.log.warn('a drain of QEMU\'s dirty bitmaps failed', { error: (err as Error).message });
        await this.checkTracking();
        return;
      }
      this.lossDetected(`reading the tracker failed: ${(err as Error).message}`);
      return;
    }
    this.journal.addExtents(ext);
    this.journal.endDrain(n);
    this.noteWritten(ext);
    const t = Date.now();
    if (t - this.lastCounterCheck >= COUNTER_CHECK_MS) {
      this.lastCounterCheck = t;
      if (!(await this.checkTracking())) return;
      this.checkLoss();
    }
  }

  /** Host mode: the QEMU this agent opened is gone (closed), or the tracker is talking to a restarted one. */
  private qemuLost(): boolean {
    return this.qemu !== null && (!this.qemu.connected || this.qemu.epoch !== 0);
  }

  /**
   * Host mode: QEMU went away (the VM stopped, or restarted). Its exports (what the disks are read
   * through) went with it: protection stops here, with everything journaled kept, and the next
   * start resumes the bitmaps QEMU stored (qcow2, clean stop: no scan) or explains their loss.
   */
  private hostGone(): void {
    if (this.fatal) return;
    this.fatal = new MobilityError('MOB_ERR_QMP', `the VM's QEMU closed its QMP socket ${this.o.qemu?.qmpSocket ?? ''} (stopped or restarted): protection stops and resumes when it is started again`);
    this.log.warn('QEMU is gone: protection stops', { code: 'MOB_ERR_QMP', error: this.fatal.message });
    this.stop();
  }

  /**
   * How old the oldest write still inside the tracker may be: host mode drains QEMU's bitmaps
   * once a QEMU_DRAIN_MS, so a disk that was written to in the last round holds writes up to
   * that long before the journal sees them (the journal's own age starts when it does).
   */
  private trackerLagMs(disk: number, now: number): number {
    if (!this.qemu || !this.lastDrainHad.has(disk) || !this.lastDrainAt) return 0;
    return now - this.lastDrainAt;
  }

  /** Churn figures and the pages a cut samples, for extents just journaled. */
  private noteWritten(ext: DirtyExtent[]): void {
    if (this.qemu) {
      this.lastDrainAt = Date.now();
      this.lastDrainHad = new Set(ext.map((e) => e.disk));
    }
    for (const e of ext) {
      const d = this.disks[e.disk];
      if (!d) continue;
      d.churnBytes += e.length;
      d.written.add(e.offset, e.length, PAGE_SIZE);
    }
    if (ext.length) this.wakeLoop?.();
  }

  /** Loss counters (tracefs) against the journal's baseline; a loss requires a scan. Returns whether nothing was lost. */
  private checkLoss(): boolean {
    if (!this.tracefs) return true; // QEMU's bitmaps do not overrun: a lost bitmap is the self-check's
    let c: LossBaseline;
    try {
      c = this.tracefs.counters();
    } catch (err) {
      this.lossDetected(`the trace instance's loss counters cannot be read: ${(err as Error).message}`);
      return false;
    }
    if (!lossSince(this.journal.counters, c)) return true;
    const why = `trace buffer overran (${describeLoss(this.journal.counters, c)}); some writes may be unrecorded`;
    this.journal.counters = c;
    this.lossDetected(why);
    return false;
  }

  /**
   * Self-check: is tracking still live as we set it up (anyone with root can switch the trace
   * instance off; QEMU can restart, lose a raw disk's bitmap, or someone removes it)? If not:
   * repair it first (so writes from now on are recorded), then require a scan of every disk
   * (writes while it was off are unknown). Returns whether tracking is live.
   */
  private async checkTracking(): Promise<boolean> {
    const problem = this.trackerProblem ?? await this.tracker.selfCheck();
    if (!problem) return true;
    if (this.qemu?.lastCheckUnreachable && this.trackerProblem === null) {
      // not reaching QEMU is not a loss of its bitmaps: QEMU going away stops protection (its
      // next start judges the bitmaps), a hiccup is checked again at the next round
      if (this.qemuLost()) this.hostGone();
      else this.log.warn('QEMU did not answer the tracking self-check', { code: 'MOB_ERR_QMP', error: problem });
      return false;
    }
    const reason = problem.startsWith('tracking was disabled') ? problem : `tracking was disabled: ${problem}`;
    let repaired = false;
    try {
      await this.tracker.repair();
      repaired = (await this.tracker.selfCheck()) === null;
    } catch (err) {
      this.log.error('cannot repair change tracking', { code: 'MOB_ERR_TRACKER', error: (err as Error).message });
    }
    const first = this.trackerProblem === null;
    this.trackerProblem = repaired ? null : reason;
    if (first || repaired) {
      this.log.warn('change tracking was switched off under the agent', { code: 'MOB_ERR_TRACKING_LOST', reason, repaired });
      this.emit({ event: 'tracking-lost', reason, repaired });
    }
    if (repaired && this.tracefs) {
      try { this.journal.counters = this.tracefs.counters(); } catch { /* read again at the next check */ }
      // the identity a restart compares against (a recreated instance has a new inode)
      void writeFileDurable(path.join(this.stateDir, 'trace-instance'), `${this.tracker.name}\n${this.tracker.identity}\n`, 0o600)
        .catch((err: Error) => this.log.error('cannot record the trace instance', { error: err.message }));
    }
    if (first || repaired) this.lossDetected(repaired ? reason : `${reason} (repair failed; retrying every second)`);
    return repaired;
  }

  private lossDetected(reason: string): void {
    this.lossEvents++;
    for (const d of this.disks) {
      this.journal.disks[d.i].scanRequired = reason;
      if (d.state === 'continuous' || d.state === 'resyncing') this.setState(d, 'resync-required', reason);
    }
    this.log.warn('change tracking lost events: the disks will be scanned', { reason });
    this.wakeLoop?.();
  }

  /** Snapshot of maps + journal (same tick), maps written durably first. */
  private async persist(force: boolean): Promise<void> {
    // one persist at a time (they write the same files), and never inside a drain of the QEMU
    // tracker, which spans await points: the snapshot switches to a new log, and a drain's records
    // stay in one log. Both are checked again after every wait.
    for (;;) {
      if (this.persisting) {
        await this.persisting;
        if (!force) return;
      } else if (this.drainActive || this.drainQueued) {
        await this.drainChain;
      } else {
        break;
      }
    }
    this.lastPersist = Date.now();
    const bodies: [string, Buffer][] = [];
    for (const d of this.disks) {
      if (!d.map) continue;
      // a resync trusts matched pages only once the server recorded the pass end
      if (d.scan && d.scan.kind === 'resync' && !d.scan.done) continue;
      if (d.checksumResync) continue; // removed on purpose: not to be trusted until the resync ends
      if (d.map.dirty || force) bodies.push([d.mapFile, d.map.serialize()]);
    }
    const writeSnap = this.journal.snapshot();
    const work = (async () => {
      for (const [file, body] of bodies) await writeFileDurable(file, body, 0o600);
      writeSnap();
    })();
    this.persisting = work.finally(() => { this.persisting = null; });
    await this.persisting;
  }

  private backlogBytes(): number {
    let n = 0;
    for (const jd of this.journal.disks) n += jd.backlogBytes();
    return n;
  }

  /** periodic = the HEALTH_MS timer (updates the churn rate); otherwise an immediate report of a state change. */
  private sendHealth(periodic: boolean): void {
    const now = Date.now();
    if (periodic) {
      for (const d of this.disks) {
        // the same smoothing as when reports came every 3 s (half-weight per 3 s), whatever HEALTH_MS is
        d.churnRate += (d.churnBytes / (HEALTH_MS / 1000) - d.churnRate) * CHURN_WEIGHT;
        d.churnBytes = 0;
      }
    }
    const conn = this.conn;
    if (!conn || conn.closed) return;
    try {
      conn.send(encodeMessage({
        type: 'health',
        health: {
          disks: this.disks.map((d) => {
            const jd = this.journal.disks[d.i];
            return {
              disk: d.i, state: d.state, reason: d.reason, backlogBytes: jd.backlogBytes(), dataLagMs: Math.max(jd.oldestMs(now), this.trackerLagMs(d.i, now)),
              churnBytesPerSec: Math.round(d.churnRate), freezeFailures: this.freezeFailures, lastFreezeMs: this.lastFreezeMs,
              progressPermille: d.progressPermille,
            };
          }),
        },
      }));
    } catch { /* connection closing */ }
  }

  private async loop(): Promise<void> {
    const limiter = this.o.maxRateBytes ? new RateLimiter(this.o.maxRateBytes) : undefined;
    let backoff = RECONNECT_MIN_MS;
    const hello = {
      agentId: this.o.agentId, token: this.o.token, agentVersion: AGENT_VERSION, readOnly: false,
      disks: this.disks.map((d) => ({ diskId: d.id, sizeBytes: d.src.size, blockSize: this.bs, pageSize: PAGE_SIZE })),
    };
    while (!this.stopping) {
      let conn: Connection | null = null;
      try {
        conn = await Connection.connect({ url: this.o.serverUrl, ca: this.o.ca, pin: this.o.pin, cert: this.o.cert, key: this.o.key, hello, limiter });
        this.conn = conn;
        backoff = RECONNECT_MIN_MS;
        this.emit({ event: 'connected' });
        this.log.info('connected', { server: this.o.serverUrl });
        await this.session(conn);
      } catch (err) {
        const e = toMobilityError(err);
        conn?.shutdown();
        this.conn = null;
        for (const d of this.disks) {
          d.unlisten?.();
          d.unlisten = null;
          this.journal.requeue(d.i);
        }
        for (const [id, c] of this.pendingCuts) this.emit({ event: 'cut-failed', cutId: id, kind: c.kind, ...(c.groupPoint ? { groupPoint: c.groupPoint } : {}), code: e.code, message: `connection lost before the server acknowledged the cut: ${e.message}` });
        this.pendingCuts.clear();
        if (this.stopping) break;
        // a failing replica target (unreachable, credentials, quota) is the server's to fix: the
        // changes stay queued here and protection resumes when the target is back
        if (!e.retryable && !e.code.startsWith('MOB_ERR_TARGET_')) throw e;
        this.emit({ event: 'disconnected', code: e.code, message: e.message });
        const wait = Math.round(backoff * (0.5 + Math.random() / 2));
        this.log.warn('connection lost; reconnecting', { code: e.code, error: e.message, retryInMs: wait });
        await this.sleep(wait);
        backoff = Math.min(RECONNECT_MAX_MS, backoff * 2);
      }
    }
  }

  private sleep(ms: number): Promise<void> {
    return new Promise((r) => {
      const t = setTimeout(() => { this.wakeLoop = null; r(); }, ms);
      this.wakeLoop = () => { clearTimeout(t); this.wakeLoop = null; r(); };
    });
  }

  /** Chooses what each disk does on this connection. */
  private prepare(d: PDisk, ws: DiskState): void {
    const jd = this.journal.disks[d.i];
    const fresh = () => new DigestMap({ version: 1, diskId: d.id, diskSize: d.src.size, pageSize: PAGE_SIZE, generation: ws.generation });
    const sameReplica = d.map !== null && d.map.header.generation === ws.generation && d.map.header.diskSize === d.src.size && d.map.header.pageSize === PAGE_SIZE;
    // an interrupted scan continues, unless the map it trusts was found wrong since (checksum resync instead)
    if (d.scan && sameReplica && !(d.checksumResync && d.scan.kind !== 'resync')) {
      d.scan.resume(ws.lastDurableSeq); // an interrupted scan continues where it was
      d.shipper = null;
      return;
    }
    let kind: PassKind | null;
    let reason: string;
    if (!ws.replicaExists) {
      kind = 'initial'; reason = 'new replica'; d.map = fresh();
    } else if (!sameReplica) {
      kind = 'resync';
      reason = d.mapProblem ?? (d.map && d.map.header.generation !== ws.generation ? 'digest map belongs to another replica generation' : 'disk geometry changed');
      d.map = fresh();
    } else if (!ws.initialComplete) {
      kind = 'initial'; reason = 'resuming interrupted initial replication';
    } else if (d.checksumResync) {
      kind = 'resync'; reason = d.checksumResync; d.map = fresh();
    } else if (jd.scanRequired) {
      kind = 'incremental'; reason = jd.scanRequired;
    } else {
      kind = null; reason = 'tracking is intact';
    }
    d.mapProblem = null;
    if (kind) {
      d.scan = this.newPass(d, kind);
      d.scan.resume(Math.max(ws.lastDurableSeq, d.shipper?.lastSeq ?? 0));
      d.shipper = null;
      d.reason = reason;
    } else {
      if (!d.shipper) {
        d.shipper = this.newPass(d, 'incremental');
      }
      d.shipper.resume(ws.lastDurableSeq);
      this.setState(d, 'continuous', reason);
    }
  }

  private newPass(d: PDisk, kind: PassKind): SourcePass {
    return new SourcePass(kind, d.src, d.map!, {
      diskIndex: d.i, blockSize: this.bs, pageSize: PAGE_SIZE, compress: this.o.compress ?? 'auto',
      onFrameAcked: (blocks) => this.journal.settle(d.i, blocks),
      onProgress: (p) => { d.progressPermille = Math.floor((p.done / Math.max(1, p.total)) * 1000); },
    });
  }

  private async runScan(conn: Connection, d: PDisk): Promise<void> {
    const pass = d.scan!;
    const jd = this.journal.disks[d.i];
    this.setState(d, pass.kind === 'initial' ? 'initial-sync' : 'resyncing', d.reason);
    // a loss noticed from here on needs another scan; one noticed before is covered by this one
    jd.scanRequired = null;
    d.scanStarted = Date.now();
    this.emit({ event: 'pass', disk: d.id, kind: pass.kind, reason: d.reason });
    this.log.info('scan starting', { disk: d.id, kind: pass.kind, reason: d.reason });
    await pass.run(conn);
    const s = pass.stats;
    this.emit({ event: 'pass-done', disk: d.id, kind: pass.kind, bytesScanned: s.bytesScanned, bytesSent: s.bytesSent, blocksSent: s.blocksSent, ms: Date.now() - d.scanStarted });
    this.log.info('scan complete', { disk: d.id, kind: pass.kind, bytesScanned: s.bytesScanned, blocksSent: s.blocksSent, bytesSent: s.bytesSent, ms: Date.now() - d.scanStarted });
    d.shipper = this.newPass(d, 'incremental');
    d.shipper.resume(pass.lastSeq);
    d.scan = null;
    d.progressPermille = 1000;
    const resynced = pass.kind === 'resync' && d.checksumResync !== null;
    if (pass.kind === 'resync') d.checksumResync = null;
    d.written.clear();
    await this.persist(true);
    // the new map is durable: the marker can go
    if (resynced) await fsp.rm(checksumMarker(d.mapFile), { force: true });
    if (d.checksumResync) this.setState(d, 'resync-required', d.checksumResync);
    else if (jd.scanRequired) this.setState(d, 'resync-required', jd.scanRequired);
    else this.setState(d, 'continuous', 'scan complete');
  }

  private async session(conn: Connection): Promise<void> {
    const onCutAck = (a: CutAck) => this.onCutAck(a);
    conn.on('cutAck', onCutAck);
    const onCutRequest = (r: { kind: string; reason: string }) => {
      this.log.info('the server asked for a cut', { kind: r.kind, reason: r.reason });
      this.requestCut(r.kind === 'app' ? 'app' : 'crash');
    };
    conn.on('cutRequest', onCutRequest);
    try {
      for (const d of this.disks) this.prepare(d, conn.welcome.disks[d.i]);
      this.sendHealth(false);
      while (!this.stopping) {
        if (conn.closed) throw conn.closed;
        // scans first (initial, resync, or after lost tracking)
        let scanned = false;
        if (this.trackerProblem) {
          // a scan now would not see the writes that follow it: wait for the repair
          await this.sleep(COUNTER_CHECK_MS);
          continue;
        }
        for (const d of this.disks) {
          const jd = this.journal.disks[d.i];
          if (!d.scan && (jd.scanRequired || d.checksumResync) && d.shipper) {
            await this.quiesce(conn, d);
            if (d.checksumResync) {
              // the replica differs from what the digest map says: compare with the replica itself
              d.map = new DigestMap({ version: 1, diskId: d.id, diskSize: d.src.size, pageSize: PAGE_SIZE, generation: conn.welcome.disks[d.i].generation });
              d.scan = this.newPass(d, 'resync');
            } else {
              d.scan = this.newPass(d, 'incremental');
            }
            d.scan.resume(d.shipper.lastSeq);
            d.reason = d.checksumResync ?? jd.scanRequired ?? 'rescan';
            d.unlisten?.();
            d.unlisten = null;
            d.shipper = null;
          }
          if (d.scan) {
            await this.runScan(conn, d);
            scanned = true;
          }
        }
        if (scanned) continue;
        for (const d of this.disks) if (!d.unlisten && d.shipper) d.unlisten = d.shipper.listen(conn);
        const shipped = await this.shipRound(conn);
        // a group cut the server already gave up on (its converge bound passed while this machine
        // could not start) is dropped, not taken: its hooks would quiesce the applications for nothing
        if (this.groupCut?.settled) this.groupCut = null;
        if (this.cutDue()) {
          const g = this.groupCut;
          this.groupCut = null;
          try {
            await this.cut(conn, g ? g.kind : this.nextCutKind(), g ?? undefined);
          } catch (err) {
            g?.failed(toMobilityError(err));
            throw err;
          }
          continue;
        }
        if (!shipped) await this.sleep(DRAIN_MS);
      }
    } finally {
      conn.off('cutAck', onCutAck);
      conn.off('cutRequest', onCutRequest);
      for (const d of this.disks) { d.unlisten?.(); d.unlisten = null; }
    }
  }

  /** Waits until the disk's shipped frames are acknowledged (before a scan takes over the sequence). */
  private async quiesce(conn: Connection, d: PDisk): Promise<void> {
    while (d.shipper && d.shipper.framesInFlight > 0) {
      if (conn.closed) throw conn.closed;
      // woken by the next ack (the pass's own listener, registered first, has counted it by then)
      // or the connection's end; the timer only re-checks a shipper replaced meanwhile
      await new Promise<void>((resolve) => {
        const done = () => {
          clearTimeout(timer);
          conn.off('ack', done);
          conn.off('close', done);
          resolve();
        };
        const timer = setTimeout(done, 20);
        conn.on('ack', done);
        conn.on('close', done);
      });
    }
  }

  /** Ships one batch of dirty blocks per continuous disk; false when there was nothing to take. */
  private async shipRound(conn: Connection): Promise<boolean> {
    let any = false;
    for (const d of this.disks) {
      if (!d.shipper || d.state !== 'continuous') continue;
      const blocks = this.journal.take(d.i, Math.max(1, Math.floor(TAKE_BYTES / this.bs)));
      if (!blocks.length) continue;
      any = true;
      const unchanged = await d.shipper.shipBlocks(conn, blocks);
      this.journal.settle(d.i, unchanged);
    }
    return any;
  }

  private allContinuous(): boolean {
    return this.disks.every((d) => d.state === 'continuous' && d.shipper !== null);
  }

  private cutDue(): boolean {
    if (!this.allContinuous()) return false;
    const now = Date.now();
    if (this.requestedCut || this.groupCut) return true;
    if (now < this.retryCutAt) return false;
    return now - this.lastAppCut >= this.appMs || now - this.lastCut >= this.crashMs;
  }

  private nextCutKind(): CutKind {
    if (this.requestedCut) return this.requestedCut;
    return Date.now() - this.lastAppCut >= this.appMs ? 'app' : 'crash';
  }

  private dirtyBlocks(): number {
    let n = 0;
    for (const jd of this.journal.disks) n += jd.dirty.size;
    return n;
  }

  /** Ships until the backlog is at most `target` bytes, stops shrinking, or the convergence timeout; false when tracking was lost meanwhile. */
  private async converge(conn: Connection, target: number): Promise<boolean> {
    const converge = Date.now() + CONVERGE_TIMEOUT_MS;
    let best = Infinity;
    let bestAt = Date.now();
    while (this.backlogBytes() > target && Date.now() < converge && Date.now() - bestAt < CONVERGE_STALL_MS) {
      const b = this.backlogBytes();
      if (b < best * 0.95) { best = b; bestAt = Date.now(); }
      if (conn.closed) throw conn.closed;
      if (!(await this.shipRound(conn))) await new Promise((r) => setTimeout(r, 10));
      if (!this.allContinuous()) return false;
    }
    return true;
  }

  /**
   * One consistency cut, spooled: converge and let every frame in flight be acknowledged
   * (outside the freeze); (app: pre-freeze hooks); freeze; drain the trace; read the remaining
   * dirty blocks LOCALLY into the spool (memory, then a file in the state directory) and the
   * verification samples; frozen hooks; thaw (always). Only then the spool is shipped as the
   * cut's remainder and the Cut sent: the point is the disks at the instant of the freeze, and
   * the application is stalled for a local read, not for the network. A remainder larger than
   * the spool budget is not read: the disks are thawed at once and the cut converges further
   * before freezing again (up to SPOOL_ATTEMPTS times).
   */
  private async cut(conn: Connection, requested: CutKind, group?: GroupCutLink): Promise<void> {
    // a group cut leaves a cut asked for locally owed (it is taken next, as a machine point)
    const asked = group ? null : this.requestedCut;
    if (!group) this.requestedCut = null;
    const cutId = ++this.cutNo;
    let kind = requested;
    const limit = this.o.freezeLimitMs ?? DEFAULT_FREEZE_LIMIT_MS;
    const hookTimeout = this.o.hookTimeoutMs ?? DEFAULT_HOOK_TIMEOUT_MS;
    const budget = this.o.spoolBudgetBytes ?? DEFAULT_SPOOL_BUDGET_BYTES;
    const notes: string[] = [];
    const owed = () => { if (asked) this.requestedCut = this.requestedCut === 'app' ? 'app' : asked; };
    // tracking lost meanwhile: scan first; a cut someone asked for is still owed
    if (!(await this.converge(conn, Math.min(CONVERGE_BYTES, budget)))) {
      group?.failed(new MobilityError('MOB_ERR_TRACKING_LOST', 'change tracking was lost while converging; the disks are rescanned'));
      return owed();
    }
    const mounts = this.quiescer?.targets() ?? [];
    const env: Record<string, string> = {
      MOBILITY_CUT_ID: String(cutId), MOBILITY_CUT_KIND: kind, MOBILITY_MOUNTS: mounts.join('\n'),
      // hooks of a group cut know the group point (the same id on every machine of the group)
      ...(group ? { MOBILITY_GROUP: group.group, MOBILITY_GROUP_POINT: group.point } : {}),
    };
    const reportHooks = (rs: HookResult[]) => {
      for (const r of rs) {
        this.emit({ event: 'hook', phase: r.phase, hook: r.hook, ok: r.ok, ms: r.ms, output: r.output });
        if (!r.ok) this.log.warn('hook failed', { code: 'MOB_ERR_HOOK', phase: r.phase, hook: r.hook, output: r.output });
      }
      return rs.every((r) => r.ok);
    };
    let preRan = false;
    if (kind === 'app') {
      preRan = true;
      if (!reportHooks(await runHooks(this.o.hooksDir, 'pre-freeze', env, hookTimeout))) {
        kind = 'crash';
        notes.push('a pre-freeze hook failed: recorded as crash-consistent');
      }
    }
    if (this.qemu) {
      if (kind === 'app' && !this.quiescer) {
        kind = 'crash';
        notes.push('the VM has no guest agent: recorded as crash-consistent (its filesystems were not frozen)');
      }
    } else if (!mounts.length) {
      notes.push('no filesystem is mounted from the protected disks: nothing was frozen');
    }
    let frozeAt = 0;
    let frozenMs = 0;
    let failure: MobilityError | null = null;
    let seqs: number[] = [];
    let samples: { pages: number[]; digests: Buffer }[] = [];
    let sampleWaitMs = 0;
    let spoolBytes = 0;
    let spoolFileBytes = 0;
    let shipMs = 0;
    /** Where an in-guest freeze's time went, ms (the cut's log line): freeze call, trace drain, remainder read, samples, hooks, the drain after them, the group's commit, thaw call; and, before the freeze, the wait for the last acks. */
    const phases: Record<string, number> = {};
    /** Freezes thawed at once because the remainder was over the spool budget. */
    const overBudgetFreezesMs: number[] = [];
    let budgetFailed = false;
    let shipping = false;
    const spool = new Spool(this.stateDir, Math.min(budget, this.o.spoolMemoryBytes ?? DEFAULT_SPOOL_MEMORY_BYTES), budget);
    /** Blocks taken from the journal for the spool, per disk: back to dirty unless shipped. */
    let taken: number[][] = this.disks.map(() => []);
    const giveBack = () => {
      for (const [i, blocks] of taken.entries()) if (blocks.length) this.journal.requeue(i, blocks);
      taken = this.disks.map(() => []);
    };
    try {
      for (let attempt = 1; ; attempt++) {
        // nothing in flight when the freeze starts: every dirty block can be spooled (one version of a block in flight at a time)
        const tq = Date.now();
        for (const d of this.disks) await this.quiesce(conn, d);
        // before the freeze, not part of it: the wait for the last frames' acks (what the disks dirty meanwhile is the remainder)
        phases.ackWait = Date.now() - tq;
        if (!this.allContinuous()) {
          owed();
          throw new MobilityError('MOB_ERR_CUT', 'change tracking was lost before the freeze');
        }
        // converged: the group freezes when every machine has (one wait, before any freeze)
        if (group && attempt === 1) await group.converged();
        let over = 0;
        // a loss noticed by the periodic checks while the cut runs (they move the loss counters the
        // cut's own check compares with) must fail the cut too
        const losses0 = this.lossEvents;
        if (this.qemu) {
          // host mode: the point is a copy-before-write view of every disk, started in one QMP
          // transaction with the bitmaps' rotation; the guest keeps running (an app cut freezes its
          // filesystems through the guest agent around that transaction only). The remainder is
          // read from the view, not from the live disks.
          let point: QemuPoint | null = null;
          let guestFrozenAt = 0;
          let pausedAt = 0;
          const thawGuest = async () => {
            if (pausedAt) {
              await this.qemu!.resumeGuest().catch((err: Error) => this.log.error('cannot resume the guest', { code: 'MOB_ERR_QMP', error: err.message }));
              frozenMs = Date.now() - pausedAt;
              pausedAt = 0;
            }
            if (!guestFrozenAt) return;
            let failed = await this.quiescer!.thaw();
            // a guest left frozen hangs its applications: retried a few times before the cut goes on
            for (let i = 0; failed.length && i < 5; i++) {
              await new Promise((r) => setTimeout(r, 1000));
              failed = await this.quiescer!.thaw();
            }
            frozenMs = Date.now() - guestFrozenAt;
            guestFrozenAt = 0;
            if (failed.length) this.log.error('thaw failed', { code: 'MOB_ERR_FREEZE', failed });
          };
          try {
            const t0 = Date.now();
            const bound = t0 + limit;
            let frozeGuest = false;
            if (kind === 'app' && this.quiescer) {
              try {
                await this.quiescer.freeze(limit);
                frozeGuest = true;
              } catch (err) {
                // the view needs nothing from the guest: a guest agent that cannot freeze (absent, hung,
                // refusing) costs the point its app consistency, never the point (a group's is the group's)
                if (group) throw err;
                const e = toMobilityError(err, 'MOB_ERR_GUEST_AGENT');
                this.freezeFailures++;
                kind = 'crash';
                notes.push(`the guest could not be frozen (${e.code}: ${e.message}): recorded as crash-consistent`);
                this.log.warn('guest freeze failed; the point is crash-consistent', { code: e.code, error: e.message });
              }
            }
            if (frozeGuest) {
              guestFrozenAt = Date.now();
              if (!reportHooks(await runHooks(this.o.hooksDir, 'frozen', env, Math.max(1, Math.min(hookTimeout, bound - Date.now()))))) notes.push('a frozen-phase hook failed');
              if (Date.now() > bound) throw new MobilityError('MOB_ERR_FREEZE', `the guest stayed frozen longer than the ${limit} ms bound`);
            }
            if (group && !guestFrozenAt) {
              // several machines: their points must share one instant. Without a guest agent the
              // VM's CPUs are paused from here to the group's commit (a crash-consistent group point)
              try {
                if (await this.qemu.pauseGuest()) pausedAt = Date.now();
              } catch (err) {
                throw new MobilityError('MOB_ERR_GROUP_CUT', `this VM can take part in a group cut only if its QEMU can pause it or it has a guest agent: ${(err as Error).message}`);
              }
            }
            frozeAt = Date.now();
            point = await this.beginHostPoint(taken);
            // the freeze bound holds for the view's setup too, checked before a group's commit (as in-guest cuts)
            if (frozeGuest && Date.now() > bound) {
              throw new MobilityError('MOB_ERR_FREEZE', `the guest stayed frozen longer than the ${limit} ms bound (the point-in-time view took ${Date.now() - frozeAt} ms to set up)`);
            }
            // frozen or paused guest of a group cut: stays so until the group commits, like an in-guest cut
            if (group) {
              await group.ready(frozeAt, bound - Date.now());
            }
            await thawGuest();
            await this.assertTrackingLive();
            if (this.lossEvents !== losses0 || !this.allContinuous()) {
              throw new MobilityError('MOB_ERR_TRACKING_LOST', 'change tracking lost changes while the point was being taken; no point is recorded until the disks are rescanned');
            }
            const runs = this.disks.map((d) => d.shipper!.runsOf(taken[d.i]!));
            const remainder = runs.flat().reduce((n, r) => n + r.len, 0);
            if (remainder > budget) {
              over = remainder;
            } else {
              const view = point;
              const t1 = Date.now();
              const sampling = Promise.all(this.samplePlan(view.sources).map(async (p) => ({ pages: p.pages, digests: await digestPagesAsync(p.src, p.pages, PAGE_SIZE) })));
              sampling.catch(() => undefined);
              for (const d of this.disks) await d.shipper!.readRuns(runs[d.i]!, async (r, data) => { await spool.add(d.i, r, data); }, 8, view.sources[d.i]!);
              samples = await sampling;
              this.lastSampleReadMs = Date.now() - t1;
              spoolBytes = spool.bytes;
              spoolFileBytes = spool.fileBytes;
            }
          } finally {
            await thawGuest();
            if (point) await point.end().catch((err: Error) => this.log.warn('cannot remove the point-in-time view', { error: err.message }));
            this.lastFreezeMs = frozenMs;
          }
        } else {
          try {
            frozeAt = Date.now();
            await this.quiescer!.freeze(limit);
            const bound = frozeAt + limit;
            phases.freeze = Date.now() - frozeAt;
            // everything written before the freeze is on the disks now, and its events are in the trace
            let t = Date.now();
            await this.drainOnce();
            phases.drain = Date.now() - t;
            await this.assertTrackingLive();
            const runs = this.disks.map((d) => {
              taken[d.i] = this.journal.take(d.i, Number.MAX_SAFE_INTEGER);
              return d.shipper!.runsOf(taken[d.i]);
            });
            if (this.dirtyBlocks() > 0) throw new MobilityError('MOB_ERR_CUT', `${this.dirtyBlocks()} dirty block(s) were still in flight at the freeze`);
            const remainder = runs.flat().reduce((n, r) => n + r.len, 0);
            if (remainder > budget) {
              over = remainder;
            } else {
              // the verification samples, read while frozen (= the cut's content), alongside the remainder
              const t0 = Date.now();
              const sampling = Promise.all(this.samplePlan(this.disks.map((d) => d.src)).map(async (p) => ({ pages: p.pages, digests: await digestPagesAsync(p.src, p.pages, PAGE_SIZE) })));
              sampling.catch(() => undefined);
              for (const d of this.disks) {
                await d.shipper!.readRuns(runs[d.i]!, async (r, data) => {
                  if (Date.now() > bound) throw new MobilityError('MOB_ERR_FREEZE', `reading the ${remainder}-byte remainder did not end within the ${limit} ms freeze bound`);
                  await spool.add(d.i, r, data);
                });
              }
              phases.spool = Date.now() - t0;
              t = Date.now();
              samples = await sampling;
              this.lastSampleReadMs = Date.now() - t0;
              phases.samples = Date.now() - t;
              t = Date.now();
              spoolBytes = spool.bytes;
              spoolFileBytes = spool.fileBytes;
              if (!reportHooks(await runHooks(this.o.hooksDir, 'frozen', env, Math.max(1, Math.min(hookTimeout, bound - Date.now()))))) notes.push('a frozen-phase hook failed');
              const t1 = Date.now();
              phases.hooks = t1 - t;
              await this.drainOnce();
              sampleWaitMs = Date.now() - t1;
              phases.recheck = sampleWaitMs;
              if (this.dirtyBlocks() > 0) throw new MobilityError('MOB_ERR_CUT', 'the disks changed while frozen (a frozen-phase hook or an unfrozen writer wrote to them)');
              // tracking was live for the whole window the point covers (checked again after the hooks)
              await this.assertTrackingLive();
              if (this.lossEvents !== losses0 || !this.allContinuous()) {
                throw new MobilityError('MOB_ERR_TRACKING_LOST', 'change tracking lost events while the cut was being taken; no point is recorded until the disks are rescanned');
              }
              if (Date.now() > bound) throw new MobilityError('MOB_ERR_FREEZE', `the filesystems stayed frozen longer than the ${limit} ms bound`);
              // still frozen: ready; the commit (or an abort, or this side's own bound) ends the freeze
              if (group) {
                t = Date.now();
                await group.ready(frozeAt, bound - Date.now());
                phases.group = Date.now() - t;
                // nothing may have written while this machine waited frozen for the group's commit
                // either (a writer the freeze does not stop): its part would not be the group's moment
                await this.drainOnce();
                if (this.dirtyBlocks() > 0) throw new MobilityError('MOB_ERR_CUT', 'the disks changed while frozen, waiting for the group\'s commit (a writer the freeze does not stop)');
              }
            }
          } finally {
            if (frozeAt) {
              const t2 = Date.now();
              const failed = await this.quiescer!.thaw();
              frozenMs = Date.now() - frozeAt;
              phases.thaw = Date.now() - t2;
              this.lastFreezeMs = frozenMs;
              if (failed.length) this.log.error('thaw failed', { code: 'MOB_ERR_FREEZE', failed });
            }
          }
        }
        if (!over) break;
        // too much to spool: thawed at once; converge further and freeze again. The application was
        // frozen all the same: that freeze is reported with the cut (and in the health's last freeze)
        overBudgetFreezesMs.push(frozenMs);
        giveBack();
        if (group) {
          // the group is frozen together once; converging further would keep the others waiting
          budgetFailed = true;
          throw new MobilityError('MOB_ERR_CUT', `the remainder at the freeze (${over} bytes) was above the ${budget}-byte spool budget; the group cut is aborted (raise --spool-budget, or cut the group when the churn is lower)`);
        }
        if (attempt >= SPOOL_ATTEMPTS) {
          budgetFailed = true;
          throw new MobilityError('MOB_ERR_CUT', `the remainder at the freeze (${over} bytes) stayed above the ${budget}-byte spool budget after ${attempt} attempts; the churn is too high for this budget (raise --spool-budget)`);
        }
        notes.push(`remainder ${over} bytes over the spool budget at attempt ${attempt}: converged further`);
        this.log.info('cut remainder over the spool budget; converging further', { cutId, remainder: over, budget, attempt, frozenMs });
        if (!(await this.converge(conn, Math.floor(budget / 2 ** attempt)))) {
          owed();
          throw new MobilityError('MOB_ERR_CUT', 'change tracking was lost while converging');
        }
      }
      // thawed: an app cut releases the application now (post-thaw hooks), not after the network
      if (preRan) {
        preRan = false;
        reportHooks(await runHooks(this.o.hooksDir, 'post-thaw', env, hookTimeout));
      }
      // ship the spool (the frozen content), nothing else in between, then the Cut covers it
      const t2 = Date.now();
      shipping = true;
      for (const d of this.disks) {
        const unchanged = await d.shipper!.shipRuns(conn, spool.runsOf(d.i), (_r, k) => spool.data(d.i, k));
        this.journal.settle(d.i, unchanged);
      }
      taken = this.disks.map(() => []); // shipped: acks settle them; a lost connection requeues them
      shipMs = Date.now() - t2;
      seqs = this.disks.map((d) => d.shipper!.lastSeq);
    } catch (err) {
      failure = toMobilityError(err, 'MOB_ERR_FREEZE');
      group?.failed(failure);
      if (shipping) {
        // some spooled frames may be in flight: handing blocks back here could put two versions of
        // a block in flight. The session restarts instead; its end requeues every block in flight.
        this.emit({ event: 'cut-failed', cutId, kind, code: failure.code, message: failure.message, overBudgetFreezesMs, ...(group ? { groupPoint: group.point } : {}) });
        await spool.close().catch(() => undefined);
        throw conn.closed ?? new MobilityError('MOB_ERR_STORAGE', `shipping the spool of cut ${cutId} failed (${failure.message}); the session restarts and its blocks are shipped again`);
      }
      giveBack();
    } finally {
      await spool.close().catch((err: Error) => this.log.warn('cannot remove the cut spool', { error: err.message }));
    }
    if (preRan) reportHooks(await runHooks(this.o.hooksDir, 'post-thaw', env, hookTimeout));
    if (failure) {
      // froze the application without giving a point: a freeze failure too
      if (failure.code === 'MOB_ERR_FREEZE' || budgetFailed) this.freezeFailures++;
      // a group cut that failed is the group's to retry; the machine's own schedule is unchanged
      if (!group) this.retryCutAt = Date.now() + Math.min(60_000, this.crashMs);
      this.log.warn(group ? 'group cut failed' : 'cut failed; retrying later', { cutId, kind, code: failure.code, error: failure.message, frozenMs, ...(group ? { group: group.group, groupPoint: group.point } : {}) });
      this.emit({ event: 'cut-failed', cutId, kind, code: failure.code, message: failure.message, overBudgetFreezesMs, ...(group ? { groupPoint: group.point } : {}) });
      if (failure.code === 'MOB_ERR_UNREACHABLE' || conn.closed) throw conn.closed ?? failure;
      return;
    }
    const now = Date.now();
    this.lastCut = now;
    if (requested === 'app') this.lastAppCut = now;
    this.retryCutAt = 0;
    const note = notes.join('; ');
    const samplePages = samples.reduce((n, x) => n + x.pages.length, 0);
    this.pendingCuts.set(cutId, { kind, ...(group ? { groupPoint: group.point } : {}), frozenMs, mounts, note, samplePages, sampleWaitMs, sampleReadMs: this.lastSampleReadMs, spoolBytes, spoolFileBytes, shipMs, overBudgetFreezesMs });
    for (const d of this.disks) d.written.clear();
    conn.send(encodeMessage({
      type: 'cut',
      cut: {
        cutId, kind, takenAtMs: frozeAt, frozenMs, note, groupPoint: group?.point ?? '',
        disks: seqs.map((seq, disk) => ({ disk, seq, samplePages: samples[disk]!.pages, sampleDigests: samples[disk]!.digests })),
      },
    }));
    this.log.info('cut sent', { cutId, kind, groupPoint: group?.point, frozenMs, frozenPhasesMs: phases, mounts, note, samplePages, sampleWaitMs, sampleReadMs: this.lastSampleReadMs, spoolBytes, spoolFileBytes, shipMs });
  }

  /** Throws MOB_ERR_TRACKING_LOST (after starting the repair and the resync) when the self-check fails. */
  private async assertTrackingLive(): Promise<void> {
    const problem = this.trackerProblem ?? await this.tracker.selfCheck();
    if (problem) {
      await this.checkTracking();
      throw new MobilityError('MOB_ERR_TRACKING_LOST', `change tracking was switched off during the cut (${problem}); no point is recorded until the disks are rescanned`);
    }
    // events lost since the last check (a buffer overrun) would leave writes out of this point
    if (!this.checkLoss()) throw new MobilityError('MOB_ERR_TRACKING_LOST', 'trace events were lost before the cut; no point is recorded until the disks are rescanned');
  }

  /**
   * Host mode: starts the point (QemuTracker.beginPoint: the view of every disk and the bitmaps'
   * rotation in one transaction), journals what was written up to it and takes every dirty block
   * into `taken`, all in the drain order: no other drain runs in between, so what is taken is
   * exactly what the point holds beyond the replica.
   */
  private beginHostPoint(taken: number[][]): Promise<QemuPoint> {
    const run = async (): Promise<QemuPoint> => {
      this.drainActive = true;
      const n = this.journal.beginDrain();
      // what the tracker journaled, in case the view fails after the bitmaps were removed
      let raw: Buffer | null = null;
      const j = { beforeRead: () => this.journal.beforeRead(), afterRead: (b: Buffer) => { raw = Buffer.from(b); this.journal.afterRead(b); } };
      try {
        let point: QemuPoint;
        try {
          point = await this.qemu!.beginPoint(this.viewDir(), j);
        } catch (err) {
          const got = raw as Buffer | null;
          if (got) {
            const ext = this.tracker.parseText(got.toString('utf8'));
            this.journal.addExtents(ext);
            this.noteWritten(ext);
          }
          throw err;
        }
        this.journal.addExtents(point.extents);
        this.noteWritten(point.extents);
        for (const d of this.disks) taken[d.i] = this.journal.take(d.i, Number.MAX_SAFE_INTEGER);
        return point;
      } finally {
        this.journal.endDrain(n);
        this.drainActive = false;
      }
    };
    const p = this.drainChain.then(run);
    this.drainChain = p.then(() => undefined, () => undefined);
    return p;
  }

  /** The pages each disk samples at this cut (drawn afresh). */
  private samplePlan(sources: DiskSource[]): { src: DiskSource; pages: number[] }[] {
    const random = this.o.cutSamples ?? DEFAULT_RANDOM_SAMPLES;
    const writtenBudget = this.o.cutSamples ?? DEFAULT_WRITTEN_SAMPLES;
    return this.disks.map((d) => ({
      src: sources[d.i]!,
      pages: chooseSamples({ totalPages: Math.ceil(d.src.size / PAGE_SIZE), written: d.written.list(), random, writtenBudget, include: includeFromEnv(d.id) }),
    }));
  }

  private onCutAck(a: CutAck): void {
    const c = this.pendingCuts.get(a.cutId);
    if (!c) return;
    this.pendingCuts.delete(a.cutId);
    if (!a.pointId) {
      const code = a.errorCode || 'MOB_ERR_CUT';
      const message = a.errorMessage || 'the server did not record the cut';
      this.log.error('recovery point refused by the server', { cutId: a.cutId, code, error: message });
      this.emit({ event: 'cut-failed', cutId: a.cutId, kind: c.kind, code, message, ...(c.groupPoint ? { groupPoint: c.groupPoint } : {}) });
      if (code === 'MOB_ERR_POINT_UNVERIFIED') this.verificationFailed(a);
      return;
    }
    this.log.info('recovery point recorded', { cutId: a.cutId, point: a.pointId, kind: c.kind, frozenMs: c.frozenMs, verifiedPages: a.verifiedPages });
    this.emit({ event: 'cut', cutId: a.cutId, kind: c.kind, pointId: a.pointId, ...(c.groupPoint ? { groupPoint: c.groupPoint } : {}), frozenMs: c.frozenMs, mounts: c.mounts, note: c.note, samplePages: c.samplePages, sampleWaitMs: c.sampleWaitMs, sampleReadMs: c.sampleReadMs, spoolBytes: c.spoolBytes, spoolFileBytes: c.spoolFileBytes, shipMs: c.shipMs, overBudgetFreezesMs: c.overBudgetFreezesMs });
  }

  /**
   * The replica differs from the source at a sampled page: whatever the digest map says is not
   * to be trusted, so each named disk gets a checksum resync against the replica. The map file
   * is removed first, so an agent restart before the resync ends also resyncs by checksum.
   */
  private verificationFailed(a: CutAck): void {
    const disks: PDisk[] = [];
    for (const i of new Set((a.mismatches ?? []).map((m) => m.disk))) {
      const d = this.disks[i];
      if (!d) continue;
      const ms = (a.mismatches ?? []).filter((m) => m.disk === i);
      const first = ms[0]!;
      const reason = `sampled verification of cut ${a.cutId} failed: ${ms.length} page(s) of the replica differ from the source `
        + `(page ${first.page}, byte ${first.page * PAGE_SIZE}: replica ${first.replicaDigest.toString(16).padStart(16, '0')}, source ${first.sourceDigest.toString(16).padStart(16, '0')})`;
      // from here on persist() skips this disk's map
      d.checksumResync = reason;
      this.journal.disks[d.i].scanRequired = reason;
      this.setState(d, 'resync-required', reason);
      disks.push(d);
    }
    // durable before anything else: a restart must resync by checksum too. A persist() that had
    // already taken the old map is awaited first, so it cannot put that map back afterwards.
    void (async () => {
      await this.persisting?.catch(() => undefined);
      for (const d of disks) {
        await writeFileDurable(checksumMarker(d.mapFile), `${d.checksumResync ?? 'checksum resync required'}\n`, 0o600);
        await fsp.rm(d.mapFile, { force: true });
      }
    })().catch((err: Error) => this.log.error('cannot record the checksum resync', { error: err.message }));
    this.wakeLoop?.();
  }

  /** Stops after the current step; the trace instance keeps recording (restart costs no scan). */
  stop(): void {
    this.stopping = true;
    this.conn?.shutdown();
    this.wakeLoop?.();
  }

  private async shutdown(): Promise<void> {
    this.groupCut?.failed(new MobilityError('MOB_ERR_SHUTTING_DOWN', 'protection is stopping'));
    this.groupCut = null;
    for (const t of this.timers) clearInterval(t);
    this.timers = [];
    if (this.started) {
      try {
        await this.drainOnce();
        for (const d of this.disks) this.journal.requeue(d.i);
        await this.persist(true);
      } catch (err) {
        this.log.error('cannot persist state at stop', { error: (err as Error).message });
      }
    }
    this.conn?.shutdown();
    // the sources first: QEMU's exports are deleted over the tracker's QMP connection
    for (const d of this.disks) await d.src.close().catch(() => undefined);
    try {
      await this.tracker?.close({ keep: true });
    } catch (err) {
      this.log.warn('cannot close the change tracker', { error: (err as Error).message });
    }
    this.journal?.close();
    this.emit({ event: 'stopped' });
  }
}

/** Marks a disk whose digest map must not be trusted until a checksum resync ends. */
function checksumMarker(mapFile: string): string {
  return mapFile.replace(/\.map$/, '.checksum-resync');
}

/**
 * Counters that grew mean lost events; counters that went down mean the buffer was reset
 * (resized or cleared by someone), which also discards recorded events.
 */
function lossSince(base: LossBaseline, now: LossBaseline): boolean {
  return now.overrun !== base.overrun || now.dropped !== base.dropped || now.lostNotices > base.lostNotices;
}

function describeLoss(base: LossBaseline, now: LossBaseline): string {
  if (now.overrun < base.overrun || now.dropped < base.dropped) return `the trace buffer was reset (loss counters went down from overrun ${base.overrun}, dropped ${base.dropped} to ${now.overrun}, ${now.dropped})`;
  return `overrun +${Math.max(0, now.overrun - base.overrun)}, dropped +${Math.max(0, now.dropped - base.dropped)}, lost notices +${Math.max(0, now.lostNotices - base.lostNotices)}`;
}
