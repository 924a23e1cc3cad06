/**
 * Kernel change tracker built on tracefs block events.
 *
 * Why tracefs: blktrace (the BLKTRACESETUP ioctl) is not available everywhere,
 * but the `block:block_rq_complete` tracepoint is, and it is exact: every
 * completed request of a blk-mq disk reports (dev, sector, nr_sector, rwbs).
 * We create a private ftrace instance (/sys/kernel/tracing/instances/NAME)
 * so nothing else that uses tracing is disturbed, filter it in the kernel on
 * the tracked disks' dev_t, and drain its trace_pipe without blocking.
 *
 * Design points:
 *  - The tracepoint always reports the WHOLE disk's dev and sectors relative to
 *    the whole disk, even for I/O submitted to a partition (the partition remap
 *    happens at bio submission). So the filter is on the parent disks and each
 *    event is mapped back onto every tracked spec (whole disk or partition) it
 *    overlaps, clipped and made relative to that spec.
 *  - Writes ('W'), discards ('D') and anything the kernel prints as 'N' (write
 *    zeroes and other non read/write ops) are modifying. Reads ('R') and
 *    flush-only requests are ignored. A request that completed with an error
 *    still counts (conservative: part of it may have reached the media).
 *  - options/overwrite = 0: when the ring buffer is full the kernel drops NEW
 *    events and counts them ("dropped events" in per_cpu/cpuN/stats) instead
 *    of silently overwriting old ones. Any nonzero overrun/dropped/LOST count
 *    means the dirty set is incomplete and the caller must resync the disk.
 *    The counters are cumulative for the lifetime of the kernel instance.
 *  - close({ keep: true }) closes our file descriptors but leaves the instance
 *    recording, so an agent stop/upgrade/restart does not lose writes: the next
 *    open() finds the instance with the same filter, reports resumed = true and
 *    delivers what was recorded meanwhile. If the instance is gone (reboot) or
 *    differs, it is recreated and resumed = false (the caller must resync).
 *  - trace_pipe is opened O_NONBLOCK and read with readSync until EAGAIN: a
 *    blocking read (fs.createReadStream) would pin a libuv thread and keep the
 *    process from exiting.
 *  - A read of trace_pipe consumes the events it returns, inside the kernel, before
 *    the caller can record them: an agent killed by SIGKILL inside that read (or
 *    between it and the write of what it returned) would lose them, and that window
 *    covers a good part of a busy drain. So the tracker keeps a SHADOW instance
 *    (NAME.shadow): same tracepoint, same filter, same buffer, so it records exactly
 *    the same events. Each drain reads the instance, then the shadow, and reports
 *    every read to the journal (DrainJournal.beforeRead with the copy's name). A read
 *    of one copy that was cut short is recovered from the other: it still holds
 *    everything that read took, because the other copy's own reads were all recorded
 *    (what it gave is journaled, what it still holds is after). Only two reads cut
 *    short in a row on different copies (kill, restart, kill again inside the first
 *    drain) lose events, and the journal says so. A copy created after its twin lacks
 *    the twin's older events: drain() tells the journal (soleHolder) once.
 *    Cost: the tracepoint writes each event into two ring buffers and the kernel
 *    formats it twice; the shadow's text is journaled, and parsed only until the
 *    shadow was read empty once (measured: see docs/operations.md).
 *    Alternatives ruled out: reading the non-consuming `trace` file, then trace_pipe,
 *    cannot consume exactly what was journaled (what arrives in between is consumed
 *    unrecorded); trace_pipe_raw consumes a page per read (the same window, shorter);
 *    the snapshot swap (swap, read `snapshot`, clear) is exact, but the clear resets
 *    the snapshot buffer's loss counters, which tracefs never shows (per_cpu stats
 *    are the live buffer's), so drops just before a swap would go unseen, and opening
 *    and clearing the snapshot each wait for an RCU grace period inside a synchronous
 *    drain; mapping the ring buffer (Linux 6.10) needs mmap and ioctl, which Node
 *    does not offer without a native addon.
 *  - Only request-based (blk-mq) disks emit block_rq_complete. Bio-based
 *    devices (device-mapper linear, md, zram, brd) never would, so they are
 *    refused rather than silently tracked as "never written".
 */
import fs from 'node:fs';
import path from 'node:path';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { StringDecoder } from 'node:string_decoder';
import { MobilityError } from '../../errors.js';
import { installIdOf } from '../../util/installation.js';
import { acquireInstanceLock, assertInstanceFree, DEFAULT_LOCK_DIR, releaseInstanceLock } from './instance-lock.js';
import { coalesceExtents, type ChangeTracker, type DirtyExtent, type DrainJournal, type DrainSource } from './change-tracker.js';

export interface TrackedDiskSpec { path: string }
/** disk = index into the specs given to open(); offset/length in bytes relative to the start of that device. */
export type { DirtyExtent };
/** overrun and dropped are summed over CPUs (kernel, cumulative per instance); lostNotices = "LOST N EVENTS" lines seen by this tracker object. */
export interface LossCounters { overrun: number; dropped: number; lostNotices: number }

const DEFAULT_TRACEFS = '/sys/kernel/tracing';
const DEFAULT_BUFFER_KB = 8192;
const EVENT_DIR = path.join('events', 'block', 'block_rq_complete');
const NAME_RE = /^[A-Za-z0-9_.-]+$/;
/**
 * Where drain() records what it takes out of the kernel, around every read: an agent
 * killed between taking events and recording their extents can then recover them.
 */
export type RawJournal = DrainJournal;
/** The shadow instance of instance NAME is NAME.shadow. */
export const SHADOW_SUFFIX = '.shadow';
const PRIMARY: DrainSource = { name: 'p', heldBy: 's' };
const SHADOW: DrainSource = { name: 's', heldBy: 'p' };

/** Upper bound of bytes read by one drain() so a flood of events cannot make it spin forever. */
const MAX_DRAIN_BYTES = 64 * 1024 * 1024;
const READ_CHUNK = 256 * 1024;
// "<comm>-<pid> [cpu] flags ts: block_rq_complete: 7,0 WS () 8000 + 8 be,0,4 [0]" (cmd may be non-empty for passthrough)
const EVENT_RE = /block_rq_complete: (\d+),(\d+) (\S*) \(.*\) (\d+) \+ (\d+)/;
const LOST_RE = /\[LOST \d+ EVENTS\]/;

interface Mapped {
  index: number;
  /** kernel dev_t of the whole disk the tracepoint reports: (major << 20) | minor */
  parentDev: number;
  parentKey: string; // "MAJ,MIN" as printed in trace lines
  startByte: number; // start of the spec on its parent disk
  sizeBytes: number;
}

function trackerError(name: string, what: string, cause?: unknown): MobilityError {
  const c = cause as NodeJS.ErrnoException | undefined;
  const detail = cause === undefined ? '' : `: ${c?.code ? `${c.code} ` : ''}${c?.message ?? String(cause)}`;
  return new MobilityError('MOB_ERR_TRACKER', `tracefs tracker '${name}': ${what}${detail}`, cause === undefined ? undefined : { cause });
}

function readTrim(p: string): string {
  return fs.readFileSync(p, 'utf8').trim();
}

function writeCtl(p: string, value: string): void {
  fs.writeFileSync(p, value + '\n');
}

/** glibc encoding of st_rdev -> (major, minor). */
function decodeRdev(rdev: bigint): { major: number; minor: number } {
  const major = Number(((rdev >> 8n) & 0xfffn) | ((rdev >> 32n) & ~0xfffn));
  const minor = Number((rdev & 0xffn) | ((rdev >> 12n) & ~0xffn));
  return { major, minor };
}

function mapSpec(name: string, spec: TrackedDiskSpec, index: number): Mapped {
  let st: fs.BigIntStats;
  try {
    st = fs.statSync(spec.path, { bigint: true });
  } catch (err) {
    throw trackerError(name, `cannot stat disk ${spec.path}`, err);
  }
  if (!st.isBlockDevice()) throw trackerError(name, `${spec.path} is not a block device`);
  const { major, minor } = decodeRdev(st.rdev);
  const sys = `/sys/dev/block/${major}:${minor}`;
  try {
    const sizeBytes = Number(readTrim(path.join(sys, 'size'))) * 512;
    let startByte = 0;
    let parentSys = sys;
    if (fs.existsSync(path.join(sys, 'partition'))) {
      startByte = Number(readTrim(path.join(sys, 'start'))) * 512;
      parentSys = path.dirname(fs.realpathSync(sys));
    }
    const m = /^(\d+):(\d+)$/.exec(readTrim(path.join(parentSys, 'dev')));
    if (!m) throw new Error(`unexpected ${parentSys}/dev content`);
    const pMajor = Number(m[1]);
    const pMinor = Number(m[2]);
    if (!fs.existsSync(path.join(parentSys, 'mq'))) {
      throw trackerError(name, `${spec.path} (disk ${path.basename(fs.realpathSync(parentSys))}) is bio-based, not blk-mq: block_rq_complete never fires for it, so it cannot be tracked`);
    }
    if (!Number.isSafeInteger(sizeBytes) || !Number.isSafeInteger(startByte)) throw new Error('bad size/start in sysfs');
    return { index, parentDev: pMajor * 2 ** 20 + pMinor, parentKey: `${pMajor},${pMinor}`, startByte, sizeBytes };
  } catch (err) {
    if (err instanceof MobilityError) throw err;
    throw trackerError(name, `cannot resolve ${spec.path} (${major}:${minor}) in sysfs`, err);
  }
}

async function ensureTracefs(root: string, explicit: boolean, name: string): Promise<void> {
  if (fs.existsSync(path.join(root, 'instances'))) return;
  if (!explicit) {
    try {
      await promisify(execFile)('mount', ['-t', 'tracefs', 'tracefs', root]);
    } catch {
      // reported below
    }
    if (fs.existsSync(path.join(root, 'instances'))) return;
  }
  throw trackerError(name, `tracefs is not available at ${root} (no 'instances' directory${explicit ? '' : '; mounting tracefs there failed — root privileges and a kernel with tracefs are needed'})`);
}

/**
 * The instance name of one agent installation: the agent id plus a digest of its state
 * directory, so two installations on one machine (even registered under the same name)
 * never share, disable or remove each other's instance.
 */
export function traceInstanceName(agentId: string, stateDir: string): string {
  return `mobility-${agentId}-${installIdOf(stateDir).slice(0, 8)}`;
}

/** What open() set up; self-checks compare the live instance against it. */
interface Expected { filter: string; bufferKb: number; requestedKb: number; ino: bigint }

/** CPU indices of a sysfs list such as "0-3,6". */
function cpuList(text: string): number[] {
  const out: number[] = [];
  for (const part of text.trim().split(',').filter(Boolean)) {
    const [a, b] = part.split('-').map(Number);
    for (let c = a!; c <= (b ?? a!); c++) out.push(c);
  }
  return out;
}

/** A cpumask as tracefs prints and parses it: hex, in comma-separated 32-bit groups. */
function cpuMask(cpus: number[]): string {
  let v = 0n;
  for (const c of cpus) v |= 1n << BigInt(c);
  const groups: string[] = [];
  do { groups.unshift((v & 0xffffffffn).toString(16)); v >>= 32n; } while (v > 0n);
  return groups.map((g, i) => (i === 0 ? g : g.padStart(8, '0'))).join(',');
}

/**
 * Which CPUs' events the instance records, and whom: every online CPU must be in tracing_cpumask
 * and no pid filter (set_event_pid, set_event_notrace_pid) may be set, or writes issued there or
 * by those processes go unrecorded. Returns what differs, or null.
 */
function scopeProblem(dir: string): string | null {
  if (fs.existsSync(path.join(dir, 'tracing_cpumask'))) {
    const mask = BigInt(`0x${readTrim(path.join(dir, 'tracing_cpumask')).replace(/,/g, '') || '0'}`);
    const online = cpuList(fs.readFileSync('/sys/devices/system/cpu/online', 'utf8'));
    const missing = online.filter((c) => !((mask >> BigInt(c)) & 1n));
    if (missing.length) return `tracing_cpumask leaves out CPU ${missing.join(', ')}`;
  }
  for (const f of ['set_event_pid', 'set_event_notrace_pid']) {
    if (!fs.existsSync(path.join(dir, f))) continue;
    const v = readTrim(path.join(dir, f));
    if (v) return `${f} is ${v.split('\n').join(' ')} (events are recorded for some processes only)`;
  }
  return null;
}

/** Every possible CPU, no pid filter (see scopeProblem). */
function setScope(dir: string): void {
  writeCtl(path.join(dir, 'tracing_cpumask'), cpuMask(cpuList(fs.readFileSync('/sys/devices/system/cpu/possible', 'utf8'))));
  for (const f of ['set_event_pid', 'set_event_notrace_pid']) {
    if (fs.existsSync(path.join(dir, f))) fs.writeFileSync(path.join(dir, f), '');
  }
}

/** One instance setup (fresh): buffer, overwrite off, filter, event on, tracing on. */
function setUpInstance(dir: string, bufferKb: number, filter: string): void {
  const ev = path.join(dir, EVENT_DIR);
  fs.mkdirSync(dir);
  try {
    if (!fs.existsSync(ev)) throw new Error(`${EVENT_DIR} missing: the kernel has no block tracepoints`);
    writeCtl(path.join(dir, 'buffer_size_kb'), String(bufferKb));
    writeCtl(path.join(dir, 'options', 'overwrite'), '0');
    writeCtl(path.join(ev, 'filter'), filter);
    writeCtl(path.join(ev, 'enable'), '1');
    writeCtl(path.join(dir, 'tracing_on'), '1');
  } catch (err) {
    try { writeCtl(path.join(ev, 'enable'), '0'); } catch { /* ignore */ }
    try { fs.rmdirSync(dir); } catch { /* ignore */ }
    throw err;
  }
}

/** The buffer size the kernel reports (it rounds up to whole pages; "7 (expanded: 1408)" before first use). */
function readBufferKb(dir: string): number {
  return Number(/^\d+/.exec(readTrim(path.join(dir, 'buffer_size_kb')))?.[0] ?? NaN);
}

/** Is the instance at dir recording as open() would set it up (same filter, enabled, overwrite off, whole scope)? */
function sameSetup(dir: string, filter: string): boolean {
  const ev = path.join(dir, EVENT_DIR);
  try {
    return readTrim(path.join(ev, 'filter')) === filter && readTrim(path.join(ev, 'enable')) === '1'
      && readTrim(path.join(dir, 'tracing_on')) === '1' && readTrim(path.join(dir, 'options', 'overwrite')) === '0'
      && scopeProblem(dir) === null;
  } catch {
    return false;
  }
}

function openPipe(dir: string): number {
  return fs.openSync(path.join(dir, 'trace_pipe'), fs.constants.O_RDONLY | fs.constants.O_NONBLOCK);
}

/** One ftrace instance the tracker set up, and its reader: trace_pipe, the undecoded tail of the last read. */
class Instance {
  fd: number | null;
  partial = '';
  readonly decoder = new StringDecoder('utf8');
  constructor(readonly dir: string, readonly label: string, public expected: Expected, fd: number) {
    this.fd = fd;
  }

  /** null when live as set up, else what differs. */
  problem(): string | null {
    const dir = this.dir;
    const ex = this.expected;
    let st: fs.BigIntStats | undefined;
    try {
      st = fs.statSync(dir, { bigint: true, throwIfNoEntry: false });
    } catch (err) {
      return `the ${this.label} ${dir} cannot be read: ${(err as Error).message}`;
    }
    if (!st) return `the ${this.label} ${dir} was removed`;
    if (st.ino !== ex.ino) return `the ${this.label} ${dir} was removed and recreated`;
    const checks: [string, string][] = [
      [path.join(EVENT_DIR, 'enable'), '1'],
      ['tracing_on', '1'],
      [path.join(EVENT_DIR, 'filter'), ex.filter],
      [path.join('options', 'overwrite'), '0'],
    ];
    const where = this.label === 'trace instance' ? '' : ` (${this.label} ${dir})`;
    try {
      for (const [file, want] of checks) {
        const have = readTrim(path.join(dir, file));
        if (have !== want) return `${file} is ${JSON.stringify(have).slice(1, -1) || '(empty)'}${file.endsWith('filter') ? ` (set: ${want})` : ''}${where}`;
      }
      const scope = scopeProblem(dir);
      if (scope) return `${scope}${where}`;
      const kb = readBufferKb(dir);
      if (kb !== ex.bufferKb) return `buffer_size_kb is ${kb} (set: ${ex.bufferKb}; resizing discards recorded events)${where}`;
    } catch (err) {
      return `the ${this.label} ${dir} cannot be read: ${(err as Error).message}`;
    }
    return null;
  }

  /** Re-arms the settings in place, or recreates the instance; returns true when it was recreated (its recording starts now). */
  repair(): boolean {
    const dir = this.dir;
    const ex = this.expected;
    const st = fs.statSync(dir, { bigint: true, throwIfNoEntry: false });
    if (st && st.ino === ex.ino && this.fd !== null) {
      const ev = path.join(dir, EVENT_DIR);
      writeCtl(path.join(dir, 'options', 'overwrite'), '0');
      if (readBufferKb(dir) !== ex.bufferKb) writeCtl(path.join(dir, 'buffer_size_kb'), String(ex.requestedKb));
      writeCtl(path.join(ev, 'filter'), ex.filter);
      if (scopeProblem(dir)) setScope(dir);
      writeCtl(path.join(ev, 'enable'), '1');
      writeCtl(path.join(dir, 'tracing_on'), '1');
      this.expected = { ...ex, bufferKb: readBufferKb(dir) };
      return false;
    }
    this.closeFd();
    if (st) fs.rmdirSync(dir); // an instance someone else created under our name
    setUpInstance(dir, ex.requestedKb, ex.filter);
    this.expected = { ...ex, bufferKb: readBufferKb(dir), ino: fs.statSync(dir, { bigint: true }).ino };
    this.fd = openPipe(dir);
    this.partial = '';
    return true;
  }

  closeFd(): void {
    if (this.fd === null) return;
    try { fs.closeSync(this.fd); } catch { /* already closed */ }
    this.fd = null;
  }
}

export class TracefsTracker implements ChangeTracker {
  readonly resumed: boolean;
  readonly instanceDir: string;
  readonly name: string;
  private readonly byParent: Map<string, Mapped[]>;
  private readonly primary: Instance;
  /** The shadow instance (null: opened with shadow = false, e.g. by the profiler, which journals nothing). */
  private readonly shadow: Instance | null;
  /** close() was called (an fd is also null between the steps of a repair that failed: retried). */
  private closed = false;
  private lost = 0;
  private readonly buf = Buffer.allocUnsafe(READ_CHUNK);
  private readonly lockDir: string;
  /** Copies that hold events their twin lacks, not yet told to a journal (see DrainJournal.soleHolder). */
  private sole: string[];
  /**
   * Parse what the shadow gives? Only until it was read empty once after open() or repair():
   * until then it may hold events the instance no longer (or never) had (a read of the instance
   * cut short by a kill, the shadow's head start); after that every event it gives is one the
   * instance gives too (this process's reads of the instance all complete), so its text is
   * only journaled, never parsed.
   */
  private parseShadow = true;

  private constructor(name: string, resumed: boolean, mapped: Mapped[], primary: Instance, shadow: Instance | null, sole: string[], lockDir: string) {
    this.name = name;
    this.instanceDir = primary.dir;
    this.resumed = resumed;
    this.primary = primary;
    this.shadow = shadow;
    this.sole = sole;
    this.lockDir = lockDir;
    this.byParent = new Map();
    for (const m of mapped) {
      const l = this.byParent.get(m.parentKey) ?? [];
      l.push(m);
      this.byParent.set(m.parentKey, l);
    }
  }

  /**
   * Opens (resumes or creates) the instance NAME and, unless shadow is false, its shadow
   * NAME.shadow (see the file head). resumed = the instance kept recording since the last
   * close({ keep: true }); a missing or different shadow is recreated without making the
   * tracker not resumed (it only narrows what a cut-short read can recover, which the
   * journal is told).
   */
  static async open(o: { name: string; disks: TrackedDiskSpec[]; bufferKb?: number; tracefsRoot?: string; lockDir?: string; shadow?: boolean }): Promise<TracefsTracker> {
    const name = o.name;
    if (!NAME_RE.test(name) || name === '.' || name === '..' || name.length > 200) {
      throw trackerError(String(name), 'instance name must match [A-Za-z0-9_.-]+');
    }
    if (o.disks.length === 0) throw trackerError(name, 'no disks to track');
    const bufferKb = o.bufferKb ?? DEFAULT_BUFFER_KB;
    if (!Number.isInteger(bufferKb) || bufferKb < 1) throw trackerError(name, `invalid bufferKb ${bufferKb}`);
    const mapped = o.disks.map((d, i) => mapSpec(name, d, i));
    const root = o.tracefsRoot ?? DEFAULT_TRACEFS;
    await ensureTracefs(root, o.tracefsRoot !== undefined, name);
    const lockDir = o.lockDir ?? DEFAULT_LOCK_DIR;
    // owned from here on (with its shadow): nothing else may disable or remove it while we use it
    acquireInstanceLock(name, lockDir);

    const devs = [...new Set(mapped.map((m) => m.parentDev))].sort((a, b) => a - b);
    const filter = devs.map((d) => `dev == ${d}`).join(' || ');
    const dir = path.join(root, 'instances', name);
    const sdir = o.shadow === false ? null : dir + SHADOW_SUFFIX;

    let resumed = false;
    const sole: string[] = [];
    const expectOf = (d: string): Expected => ({ filter, bufferKb: readBufferKb(d), requestedKb: bufferKb, ino: fs.statSync(d, { bigint: true }).ino });
    let ex: Expected;
    let sex: Expected | null = null;
    try {
      if (fs.existsSync(dir)) {
        if (sameSetup(dir, filter)) resumed = true;
        else fs.rmdirSync(dir); // ours (we hold its lock) but set up differently: recreated below
      }
      if (sdir === null) {
        // a shadow kept by an earlier user of this name records for nothing
        if (fs.existsSync(dir + SHADOW_SUFFIX)) fs.rmdirSync(dir + SHADOW_SUFFIX);
      } else {
        const keepShadow = resumed && fs.existsSync(sdir) && sameSetup(sdir, filter);
        if (!keepShadow && fs.existsSync(sdir)) fs.rmdirSync(sdir);
        if (!keepShadow) {
          // created before a new instance, so it holds everything the instance will: only its own head start is its alone
          setUpInstance(sdir, bufferKb, filter);
          sole.push(resumed ? PRIMARY.name : SHADOW.name);
        }
        sex = expectOf(sdir);
      }
      // a resumed instance keeps its buffer size (resizing would discard what it recorded meanwhile)
      if (!resumed) setUpInstance(dir, bufferKb, filter);
      ex = expectOf(dir);
    } catch (err) {
      releaseInstanceLock(name, lockDir);
      throw trackerError(name, `cannot set up instance ${dir}`, err);
    }
    let primary: Instance | undefined;
    try {
      primary = new Instance(dir, 'trace instance', ex, openPipe(dir));
      const shadow = sdir === null ? null : new Instance(sdir, 'shadow trace instance', sex!, openPipe(sdir));
      return new TracefsTracker(name, resumed, mapped, primary, shadow, sole, lockDir);
    } catch (err) {
      primary?.closeFd();
      releaseInstanceLock(name, lockDir);
      throw trackerError(name, `cannot open the trace_pipe of ${dir}${sdir ? ` or ${sdir}` : ''}`, err);
    }
  }

  /** The instance's identity (its inode): a removed and recreated instance has another one. */
  get identity(): string { return String(this.primary.expected.ino); }

  private get instances(): Instance[] { return this.shadow ? [this.primary, this.shadow] : [this.primary]; }

  /**
   * Is tracking live as open() set it up? Returns null when it is, else what differs
   * (e.g. "events/block/block_rq_complete/enable is 0"; for the shadow instance, with its
   * name). Anyone with root can switch an instance off under us; the caller checks every
   * second and inside every cut's freeze, and treats any difference as lost tracking
   * (resync). Cheap: a few sysfs reads.
   */
  selfCheck(): string | null {
    for (const i of this.instances) {
      const p = i.problem();
      if (p) return p;
    }
    return null;
  }

  /**
   * Puts tracking back as open() set it up after selfCheck() found a difference: re-arms
   * the settings in place, or recreates an instance (and reopens its trace_pipe) when it was
   * removed or replaced. Events recorded before the repair may be incomplete: the caller
   * must rescan. Throws MOB_ERR_TRACKER when it cannot.
   */
  repair(): void {
    if (this.closed) throw trackerError(this.name, 'repair() after close()');
    let which = this.primary;
    try {
      // the shadow first: when both are recreated, it holds everything the new instance will
      for (const i of this.shadow ? [this.shadow, this.primary] : [this.primary]) {
        which = i;
        // a copy that was off (or recreated after its twin) lacks some of the twin's events
        const twin = i === this.shadow ? PRIMARY.name : SHADOW.name;
        const wasOff = i.fd === null || i.problem() !== null;
        if ((i.repair() || wasOff) && this.shadow) {
          if (!this.sole.includes(twin)) this.sole.push(twin);
          this.parseShadow = true;
          this.shadow.partial = '';
        }
      }
    } catch (err) {
      throw trackerError(this.name, `cannot repair instance ${which.dir}`, err);
    }
  }

  /**
   * Reads everything currently in trace_pipe (the instance's, then the shadow's) without
   * blocking and returns the modified extents (merged per disk, sorted by disk and offset).
   * A partial trailing line is kept for the next call. Events are consumed: they are not
   * delivered again, even to another tracker on the same instance. Every read is reported
   * to the journal, before and after, with the copy it read (see the file head).
   */
  drain(journal?: DrainJournal): DirtyExtent[] {
    if (this.instances.some((i) => i.fd === null)) throw trackerError(this.name, 'drain() without an open trace_pipe (closed, or a repair failed)');
    if (journal?.soleHolder) {
      for (const name of this.sole) journal.soleHolder(name);
      this.sole = [];
    }
    const out: DirtyExtent[] = [];
    this.drainOne(this.primary, this.shadow ? PRIMARY : undefined, out, journal, true);
    if (this.shadow && this.drainOne(this.shadow, SHADOW, out, journal, this.parseShadow)) this.parseShadow = false;
    return coalesceExtents(out);
  }

  /** Reads one instance until it is empty (returns true) or MAX_DRAIN_BYTES were read (false); parse = false: journal only. */
  private drainOne(inst: Instance, source: DrainSource | undefined, out: DirtyExtent[], journal: DrainJournal | undefined, parse: boolean): boolean {
    const fd = inst.fd!;
    let text = inst.partial;
    let total = 0;
    let empty = false;
    for (;;) {
      let n: number;
      journal?.beforeRead(source);
      try {
        n = fs.readSync(fd, this.buf, 0, this.buf.length, null);
      } catch (err) {
        const code = (err as NodeJS.ErrnoException).code;
        if (code === 'EAGAIN' || code === 'EWOULDBLOCK') { journal?.afterRead(this.buf.subarray(0, 0)); empty = true; break; }
        if (code === 'EINTR') { journal?.afterRead(this.buf.subarray(0, 0)); continue; }
        throw trackerError(this.name, `reading ${inst.dir}/trace_pipe failed`, err);
      }
      // persisted before anything else happens: events out of the kernel are never only in memory
      journal?.afterRead(this.buf.subarray(0, n));
      if (n === 0) { empty = true; break; }
      if (parse) text += inst.decoder.write(this.buf.subarray(0, n));
      total += n;
      if (total >= MAX_DRAIN_BYTES) break;
    }
    if (!parse) return empty;
    const nl = text.lastIndexOf('\n');
    inst.partial = nl < 0 ? text : text.slice(nl + 1);
    if (nl < 0) return empty;
    for (const line of text.slice(0, nl).split('\n')) this.parseLine(line, out);
    return empty;
  }

  /** Extents of raw trace text kept by a journal (replay after the agent died mid-drain). */
  parseText(text: string): DirtyExtent[] {
    const out: DirtyExtent[] = [];
    for (const line of text.split('\n')) this.parseLine(line, out);
    return coalesceExtents(out);
  }

  private parseLine(line: string, out: DirtyExtent[]): void {
    const m = EVENT_RE.exec(line);
    if (!m) {
      if (LOST_RE.test(line)) this.lost++;
      return;
    }
    const rwbs = m[3]!;
    if (!/[WDNZ]/.test(rwbs)) return; // reads and flush-only requests
    const sectors = Number(m[5]);
    if (sectors === 0) return;
    const specs = this.byParent.get(`${m[1]},${m[2]}`);
    if (!specs) return;
    const begin = Number(m[4]) * 512;
    const end = begin + sectors * 512;
    for (const s of specs) {
      const lo = Math.max(begin, s.startByte);
      const hi = Math.min(end, s.startByte + s.sizeBytes);
      if (hi > lo) out.push({ disk: s.index, offset: lo - s.startByte, length: hi - lo });
    }
  }

  /**
   * Current loss counters: overrun (incl. commit overrun) and dropped events summed over all
   * CPUs of the instance and its shadow (a loss in either is a loss: the shadow is what a cut-short
   * read is recovered from), plus LOST lines seen.
   */
  counters(): LossCounters {
    let overrun = 0;
    let dropped = 0;
    for (const i of this.instances) {
      const perCpu = path.join(i.dir, 'per_cpu');
      try {
        for (const cpu of fs.readdirSync(perCpu)) {
          if (!/^cpu\d+$/.test(cpu)) continue;
          const stats = fs.readFileSync(path.join(perCpu, cpu, 'stats'), 'utf8');
          const num = (re: RegExp) => Number(re.exec(stats)?.[1] ?? 0);
          overrun += num(/^overrun: (\d+)/m) + num(/^commit overrun: (\d+)/m);
          dropped += num(/^dropped events: (\d+)/m);
        }
      } catch (err) {
        throw trackerError(this.name, `cannot read ${perCpu}/cpu*/stats`, err);
      }
    }
    return { overrun, dropped, lostNotices: this.lost };
  }

  /**
   * keep = true: close our descriptors and leave the instances recording (agent
   * stop/upgrade); the next open() with the same name and disks resumes them.
   * keep = false (default): remove the instance and its shadow.
   */
  close(o?: { keep?: boolean }): void {
    this.closed = true;
    for (const i of this.instances) i.closeFd();
    try {
      if (!o?.keep) {
        removeInstanceDir(this.name, this.primary.dir);
        removeInstanceDir(this.name, this.primary.dir + SHADOW_SUFFIX);
      }
    } finally {
      releaseInstanceLock(this.name, this.lockDir);
    }
  }

  /**
   * Removes a kept instance and its shadow without opening them (protection disabled, or uninstall).
   * MOB_ERR_TRACKER_BUSY while a live agent holds it: it is never disabled under its user.
   */
  static remove(name: string, tracefsRoot?: string, lockDir?: string): void {
    // a shadow named on its own (a sweep of every instance of an agent) is locked with its instance
    assertInstanceFree(name.endsWith(SHADOW_SUFFIX) ? name.slice(0, -SHADOW_SUFFIX.length) : name, 'remove', lockDir);
    const dir = path.join(tracefsRoot ?? DEFAULT_TRACEFS, 'instances', name);
    removeInstanceDir(name, dir);
    removeInstanceDir(name, dir + SHADOW_SUFFIX);
  }
}

function removeInstanceDir(name: string, dir: string): void {
  if (!fs.existsSync(dir)) return;
  try {
    // rmdir alone: the kernel disables the instance's events as it removes it. Disabling first
    // would leave a disabled instance behind whenever the rmdir is refused (EBUSY: a reader holds
    // trace_pipe), switching tracking off under whoever reads it.
    fs.rmdirSync(dir);
  } catch (err) {
    throw trackerError(name, `cannot remove instance ${dir}`, err);
  }
}
