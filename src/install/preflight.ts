/**
 * Preflight checks: can this machine run the agent, and can it protect these
 * disks? Called by the CLI before install (install.sh runs it) and by the agent
 * before it enables replication of a disk (the server asks).
 *
 * Contract: runPreflight never throws for a failing check. Every check gives a
 * PreflightCheck; a failed one carries a stable MOB_ERR_PRE_* code, a message
 * saying what is wrong and a fix saying what to do. An unexpected exception in
 * a check becomes a failed check with that check's code and the error text.
 * It throws (MOB_ERR_USAGE) only for bad options: an unknown id in `only`, a
 * server URL that is not ws/wss/http/https.
 *
 * Side effects: the tracefs check creates and removes one empty ftrace instance
 * (`mobility-preflight-<pid>`); the disk checks open each disk read-only and
 * close it. Nothing else is written. Idempotent; safe to run while the agent runs.
 */
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import http from 'node:http';
import https from 'node:https';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { MiB } from '../constants.js';
import { MobilityError, type ErrorCode } from '../errors.js';

export interface PreflightCheck {
  /** `root`, `os`, `node`, `disk-space`, `tracefs`, `server-port`, `clock`, or `disk:<path>`. */
  id: string;
  ok: boolean;
  /** Set when ok is false. */
  code?: ErrorCode;
  /** What was found (for a failure: what is wrong). */
  message: string;
  /** For a failure: how to fix it. */
  fix?: string;
  /** How long the check took. */
  ms: number;
}

export interface PreflightOptions {
  /** wss://host:port (or https://); when given, reachability and clock skew are checked. */
  serverUrl?: string;
  /** Agent state directory (may not exist yet: check the nearest existing ancestor's filesystem). */
  stateDir: string;
  /** Disks (device paths) about to be protected. */
  disks?: string[];
  minFreeBytes?: number;     // default 512 MiB
  maxDiskBytes?: number;     // default 32 TiB
  maxSkewMs?: number;        // default 30_000
  timeoutMs?: number;        // network probes, default 5_000
  tracefsRoot?: string;      // default: /sys/kernel/tracing, falling back to /sys/kernel/debug/tracing
  /** Which checks to run (ids; `disk` selects every `disk:<path>`); default all that apply. */
  only?: string[];
}

export const PREFLIGHT_DEFAULTS = {
  minFreeBytes: 512 * MiB,
  maxDiskBytes: 32 * 1024 * 1024 * MiB,
  maxSkewMs: 30_000,
  timeoutMs: 5_000,
  /** Oldest kernel whose block_rq_complete event carries the sector information the tracker needs. */
  minKernel: [4, 14] as const,
  minNodeMajor: 20,
  /** Largest /v1/time answer read. */
  maxTimeBodyBytes: 64 * 1024,
} as const;

const CHECK_IDS = ['root', 'os', 'node', 'disk-space', 'tracefs', 'server-port', 'clock', 'disk'] as const;
const TRACEFS_ROOTS = ['/sys/kernel/tracing', '/sys/kernel/debug/tracing'];
const RQ_COMPLETE_ENABLE = path.join('events', 'block', 'block_rq_complete', 'enable');

/** A check's failure, thrown inside a check body and turned into its result. */
class CheckFailure extends Error {
  constructor(readonly code: ErrorCode, message: string, readonly fix: string) {
    super(message);
  }
}

type Outcome = { message: string } | CheckFailure;

/** Runs one check body, timing it; turns failures and unexpected exceptions into a failed check. */
async function runCheck(id: string, code: ErrorCode, fix: string, body: () => Promise<string>): Promise<PreflightCheck> {
  const start = performance.now();
  let out: Outcome;
  try {
    out = { message: await body() };
  } catch (err) {
    out = err instanceof CheckFailure ? err : new CheckFailure(code, `${id} check failed unexpectedly: ${(err as Error)?.message ?? String(err)}`, fix);
  }
  const ms = Math.round((performance.now() - start) * 10) / 10;
  if (!(out instanceof CheckFailure)) return { id, ok: true, message: out.message, ms };
  return { id, ok: false, code: out.code, message: out.message, fix: out.fix, ms };
}

export async function runPreflight(opts: PreflightOptions): Promise<PreflightCheck[]> {
  const o = {
    minFreeBytes: opts.minFreeBytes ?? PREFLIGHT_DEFAULTS.minFreeBytes,
    maxDiskBytes: opts.maxDiskBytes ?? PREFLIGHT_DEFAULTS.maxDiskBytes,
    maxSkewMs: opts.maxSkewMs ?? PREFLIGHT_DEFAULTS.maxSkewMs,
    timeoutMs: opts.timeoutMs ?? PREFLIGHT_DEFAULTS.timeoutMs,
  };
  const only = opts.only === undefined ? null : new Set(opts.only);
  if (only) {
    for (const id of only) {
      if (!(CHECK_IDS as readonly string[]).includes(id) && !id.startsWith('disk:')) {
        throw new MobilityError('MOB_ERR_USAGE', `unknown preflight check '${id}' (known: ${CHECK_IDS.join(', ')}, disk:<path>)`);
      }
    }
  }
  const wanted = (id: string) => only === null || only.has(id) || (id.startsWith('disk:') && only.has('disk'));
  const server = opts.serverUrl === undefined ? null : parseServerUrl(opts.serverUrl);

  const jobs: Promise<PreflightCheck[]>[] = [];
  const one = (p: Promise<PreflightCheck>) => jobs.push(p.then((c) => [c]));
  if (wanted('root')) one(checkRoot());
  if (wanted('os')) one(checkOs());
  if (wanted('node')) one(checkNode());
  if (wanted('disk-space')) one(checkDiskSpace(opts.stateDir, o.minFreeBytes));
  if (wanted('tracefs')) one(checkTracefs(opts.tracefsRoot));
  if (server && (wanted('server-port') || wanted('clock'))) {
    jobs.push((async () => {
      const out: PreflightCheck[] = [];
      let reachable = true;
      if (wanted('server-port')) {
        const port = await checkServerPort(server, o.timeoutMs);
        out.push(port);
        reachable = port.ok;
      }
      // with the port reported unreachable, a clock failure would only repeat it
      if (wanted('clock') && reachable) out.push(await checkClock(server, o.maxSkewMs, o.timeoutMs));
      return out;
    })());
  }
  for (const disk of opts.disks ?? []) {
    if (wanted(`disk:${disk}`)) one(checkDisk(disk, o.maxDiskBytes));
  }
  return (await Promise.all(jobs)).flat();
}

/** null when every check passed; else one MOB_ERR_PREFLIGHT listing each failure's code, message and fix. */
export function preflightError(checks: PreflightCheck[]): MobilityError | null {
  const failed = checks.filter((c) => !c.ok);
  if (failed.length === 0) return null;
  const lines = failed.map((c) => `  ${c.id}: ${c.code ?? 'MOB_ERR_PREFLIGHT'}: ${c.message}${c.fix ? ` (fix: ${c.fix})` : ''}`);
  return new MobilityError('MOB_ERR_PREFLIGHT', `${failed.length} of ${checks.length} preflight checks failed:\n${lines.join('\n')}`);
}

/**
 * One line per check, in the order given, each ending with a newline (so whatever is printed
 * next starts a line of its own): "ok    root  running as root" / "FAIL  tracefs  MOB_ERR_PRE_NO_TRACEFS: ... (fix: ...)".
 */
export function formatPreflight(checks: PreflightCheck[]): string {
  return checks.map((c) => {
    const head = `${c.ok ? 'ok  ' : 'FAIL'}  ${c.id}  `;
    const body = c.ok ? c.message : `${c.code ?? 'MOB_ERR_PREFLIGHT'}: ${c.message}${c.fix ? ` (fix: ${c.fix})` : ''}`;
    return (head + body.replace(/\n/g, ' ')).trimEnd() + '\n';
  }).join('');
}

// ---------------------------------------------------------------------------
// host checks

/** The effective uid, which the kernel's permission checks use (undefined off POSIX). */
function euid(): number | undefined {
  return process.geteuid?.() ?? process.getuid?.();
}

function checkRoot(): Promise<PreflightCheck> {
  const fix = 'run the installer and the agent as root (sudo)';
  return runCheck('root', 'MOB_ERR_PRE_NOT_ROOT', fix, async () => {
    const uid = euid();
    if (uid !== 0) throw new CheckFailure('MOB_ERR_PRE_NOT_ROOT', `running as uid ${uid ?? '?'}, not root: the agent reads block devices and tracefs`, fix);
    return 'running as root';
  });
}

/** What a refused system call was: "mkdir /sys/kernel/tracing/instances/x failed with EPERM". */
function refusedCall(err: NodeJS.ErrnoException): string {
  const what = err.syscall && err.path ? `${err.syscall} ${err.path}` : err.path ?? err.syscall ?? 'the operation';
  return `${what} failed with ${err.code ?? 'an error'} (${err.code === 'EPERM' ? 'operation not permitted' : err.code === 'EACCES' ? 'permission denied' : err.message})`;
}

/** Why the kernel may refuse root here, as far as this machine tells: lockdown mode, a container. */
async function rootRefusalHints(): Promise<string[]> {
  const hints: string[] = [];
  const lockdown = await fsp.readFile('/sys/kernel/security/lockdown', 'utf8').catch(() => '');
  const mode = /\[(\w+)\]/.exec(lockdown)?.[1];
  if (mode && mode !== 'none') hints.push(`the kernel is locked down (${mode})`);
  const container = process.env.container !== undefined || (await exists('/.dockerenv').catch(() => false)) || (await exists('/run/.containerenv').catch(() => false));
  if (container) hints.push('this looks like a container');
  return hints;
}

function checkOs(): Promise<PreflightCheck> {
  const [kMaj, kMin] = PREFLIGHT_DEFAULTS.minKernel;
  const fix = `use Linux on x64 or arm64 with kernel ${kMaj}.${kMin} or newer`;
  return runCheck('os', 'MOB_ERR_PRE_OS_UNSUPPORTED', fix, async () => {
    const fail = (m: string) => new CheckFailure('MOB_ERR_PRE_OS_UNSUPPORTED', m, fix);
    if (process.platform !== 'linux') throw fail(`platform ${process.platform} is not supported (Linux only)`);
    if (process.arch !== 'x64' && process.arch !== 'arm64') throw fail(`architecture ${process.arch} is not supported (x64, arm64)`);
    const release = os.release();
    const m = /^(\d+)\.(\d+)/.exec(release);
    if (!m) throw fail(`cannot parse kernel release '${release}'`);
    const major = Number(m[1]);
    const minor = Number(m[2]);
    if (major < kMaj || (major === kMaj && minor < kMin)) {
      throw fail(`kernel ${release} is older than ${kMaj}.${kMin} (its block_rq_complete events lack the sector information change tracking needs)`);
    }
    return `linux ${process.arch}, kernel ${release}`;
  });
}

function checkNode(): Promise<PreflightCheck> {
  const min = PREFLIGHT_DEFAULTS.minNodeMajor;
  const fix = `install Node.js ${min} or newer (e.g. from nodesource or the distribution's nodejs ${min}+ package)`;
  return runCheck('node', 'MOB_ERR_PRE_NODE_VERSION', fix, async () => {
    const v = process.versions.node;
    if (Number(v.split('.')[0]) < min) throw new CheckFailure('MOB_ERR_PRE_NODE_VERSION', `Node.js ${v} is older than ${min}`, fix);
    return `Node.js ${v}`;
  });
}

function checkDiskSpace(stateDir: string, minFreeBytes: number): Promise<PreflightCheck> {
  const fix = `free space on the filesystem holding ${stateDir}, or choose another --state-dir`;
  return runCheck('disk-space', 'MOB_ERR_PRE_LOW_DISK', fix, async () => {
    let dir = path.resolve(stateDir);
    let st: fs.BigIntStatsFs;
    for (;;) {
      try {
        st = await fsp.statfs(dir, { bigint: true });
        break;
      } catch (err) {
        const parent = path.dirname(dir);
        if ((err as NodeJS.ErrnoException).code !== 'ENOENT' || parent === dir) throw err;
        dir = parent;
      }
    }
    const free = Number(st.bavail * st.bsize);
    const where = dir === path.resolve(stateDir) ? dir : `${dir} (nearest existing ancestor of ${stateDir})`;
    if (free < minFreeBytes) {
      throw new CheckFailure('MOB_ERR_PRE_LOW_DISK', `${fmtBytes(free)} free at ${where}, ${fmtBytes(minFreeBytes)} needed`, fix);
    }
    return `${fmtBytes(free)} free at ${where} (${fmtBytes(minFreeBytes)} needed)`;
  });
}

function checkTracefs(explicitRoot: string | undefined): Promise<PreflightCheck> {
  const mountFix = 'mount -t tracefs nodev /sys/kernel/tracing (and add it to /etc/fstab so it survives a reboot)';
  return runCheck('tracefs', 'MOB_ERR_PRE_NO_TRACEFS', mountFix, async () => {
    try {
      return await probeTracefs(explicitRoot, mountFix);
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code === 'EACCES' || code === 'EPERM') {
        // tracefs is mode 0700: anyone but root sees EACCES, not a missing file
        if (euid() !== 0) throw new CheckFailure('MOB_ERR_PRE_NOT_ROOT', `tracefs is not accessible: ${(err as Error).message}`, 'run the agent as root (sudo)');
        // root refused: running as root is not the fix; say what the kernel refused and why it may have
        const hints = await rootRefusalHints();
        throw new CheckFailure('MOB_ERR_PRE_NO_TRACEFS',
          `tracefs refused root: ${refusedCall(err as NodeJS.ErrnoException)}${hints.length ? `; ${hints.join(', ')}` : ''}`,
          'in a container, run it privileged, or with CAP_SYS_ADMIN and the host\'s tracefs mounted read-write (mount -t tracefs nodev /sys/kernel/tracing); '
          + 'under kernel lockdown in confidentiality mode (cat /sys/kernel/security/lockdown) tracefs is closed to everyone: boot with lockdown=integrity (or none) where the kernel\'s configuration allows it; '
          + 'otherwise a security module (SELinux, AppArmor) denies it: see the audit log');
      }
      throw err;
    }
  });
}

let probeSeq = 0;

async function probeTracefs(explicitRoot: string | undefined, mountFix: string): Promise<string> {
  const fail = (m: string, fix = mountFix) => new CheckFailure('MOB_ERR_PRE_NO_TRACEFS', m, fix);
  const candidates = explicitRoot !== undefined ? [explicitRoot] : TRACEFS_ROOTS;
  let root: string | undefined;
  for (const c of candidates) {
    // a mounted tracefs always has 'events'; an unmounted mount point is an empty directory
    if (await exists(path.join(c, 'events'))) { root = c; break; }
  }
  if (root === undefined) throw fail(`tracefs is not mounted (looked at ${candidates.join(', ')})`);
  if (!(await exists(path.join(root, RQ_COMPLETE_ENABLE)))) {
    throw fail(`${root} has no ${RQ_COMPLETE_ENABLE}: the kernel lacks block tracepoints`, 'use a kernel built with CONFIG_BLK_DEV_IO_TRACE / block tracepoints (all distribution kernels have them)');
  }
  const instances = path.join(root, 'instances');
  if (!(await exists(instances))) {
    throw fail(`${root} has no 'instances' directory: private ftrace instances are not supported`, 'use a kernel with ftrace instances (3.10 or newer, CONFIG_TRACING)');
  }
  // unique per call: the agent may run preflights for two disks at once
  const probe = path.join(instances, `mobility-preflight-${process.pid}-${++probeSeq}`);
  try {
    await fsp.mkdir(probe);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'EACCES' || code === 'EPERM') throw err;
    if (code !== 'EEXIST') throw fail(`cannot create a tracefs instance in ${instances}: ${(err as Error).message}`);
    // left behind by a killed preflight of an earlier process with the same pid: remove it and retry once
    await removeInstance(probe);
    await fsp.mkdir(probe);
  }
  let hasEvents: boolean;
  try {
    hasEvents = await exists(path.join(probe, RQ_COMPLETE_ENABLE));
  } finally {
    await removeInstance(probe);
  }
  if (!hasEvents) throw fail(`a new tracefs instance in ${instances} has no ${RQ_COMPLETE_ENABLE}`, 'use a kernel with block tracepoints in ftrace instances');
  return `${root}: block_rq_complete available, instances can be created`;
}

/** rmdir of an instance; the kernel may answer EBUSY for a moment while a reader closes. */
async function removeInstance(dir: string): Promise<void> {
  for (let attempt = 0; ; attempt++) {
    try {
      await fsp.rmdir(dir);
      return;
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code === 'ENOENT') return;
      if (code !== 'EBUSY' || attempt >= 20) throw err;
      await new Promise((r) => setTimeout(r, 50));
    }
  }
}

// ---------------------------------------------------------------------------
// server checks

interface ServerTarget { url: string; host: string; port: number; secure: boolean; origin: string }

function parseServerUrl(s: string): ServerTarget {
  let u: URL;
  try {
    u = new URL(s);
  } catch {
    throw new MobilityError('MOB_ERR_USAGE', `server URL '${s}' is not a URL (expected wss://host:port)`);
  }
  const secure = u.protocol === 'wss:' || u.protocol === 'https:';
  if (!secure && u.protocol !== 'ws:' && u.protocol !== 'http:') {
    throw new MobilityError('MOB_ERR_USAGE', `server URL '${s}' has scheme ${u.protocol} (expected wss://, ws://, https:// or http://)`);
  }
  // the port the agent's WebSocket client would use: an explicit one, else the scheme's default
  const port = u.port === '' ? (secure ? 443 : 80) : Number(u.port);
  const host = u.hostname.replace(/^\[|\]$/g, '');
  const origin = `${secure ? 'https' : 'http'}://${u.host}`;
  return { url: s, host, port, secure, origin };
}

function checkServerPort(server: ServerTarget, timeoutMs: number): Promise<PreflightCheck> {
  const fix = `check that the server is running and listening on ${server.host}:${server.port} (its --listen address: 127.0.0.1 accepts local agents only) and that no firewall blocks TCP port ${server.port} between this machine and the server`;
  return runCheck('server-port', 'MOB_ERR_PRE_UNREACHABLE', fix, async () => {
    try {
      await tcpConnect(server.host, server.port, timeoutMs);
    } catch (err) {
      throw new CheckFailure('MOB_ERR_PRE_UNREACHABLE', `cannot connect to ${server.host}:${server.port}: ${(err as Error).message}`, fix);
    }
    return `${server.host}:${server.port} accepts connections`;
  });
}

function tcpConnect(host: string, port: number, timeoutMs: number): Promise<void> {
  return new Promise((resolve, reject) => {
    const sock = net.connect({ host, port });
    const timer = setTimeout(() => done(new Error(`no answer within ${timeoutMs} ms`)), timeoutMs);
    const done = (err?: Error) => {
      clearTimeout(timer);
      sock.destroy();
      if (err) reject(err); else resolve();
    };
    sock.once('connect', () => done());
    sock.once('error', (err) => done(err));
  });
}

function checkClock(server: ServerTarget, maxSkewMs: number, timeoutMs: number): Promise<PreflightCheck> {
  const fix = 'synchronise the clocks of this machine and the server with NTP (timedatectl set-ntp true, or install and enable chrony)';
  return runCheck('clock', 'MOB_ERR_PRE_CLOCK_SKEW', fix, async () => {
    const timeUrl = `${server.origin}/v1/time`;
    let r: TimeAnswer;
    try {
      r = await fetchTime(timeUrl, server.secure, timeoutMs);
    } catch (err) {
      throw new CheckFailure('MOB_ERR_PRE_UNREACHABLE', `cannot read the server's time from ${timeUrl}: ${(err as Error).message}`,
        `check that ${server.origin} is a Mobility server (the port answers, but not its HTTP${server.secure ? 'S' : ''} endpoint)`);
    }
    const mid = (r.sentAt + r.receivedAt) / 2;
    let skew: number;
    let source: string;
    if (r.nowMs !== null) {
      skew = r.nowMs - mid;
      source = '/v1/time';
    } else if (r.dateMs !== null) {
      // the Date header truncates to the second: the server's time lies in [date, date + 1 s)
      skew = mid < r.dateMs ? r.dateMs - mid : mid >= r.dateMs + 1000 ? r.dateMs + 1000 - mid : 0;
      source = 'Date header';
    } else {
      throw new CheckFailure('MOB_ERR_PRE_CLOCK_SKEW', `${timeUrl} answered HTTP ${r.status} without {"nowMs"} or a Date header: the server's time is unknown`,
        'upgrade the server to a version that answers GET /v1/time');
    }
    const desc = `server clock is ${fmtMs(Math.abs(skew))} ${skew >= 0 ? 'ahead of' : 'behind'} this machine (${source}, round trip ${fmtMs(r.receivedAt - r.sentAt)}, at most ${fmtMs(maxSkewMs)} allowed)`;
    if (Math.abs(skew) > maxSkewMs) throw new CheckFailure('MOB_ERR_PRE_CLOCK_SKEW', desc, fix);
    return desc;
  });
}

interface TimeAnswer { status: number; nowMs: number | null; dateMs: number | null; sentAt: number; receivedAt: number }

/**
 * GET <origin>/v1/time. The certificate is not checked on purpose: this probe
 * sends nothing secret and only reads a time; the agent's real connection pins.
 */
function fetchTime(url: string, secure: boolean, timeoutMs: number): Promise<TimeAnswer> {
  return new Promise((resolve, reject) => {
    const sentAt = Date.now();
    let settled = false;
    const finish = (err: Error | null, v?: TimeAnswer) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      req.destroy();
      if (err) reject(err); else resolve(v!);
    };
    const reqOpts: https.RequestOptions = { method: 'GET', agent: false, headers: { accept: 'application/json' } };
    if (secure) reqOpts.rejectUnauthorized = false;
    const req = (secure ? https : http).request(url, reqOpts, (res) => {
      const receivedAt = Date.now();
      const date = res.headers.date === undefined ? NaN : Date.parse(res.headers.date);
      const dateMs = Number.isFinite(date) ? date : null;
      const parts: Buffer[] = [];
      let size = 0;
      res.on('data', (c: Buffer) => {
        size += c.length;
        if (size > PREFLIGHT_DEFAULTS.maxTimeBodyBytes) {
          finish(null, { status: res.statusCode ?? 0, nowMs: null, dateMs, sentAt, receivedAt });
          return;
        }
        parts.push(c);
      });
      res.on('error', (err) => finish(err));
      res.on('end', () => {
        let nowMs: number | null = null;
        try {
          const v = JSON.parse(Buffer.concat(parts).toString('utf8')) as { nowMs?: unknown } | null;
          if (typeof v?.nowMs === 'number' && Number.isFinite(v.nowMs)) nowMs = v.nowMs;
        } catch {
          // not JSON: fall back to the Date header
        }
        finish(null, { status: res.statusCode ?? 0, nowMs, dateMs, sentAt, receivedAt });
      });
    });
    const timer = setTimeout(() => finish(new Error(`no answer within ${timeoutMs} ms`)), timeoutMs);
    req.on('error', (err) => finish(err));
    req.end();
  });
}

// ---------------------------------------------------------------------------
// disk checks

function checkDisk(disk: string, maxDiskBytes: number): Promise<PreflightCheck> {
  const id = `disk:${disk}`;
  const notFoundFix = `give the path of an existing block device (see lsblk), e.g. /dev/sdb or /dev/disk/by-id/...`;
  return runCheck(id, 'MOB_ERR_PRE_DISK_NOT_FOUND', notFoundFix, async () => {
    const notFound = (m: string) => new CheckFailure('MOB_ERR_PRE_DISK_NOT_FOUND', m, notFoundFix);
    let st: fs.BigIntStats;
    try {
      st = await fsp.stat(disk, { bigint: true });
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code === 'ENOENT' || code === 'ENOTDIR') throw notFound(`${disk} does not exist`);
      throw notFound(`cannot stat ${disk}: ${(err as Error).message}`);
    }
    if (!st.isBlockDevice()) throw notFound(`${disk} is not a block device (it is ${describeType(st)})`);
    try {
      const fh = await fsp.open(disk, fs.constants.O_RDONLY);
      await fh.close();
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code === 'EACCES' || code === 'EPERM') {
        if (euid() !== 0) throw new CheckFailure('MOB_ERR_PRE_NOT_ROOT', `cannot open ${disk} for reading (${code})`, 'run the agent as root (sudo)');
        const hints = await rootRefusalHints();
        throw new CheckFailure('MOB_ERR_PRE_DISK_NOT_FOUND', `${disk} cannot be opened by root: ${refusedCall(err as NodeJS.ErrnoException)}${hints.length ? `; ${hints.join(', ')}` : ''}`,
          'in a container, give it the device (docker run --device, or a device cgroup rule allowing it); otherwise a security module (SELinux, AppArmor) denies it: see the audit log');
      }
      throw notFound(`cannot open ${disk} for reading: ${(err as Error).message}`);
    }
    const size = await blockDeviceSize(disk, st.rdev);
    const sizeFix = `protect a disk of at most ${fmtBytes(maxDiskBytes)} whose size is a non-zero multiple of 512 bytes`;
    if (size <= 0) throw new CheckFailure('MOB_ERR_PRE_DISK_SIZE', `${disk} is empty (size 0: no medium, or a detached loop device)`, sizeFix);
    if (size % 512 !== 0) throw new CheckFailure('MOB_ERR_PRE_DISK_SIZE', `${disk} is ${size} bytes, not a multiple of 512`, sizeFix);
    if (size > maxDiskBytes) throw new CheckFailure('MOB_ERR_PRE_DISK_SIZE', `${disk} is ${fmtBytes(size)}, above the supported ${fmtBytes(maxDiskBytes)}`, sizeFix);
    return `${disk}: block device, ${fmtBytes(size)}`;
  });
}

/**
 * Size in bytes from sysfs (512-byte sectors, whatever the logical block size):
 * /sys/class/block/<name of the resolved path>/size, else by device number
 * (a node whose name differs from the kernel's, e.g. made with mknod).
 */
async function blockDeviceSize(disk: string, rdev: bigint): Promise<number> {
  const name = path.basename(await fsp.realpath(disk));
  const major = Number(((rdev >> 8n) & 0xfffn) | ((rdev >> 32n) & ~0xfffn));
  const minor = Number((rdev & 0xffn) | ((rdev >> 12n) & ~0xffn));
  for (const f of [`/sys/class/block/${name}/size`, `/sys/dev/block/${major}:${minor}/size`]) {
    let text: string;
    try {
      text = await fsp.readFile(f, 'utf8');
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') continue;
      throw err;
    }
    const sectors = Number(text.trim());
    if (!/^\d+$/.test(text.trim()) || !Number.isSafeInteger(sectors * 512)) throw new Error(`unexpected content of ${f}: '${text.trim()}'`);
    return sectors * 512;
  }
  throw new Error(`no sysfs entry for ${disk} (${major}:${minor}) under /sys/class/block or /sys/dev/block`);
}

// ---------------------------------------------------------------------------
// helpers

/** false for a missing path; throws anything else (EACCES: not root). */
async function exists(p: string): Promise<boolean> {
  try {
    await fsp.access(p);
    return true;
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOENT' || code === 'ENOTDIR') return false;
    throw err;
  }
}

function describeType(st: fs.BigIntStats): string {
  if (st.isFile()) return 'a regular file';
  if (st.isDirectory()) return 'a directory';
  if (st.isCharacterDevice()) return 'a character device';
  if (st.isFIFO()) return 'a FIFO';
  if (st.isSocket()) return 'a socket';
  return 'not a block device';
}

function fmtBytes(n: number): string {
  const u = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB', 'EiB'];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return `${i ? n.toFixed(1) : n.toFixed(0)} ${u[i]}`;
}

function fmtMs(ms: number): string {
  return ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(1)} s`;
}
