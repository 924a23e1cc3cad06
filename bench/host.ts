/**
 * Benchmark: host-mode continuous protection of a qcow2 disk under a paced guest write load, and
 * what protection costs the guest (issue 13: "data lag p50/p99 and the guest-visible write latency
 * with and without protection, in the same run").
 *
 * Setup (untimed): a qcow2 image of BENCH_HOST_SIZE (default 2G) served by a real
 * qemu-storage-daemon (block node disk0, QMP socket, writable NBD export guest0, as in the host-mode
 * e2e test); its first BENCH_HOST_HOT bytes (default 256M, the hot set) are written once with
 * random data, so that every timed write overwrites allocated clusters instead of measuring qcow2
 * cluster allocation.
 *
 * The guest: BENCH_HOST_JOBS (default 4) qemu-io processes, each with its own NBD connection to
 * guest0, each writing 64 KiB blocks of random (incompressible) data at random 64 KiB-aligned
 * offsets inside the hot set, one write at a time (queue depth 1 per process), paced together to
 * BENCH_RATE MiB/s (default 50) for BENCH_SECONDS (default 60). Commands go through qemu-io's
 * stdin, the next one when the previous one's result came back: every 20 ms a writer that has
 * finished its previous batch is given the writes it owes by then (at most one second's worth at
 * once: a writer that fell behind catches up, as fio's --rate does).
 * Each `write -C` prints "bytes,ops,time,bytes/s,ops/s": the guest-visible latency of that write
 * is 1000 / ops/s ms (qemu-io times the write alone, not the command parsing around it). The
 * offsets and data are seeded: both phases run the same guest schedule.
 *
 * Each round (BENCH_RUNS, default 1; the summary is the median of the rounds' figures):
 *   1. guest alone: nothing protects the disk (from round 2 on, QEMU still keeps the stopped
 *      agent's persistent dirty bitmap enabled: that is what lets the agent restart without a scan);
 *   2. protected: `mobility server` (started once, kept across rounds) and `mobility protect --qmp
 *      --nbd-socket --disk disk0=d0 --crash-interval 15s`; after the initial sync (or the catch-up of
 *      phase 1's writes), the disk's continuous state and the agent's first point (untimed), the same
 *      guest schedule runs while `mobility status` is sampled every second (in-process, through the
 *      CLI's API client), then the benchmark waits for the backlog to drain and stops the agent.
 *
 * Figures per phase: guest write latency p50 / p99 / max and achieved MiB/s; protected: data lag,
 * backlog, RPO over the window (status samples), the points taken in the window (from the agent's
 * events and logs: spoolBytes, the remainder read from the point's copy-before-write view; shipMs;
 * the view's lifetime) and the guest latency of the writes completed while a view was active;
 * agent / server / QEMU CPU (% of one core, utime+stime over the window) and agent / server peak
 * RSS (VmHWM over the process's life, initial sync included). Targets: data lag p99 <= 2 s at
 * 50 MiB/s (the issue's in-guest target, which we hold host mode to) and guest latency p99 with /
 * without protection <= 1.2 (ours).
 *
 * Needs root, /dev/fuse, qemu-storage-daemon, qemu-img, qemu-io, nbdinfo and nbdcopy.
 * Output: tables and bench/results/host.json (BENCH_OUT_HOST overrides). BENCH_LOG_DIR=DIR keeps
 * the agent's events and logs and the server's log there. Every process, mount and directory it
 * creates is released on every exit path (signals included: test/cleanup.ts's registry, the same as
 * the tests use; SIGKILL of the benchmark: its reaper).
 */
import { type ChildProcess } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import readline from 'node:readline';
import { fileURLToPath } from 'node:url';
import { performance } from 'node:perf_hooks';
import { connOptions, type ApiConn } from '../src/cli/api-client.js';
import { parseSize } from '../src/cli/args.js';
import { CLI_PATH, spawnServer, stopServer, type SpawnedServer } from '../src/server/spawn.js';
import { cleanup, type Cleanup } from '../test/cleanup.js';
import { prng } from '../test/helpers.js';
import { QemuDaemon, createImage, requireQemuTools } from '../test/source/qemu/qemu-daemon.js';
import { StatusSampler, exec, initClock, max, median, pct, procCpuSec, procKb, type StatusSample } from './common.js';

const MiB = 1024 * 1024;
const BLOCK = 64 * 1024;
/** A size knob, NaN when it is not a size (main() says which knob is wrong). */
const sizeKnob = (v: string) => { try { return parseSize(v); } catch { return NaN; } };
const SIZE = sizeKnob(process.env.BENCH_HOST_SIZE ?? '2G');
const HOT = sizeKnob(process.env.BENCH_HOST_HOT ?? '256M');
const RATE = Number(process.env.BENCH_RATE ?? '50');
const SECONDS = Number(process.env.BENCH_SECONDS ?? '60');
const RUNS = Number(process.env.BENCH_RUNS ?? '1');
const JOBS = Number(process.env.BENCH_HOST_JOBS ?? '4');
const REPO = fileURLToPath(new URL('../../', import.meta.url));
const OUT = process.env.BENCH_OUT_HOST ? path.resolve(process.env.BENCH_OUT_HOST) : path.join(REPO, 'bench', 'results', 'host.json');
const LOG_DIR = process.env.BENCH_LOG_DIR ? path.resolve(process.env.BENCH_LOG_DIR) : null;
const CRASH_INTERVAL = '15s';
const DISK_ID = 'd0';
const NODE = 'disk0';
/** Distinct 64 KiB data buffers the guest writes (a rewritten block almost always changes). */
const PATTERNS = 16;
/** How often the guest's pacer looks at its writers. */
const TICK_MS = 20;
/** Longest wait for the initial sync and first point, and for the drain after the guest stops. */
const SYNC_LIMIT_MS = 30 * 60_000;
const DRAIN_LIMIT_MS = 120_000;
const TARGET_LAG_P99_MS = 2000;
const TARGET_LATENCY_RATIO = 1.2;
const TARGET_RATE = 50;

const say = (s: string) => process.stdout.write(s + '\n');
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const r1 = (x: number) => Math.round(x * 10) / 10;
const r3 = (x: number) => Math.round(x * 1000) / 1000;
const fmtS = (ms: number) => (Number.isFinite(ms) ? `${r1(ms / 1000)}` : '-');
const fmtMiB = (b: number) => (Number.isFinite(b) ? `${r1(b / MiB)}` : '-');
const fmtMs = (ms: number) => (Number.isFinite(ms) ? (ms < 10 ? ms.toFixed(2) : `${Math.round(ms)}`) : '-');
const fmtPct = (x: number) => (Number.isFinite(x) ? `${Math.round(x)}` : '-');

/** A line of `write -C`: bytes,ops,time,bytes/s,ops/s (qemu-io may print its prompt before it). */
const STATS_LINE = /(\d+),(\d+),(\d+:\d+:[\d.]+),([\d.]+),([\d.]+)\s*$/;

/**
 * One guest write: completion time (ms since the epoch, as read), its latency as qemu-io timed it,
 * and the round trip of its command as seen from here (command sent to stats line read).
 */
interface GuestWrite { at: number; ms: number; rttMs: number }

/**
 * One guest writer: a qemu-io process fed through its stdin, one write at a time, paced to
 * bytesPerSec. Contract: run() once; it resolves when the writer's share of the schedule is
 * written and qemu-io has exited, and rejects when qemu-io fails or exits early.
 */
class GuestWriter {
  readonly writes: GuestWrite[] = [];
  private issued = 0;
  private waiter: { resolve: () => void; reject: (e: Error) => void } | null = null;
  private failure: Error | null = null;
  private stderr = '';

  constructor(private readonly c: Cleanup, private readonly url: string, private readonly patterns: string[], private readonly hotBlocks: number,
    private readonly bytesPerSec: number, private readonly seed: number) {}

  private settle(): void {
    if (!this.waiter) return;
    if (this.failure) this.waiter.reject(this.failure);
    else if (this.writes.length >= this.issued) this.waiter.resolve();
    else return;
    this.waiter = null;
  }

  private caughtUp(): Promise<void> {
    return new Promise((resolve, reject) => { this.waiter = { resolve, reject }; this.settle(); });
  }

  private sentAt = 0;
  /** When this writer's qemu-io started and exited (ms since the epoch). */
  span: [number, number] = [0, 0];

  async run(start: number, durationMs: number): Promise<void> {
    this.span[0] = Date.now();
    const child = this.c.spawn('qemu-io', ['-f', 'raw', this.url], { stdio: ['pipe', 'pipe', 'pipe'] });
    child.stderr!.on('data', (d: Buffer) => { this.stderr = (this.stderr + d.toString()).slice(-4000); });
    child.stdin!.on('error', () => undefined); // an early exit is reported by the exit handler
    readline.createInterface({ input: child.stdout! }).on('line', (l) => {
      const m = STATS_LINE.exec(l);
      if (!m) return;
      const opsPerSec = Number(m[5]);
      this.writes.push({ at: Date.now(), ms: opsPerSec > 0 ? 1000 / opsPerSec : NaN, rttMs: performance.now() - this.sentAt });
      this.settle();
    });
    const exited = new Promise<number | null>((resolve) => child.once('exit', (code, sig) => {
      if (this.writes.length < this.issued || code !== 0) this.failure ??= new Error(`qemu-io exited (${code ?? sig}) after ${this.writes.length} of ${this.issued} writes: ${this.stderr}`);
      this.settle();
      resolve(code);
    }));
    child.once('error', (e) => { this.failure ??= e; this.settle(); });
    const rng = prng(this.seed);
    const perSec = this.bytesPerSec / BLOCK;
    for (;;) {
      const elapsed = Date.now() - start;
      if (elapsed >= durationMs) break;
      const owed = Math.min(Math.floor((perSec * elapsed) / 1000) - this.issued, Math.max(1, Math.ceil(perSec)));
      if (owed <= 0) { await sleep(TICK_MS); continue; }
      // one command at a time: qemu-io reads its stdin a line per wake-up, so the rest of a
      // multi-line chunk would wait in its buffer until more input came
      // (and none once the window is over, whatever is still owed)
      for (let i = 0; i < owed && Date.now() - start < durationMs; i++) {
        const block = Math.floor(rng() * this.hotBlocks);
        this.sentAt = performance.now();
        child.stdin!.write(`write -C -s ${this.patterns[this.issued % this.patterns.length]} ${block * BLOCK} ${BLOCK}\n`);
        this.issued++;
        await this.caughtUp();
      }
    }
    child.stdin!.end('quit\n');
    await exited;
    this.span[1] = Date.now();
    if (this.failure) throw this.failure;
    // qemu-io times the write inside the command's round trip: a latency longer than the round
    // trip means the stats lines are not read as they should be (ops/s has 3 decimals: 0.1% slack)
    const bad = this.writes.find((w) => !(w.ms <= w.rttMs * 1.001 + 0.01));
    if (bad) throw new Error(`CORRECTNESS: a write's latency read from qemu-io (${bad.ms} ms) is not within its command's round trip (${bad.rttMs} ms)`);
  }
}

interface GuestResult {
  start: number; end: number; writes: GuestWrite[]; bytes: number; mibPerSec: number; latencyMs: { p50: number; p99: number; max: number };
  /** the writers' time spent in writes / their time alive: near 1, the guest could not go faster at its queue depth */
  busyFraction: number;
  /** median of (command round trip - write latency): what qemu-io's command loop and the pipes add, outside the latency */
  overheadMsP50: number;
}

/** The whole guest: JOBS writers sharing RATE, started together, run for SECONDS. */
async function runGuest(c: Cleanup, daemon: QemuDaemon, patterns: string[]): Promise<GuestResult> {
  const url = `nbd+unix:///guest0?socket=${daemon.nbdSocket}`;
  const writers = Array.from({ length: JOBS }, (_, i) => new GuestWriter(c, url, patterns, HOT / BLOCK, (RATE * MiB) / JOBS, 1313 + i));
  const start = Date.now();
  await Promise.all(writers.map((w) => w.run(start, SECONDS * 1000)));
  const end = Date.now();
  const writes = writers.flatMap((w) => w.writes).sort((a, b) => a.at - b.at);
  const lat = writes.map((w) => w.ms).filter(Number.isFinite);
  const bytes = writes.length * BLOCK;
  const lived = writers.reduce((n, w) => n + (w.span[1] - w.span[0]), 0);
  return {
    start, end, writes, bytes, mibPerSec: r1(bytes / MiB / ((end - start) / 1000)), latencyMs: { p50: r3(pct(lat, 50)), p99: r3(pct(lat, 99)), max: r3(max(lat)) },
    busyFraction: lived > 0 ? r3(lat.reduce((n, x) => n + x, 0) / lived) : NaN,
    overheadMsP50: r3(pct(writes.map((w) => w.rttMs - w.ms).filter(Number.isFinite), 50)),
  };
}

interface Ev { event: string; [k: string]: unknown }
/** A line of the agent's --json-logs (stderr). */
interface LogLine { message: string; timestamp: string; cutId?: number; frozenMs?: number; shipMs?: number; sampleReadMs?: number; [k: string]: unknown }

/** A running `mobility protect --qmp`: its events (stdout) and 'cut sent' log lines (stderr). */
interface AgentRun { child: ChildProcess; events: (Ev & { seenAt: number })[]; cutLogs: LogLine[]; stderr: () => string }

function startAgent(c: Cleanup, server: SpawnedServer, daemon: QemuDaemon, dir: string, agentId: string, round: number): AgentRun {
  const args = [CLI_PATH, 'protect', '--server', server.info.url, '--token-file', server.info.tokenFile, '--ca', server.info.caFile!,
    '--qmp', daemon.qmpSocket, '--nbd-socket', daemon.nbdSocket, '--disk', `${NODE}=${DISK_ID}`, '--agent-id', agentId,
    '--state-dir', path.join(dir, 'agent'), '--json-logs', '--crash-interval', CRASH_INTERVAL];
  const child = c.spawn(process.execPath, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  const run: AgentRun = { child, events: [], cutLogs: [], stderr: () => err };
  let err = '';
  readline.createInterface({ input: child.stdout! }).on('line', (l) => { try { run.events.push({ ...(JSON.parse(l) as Ev), seenAt: Date.now() }); } catch { /* not an event */ } });
  child.stderr!.on('data', (d: Buffer) => { err = (err + d.toString()).slice(-20_000); });
  readline.createInterface({ input: child.stderr! }).on('line', (l) => {
    if (!l.includes('"cut sent"')) return;
    try { run.cutLogs.push(JSON.parse(l) as LogLine); } catch { /* not a log line */ }
  });
  if (LOG_DIR) {
    const log = fs.createWriteStream(path.join(LOG_DIR, `host-${round}-agent.log`));
    child.stdout!.pipe(log);
    child.stderr!.pipe(log);
  }
  return run;
}

const alive = (c: ChildProcess) => c.exitCode === null && c.signalCode === null;
const exited = (c: ChildProcess, ms: number) => new Promise<boolean>((resolve) => {
  if (!alive(c)) return resolve(true);
  const t = setTimeout(() => resolve(false), ms);
  c.once('exit', () => { clearTimeout(t); resolve(true); });
});

async function stopProcess(c: ChildProcess | null | undefined): Promise<void> {
  if (!c || !alive(c)) return;
  c.kill('SIGTERM');
  if (!(await exited(c, 15_000))) { c.kill('SIGKILL'); await exited(c, 5_000); }
}

async function waitFor(agent: AgentRun, what: string, ok: () => boolean): Promise<void> {
  const t0 = Date.now();
  let told = t0;
  while (!ok()) {
    // the initial sync of a large disk takes minutes on a busy machine: say where it is
    if (Date.now() - told >= 15_000) {
      told = Date.now();
      const last = agent.events[agent.events.length - 1];
      say(`    waiting for the ${what} (${Math.round((told - t0) / 1000)} s; the agent's last event: ${last ? JSON.stringify(last).slice(0, 160) : 'none yet'})`);
    }
    if (!alive(agent.child)) throw new Error(`the agent exited (${agent.child.exitCode ?? agent.child.signalCode}) before ${what}: ${agent.stderr().slice(-3000)}`);
    if (Date.now() - t0 > SYNC_LIMIT_MS) throw new Error(`no ${what} within ${SYNC_LIMIT_MS / 60_000} min: ${JSON.stringify(agent.events.slice(-5))}`);
    await sleep(200);
  }
}

interface Dist { p50: number; p99: number; max: number }
interface CutFigures { atS: number; kind: string; spoolBytes: number; shipMs: number; viewMs: number | null; frozenMs: number }
interface PhaseResult {
  phase: 'alone' | 'protected'; round: number; seconds: number;
  guest: { mibPerSec: number; bytes: number; writes: number; latencyMs: Dist; busyFraction: number; commandOverheadMsP50: number };
  qemuCpuPctOfCore: number;
  /** protected phase only */
  lagMs?: Dist; backlogBytes?: { p50: number; max: number }; rpoMs?: { p50: number; max: number }; samples?: number;
  cuts?: CutFigures[]; cutsFailed?: { code: string; message: string }[];
  /** guest writes completed while a point's copy-before-write view was active */
  duringViews?: { writes: number; latencyMs: Dist };
  drainMs?: number | null; initialMs?: number;
  agent?: { cpuPctOfCore: number; peakRssBytes: number }; server?: { cpuPctOfCore: number; peakRssBytes: number };
  /** the status samples of the window: [s after the guest's start, data lag ms, backlog bytes, RPO ms] */
  series?: [number, number | null, number | null, number | null][];
}

const cpuPct = (a: number | null, b: number | null, seconds: number) => (a !== null && b !== null && seconds > 0 ? Math.round(((b - a) / seconds) * 100) : NaN);
const dist = (xs: number[]): Dist => ({ p50: pct(xs, 50), p99: pct(xs, 99), max: max(xs) });

async function main(): Promise<void> {
  if (!(SIZE > 0) || SIZE % BLOCK) throw new Error(`BENCH_HOST_SIZE must be a positive multiple of 64 KiB, got ${process.env.BENCH_HOST_SIZE}`);
  if (!(HOT > 0) || HOT % BLOCK || HOT > SIZE) throw new Error(`BENCH_HOST_HOT must be a positive multiple of 64 KiB no larger than BENCH_HOST_SIZE, got ${process.env.BENCH_HOST_HOT}`);
  if (!(RATE > 0) || !(SECONDS > 0)) throw new Error('BENCH_RATE (MiB/s) and BENCH_SECONDS must be positive numbers');
  if (!Number.isInteger(RUNS) || RUNS < 1) throw new Error(`BENCH_RUNS must be a positive integer, got ${process.env.BENCH_RUNS}`);
  if (!Number.isInteger(JOBS) || JOBS < 1) throw new Error(`BENCH_HOST_JOBS must be a positive integer, got ${process.env.BENCH_HOST_JOBS}`);
  if (process.getuid?.() !== 0) throw new Error('the host-mode benchmark needs root (the agent mounts FUSE exports of the disk)');
  requireQemuTools();
  if (!fs.existsSync('/dev/fuse')) throw new Error('/dev/fuse is required (QEMU exports the disk to the agent through FUSE)');
  await initClock();
  if (LOG_DIR) await fsp.mkdir(LOG_DIR, { recursive: true });

  const c = cleanup();
  started = true;
  const dir = c.dir('bench-host-');
  let daemon: QemuDaemon | null = null;
  let server: SpawnedServer | null = null;
  let agent: AgentRun | null = null;
  const date = new Date().toISOString();
  const load0 = os.loadavg()[0]!;
  const results: PhaseResult[] = [];
  try {
    say(`host: ${fmtMiB(SIZE)} MiB qcow2, hot set ${fmtMiB(HOT)} MiB, guest ${RATE} MiB/s of 64 KiB random writes (${JOBS} qemu-io, queue depth 1 each) for ${SECONDS} s, `
      + `${RUNS} round(s) of guest alone then protected; load average ${load0.toFixed(1)} on ${os.cpus().length} CPUs`);
    const image = path.join(dir, 'vm-disk0.qcow2');
    createImage(image, 'qcow2', String(SIZE));
    daemon = new QemuDaemon(c, dir, [{ image, format: 'qcow2' }]);
    await daemon.start();
    const patterns: string[] = [];
    for (let i = 0; i < PATTERNS; i++) {
      const f = path.join(dir, `pattern-${i}.bin`);
      await fsp.writeFile(f, crypto.randomBytes(BLOCK));
      patterns.push(f);
    }
    // the hot set, once, with random data: the timed writes overwrite allocated clusters
    const chunk = Math.min(HOT, 64 * MiB);
    const chunkFile = path.join(dir, 'fill.bin');
    await fsp.writeFile(chunkFile, crypto.randomBytes(chunk));
    const fill: string[] = [];
    for (let off = 0; off < HOT; off += chunk) fill.push('-c', `write -q -s ${chunkFile} ${off} ${Math.min(chunk, HOT - off)}`);
    const filled = await exec('qemu-io', ['-f', 'raw', ...fill, `nbd+unix:///guest0?socket=${daemon.nbdSocket}`]);
    if (filled.code !== 0) throw new Error(`filling the hot set failed: ${filled.stderr}`);
    await fsp.rm(chunkFile);
    say(`  hot set written (${r1(filled.ms / 1000)} s)`);
    const d = daemon;
    const qemuCpu = () => procCpuSec(d.child?.pid);
    const agentId = `bench-host-${process.pid}`;
    let conn: ApiConn | null = null;

    for (let round = 1; round <= RUNS; round++) {
      // 1. the guest alone
      const q0 = qemuCpu();
      const alone = await runGuest(c, daemon, patterns);
      const q1 = qemuCpu();
      const aloneS = (alone.end - alone.start) / 1000;
      results.push({ phase: 'alone', round, seconds: r1(aloneS), guest: { mibPerSec: alone.mibPerSec, bytes: alone.bytes, writes: alone.writes.length, latencyMs: alone.latencyMs, busyFraction: alone.busyFraction, commandOverheadMsP50: alone.overheadMsP50 }, qemuCpuPctOfCore: cpuPct(q0, q1, aloneS) });
      say(`  round ${round}, guest alone: ${alone.mibPerSec} MiB/s for ${r1(aloneS)} s (writers busy ${Math.round(alone.busyFraction * 100)}%), write latency p50 ${fmtMs(alone.latencyMs.p50)} / p99 ${fmtMs(alone.latencyMs.p99)} / max ${fmtMs(alone.latencyMs.max)} ms`);

      // 2. protected
      if (!server) {
        server = await spawnServer(path.join(dir, 'srv'), { timeoutMs: 60_000 });
        c.process(server.child);
        if (LOG_DIR) server.child.stderr!.pipe(fs.createWriteStream(path.join(LOG_DIR, 'host-server.log')));
        conn = await connOptions({ server: server.info.url, 'token-file': server.info.tokenFile, ca: server.info.caFile! });
      }
      const t0 = Date.now();
      const a = startAgent(c, server, daemon, dir, agentId, round);
      agent = a;
      await waitFor(a, 'continuous state', () => a.events.some((e) => e.event === 'state' && e.disk === DISK_ID && e.state === 'continuous'));
      await waitFor(a, 'first point', () => a.events.some((e) => e.event === 'cut'));
      const initialMs = Date.now() - t0;
      const apid = a.child.pid!;
      const spid = server.child.pid!;
      const sampler = new StatusSampler(conn!, agentId, [DISK_ID]);
      const a0 = procCpuSec(apid);
      const s0 = procCpuSec(spid);
      const p0 = qemuCpu();
      const prot = await runGuest(c, daemon, patterns);
      const a1 = procCpuSec(apid);
      const s1 = procCpuSec(spid);
      const p1 = qemuCpu();
      const windowS = (prot.end - prot.start) / 1000;
      // drained: a health report received after the guest stopped says the backlog is empty
      let drainMs: number | null = null;
      while (Date.now() - prot.end < DRAIN_LIMIT_MS) {
        const last: StatusSample | undefined = sampler.samples[sampler.samples.length - 1];
        if (last && last.t > prot.end && last.backlogBytes === 0 && last.healthAgeMs !== null && last.t - last.healthAgeMs > prot.end + 200) {
          drainMs = last.t - last.healthAgeMs - prot.end;
          break;
        }
        if (!alive(a.child)) throw new Error(`the agent exited (${a.child.exitCode}): ${a.stderr().slice(-3000)}`);
        await sleep(250);
      }
      const samples = await sampler.stop();
      const peakAgent = procKb(apid, 'VmHWM');
      const peakServer = procKb(spid, 'VmHWM');
      await stopProcess(a.child);
      agent = null;

      const inWindow = samples.filter((s) => s.t >= prot.start && s.t <= prot.end);
      const nums = (k: 'dataLagMs' | 'backlogBytes' | 'rpoMs') => inWindow.map((s) => s[k]).filter((x): x is number => x !== null);
      // a point's instant: its QMP transaction, before the remainder was read from its view and shipped
      // ('cut sent' is logged after both: its time less shipMs and the read time)
      const cuts: CutFigures[] = [];
      const views: [number, number][] = [];
      for (const e of a.events.filter((x) => x.event === 'cut')) {
        const log = a.cutLogs.find((l) => Number(l.cutId) === Number(e.cutId));
        const shipMs = Number(e.shipMs ?? 0);
        const readMs = log && typeof log.sampleReadMs === 'number' ? log.sampleReadMs : null;
        const viewEnd = log ? Date.parse(log.timestamp) - shipMs : e.seenAt - shipMs;
        const at = viewEnd - (readMs ?? 0);
        if (at < prot.start || at > prot.end) continue;
        cuts.push({ atS: r1((at - prot.start) / 1000), kind: String(e.kind), spoolBytes: Number(e.spoolBytes ?? 0), shipMs, viewMs: readMs, frozenMs: Number(e.frozenMs ?? 0) });
        views.push([at, viewEnd]);
      }
      const cutsFailed = a.events.filter((e) => e.event === 'cut-failed' && e.seenAt >= prot.start && e.seenAt <= prot.end + (drainMs ?? 0))
        .map((e) => ({ code: String(e.code), message: String(e.message) }));
      const viewLat = prot.writes.filter((w) => views.some(([s, e]) => w.at >= s && w.at <= e)).map((w) => w.ms);
      const lag = nums('dataLagMs');
      const backlog = nums('backlogBytes');
      const rpo = nums('rpoMs');
      const res: PhaseResult = {
        phase: 'protected', round, seconds: r1(windowS),
        guest: { mibPerSec: prot.mibPerSec, bytes: prot.bytes, writes: prot.writes.length, latencyMs: prot.latencyMs, busyFraction: prot.busyFraction, commandOverheadMsP50: prot.overheadMsP50 },
        qemuCpuPctOfCore: cpuPct(p0, p1, windowS),
        lagMs: dist(lag), backlogBytes: { p50: pct(backlog, 50), max: max(backlog) }, rpoMs: { p50: pct(rpo, 50), max: max(rpo) }, samples: inWindow.length,
        cuts, cutsFailed, duringViews: { writes: viewLat.length, latencyMs: dist(viewLat.map(r3)) }, drainMs, initialMs,
        agent: { cpuPctOfCore: cpuPct(a0, a1, windowS), peakRssBytes: peakAgent }, server: { cpuPctOfCore: cpuPct(s0, s1, windowS), peakRssBytes: peakServer },
        series: inWindow.map((x) => [r1((x.t - prot.start) / 1000), x.dataLagMs, x.backlogBytes, x.rpoMs]),
      };
      results.push(res);
      say(`  round ${round}, protected: ${round === 1 ? 'initial sync' : 'catch-up'} + first point ${r1(initialMs / 1000)} s; guest ${prot.mibPerSec} MiB/s for ${r1(windowS)} s (writers busy ${Math.round(prot.busyFraction * 100)}%), `
        + `write latency p50 ${fmtMs(prot.latencyMs.p50)} / p99 ${fmtMs(prot.latencyMs.p99)} / max ${fmtMs(prot.latencyMs.max)} ms; points (s after the guest's start: spool MiB, view ms, ship ms) `
        + `${cuts.map((x) => `${x.atS} s: ${fmtMiB(x.spoolBytes)}, ${x.viewMs ?? '-'}, ${x.shipMs}`).join('; ') || 'none'}`
        + `${cutsFailed.length ? `; failed: ${cutsFailed.map((f) => f.code).join(', ')}` : ''}; drained ${drainMs === null ? `not within ${DRAIN_LIMIT_MS / 1000} s` : `${r1(drainMs / 1000)} s`} after the guest stopped`);
    }
  } finally {
    // the agent and the server first, then QEMU (its exports under the agent's state directory go with it), then the directory
    await stopProcess(agent?.child);
    if (server) { const s = server; await Promise.race([stopServer(s), sleep(15_000).then(() => s.child.kill('SIGKILL'))]); }
    if (daemon) await daemon.stop('SIGTERM').catch(() => daemon?.stop('SIGKILL'));
    const left = c.run();
    if (left.length) say(`  could not clean up: ${left.join('; ')}`);
  }

  // the summary: the median over the rounds of each round's figure
  const of = (phase: PhaseResult['phase']) => results.filter((r) => r.phase === phase);
  const med = (phase: PhaseResult['phase'], f: (r: PhaseResult) => number | undefined) => {
    const xs = of(phase).map(f).filter((x): x is number => x !== undefined && Number.isFinite(x));
    return xs.length ? r3(median(xs)) : NaN;
  };
  const summary = (phase: PhaseResult['phase']) => ({
    mibPerSec: med(phase, (r) => r.guest.mibPerSec),
    busyFraction: med(phase, (r) => r.guest.busyFraction),
    latencyMs: { p50: med(phase, (r) => r.guest.latencyMs.p50), p99: med(phase, (r) => r.guest.latencyMs.p99), max: med(phase, (r) => r.guest.latencyMs.max) },
    qemuCpuPctOfCore: med(phase, (r) => r.qemuCpuPctOfCore),
  });
  const alone = summary('alone');
  const protectedS = {
    ...summary('protected'),
    lagMs: { p50: med('protected', (r) => r.lagMs?.p50), p99: med('protected', (r) => r.lagMs?.p99), max: med('protected', (r) => r.lagMs?.max) },
    backlogBytes: { p50: med('protected', (r) => r.backlogBytes?.p50), max: med('protected', (r) => r.backlogBytes?.max) },
    rpoMs: { p50: med('protected', (r) => r.rpoMs?.p50), max: med('protected', (r) => r.rpoMs?.max) },
    cuts: med('protected', (r) => r.cuts?.length),
    cutsFailed: med('protected', (r) => r.cutsFailed?.length),
    spoolBytesP50: med('protected', (r) => pct((r.cuts ?? []).map((x) => x.spoolBytes), 50)),
    shipMsP50: med('protected', (r) => pct((r.cuts ?? []).map((x) => x.shipMs), 50)),
    duringViewsLatencyP99Ms: med('protected', (r) => r.duringViews?.latencyMs.p99),
    agent: { cpuPctOfCore: med('protected', (r) => r.agent?.cpuPctOfCore), peakRssBytes: med('protected', (r) => r.agent?.peakRssBytes) },
    server: { cpuPctOfCore: med('protected', (r) => r.server?.cpuPctOfCore), peakRssBytes: med('protected', (r) => r.server?.peakRssBytes) },
  };
  const latencyP99Ratio = alone.latencyMs.p99 > 0 ? r3(protectedS.latencyMs.p99 / alone.latencyMs.p99) : NaN;

  say('');
  say('| phase | guest MiB/s | guest write latency p50 / p99 / max (ms) | data lag p50 / p99 / max (s) | backlog p50 / max (MiB) | RPO p50 / max (s) | points in the window, spool p50 (MiB), ship p50 (ms) | guest latency p99 while a view is active (ms) | agent / server / QEMU CPU (% core) | agent / server peak RSS (MiB) |');
  say('|---|---|---|---|---|---|---|---|---|---|');
  say(`| guest alone | ${alone.mibPerSec} | ${fmtMs(alone.latencyMs.p50)} / ${fmtMs(alone.latencyMs.p99)} / ${fmtMs(alone.latencyMs.max)} | - | - | - | - | - | - / - / ${fmtPct(alone.qemuCpuPctOfCore)} | - |`);
  const p = protectedS;
  say(`| protected | ${p.mibPerSec} | ${fmtMs(p.latencyMs.p50)} / ${fmtMs(p.latencyMs.p99)} / ${fmtMs(p.latencyMs.max)} | ${fmtS(p.lagMs.p50)} / ${fmtS(p.lagMs.p99)} / ${fmtS(p.lagMs.max)} | ${fmtMiB(p.backlogBytes.p50)} / ${fmtMiB(p.backlogBytes.max)} `
    + `| ${fmtS(p.rpoMs.p50)} / ${fmtS(p.rpoMs.max)} | ${p.cuts}${p.cutsFailed ? ` (+${p.cutsFailed} failed)` : ''}, ${fmtMiB(p.spoolBytesP50)}, ${fmtMs(p.shipMsP50)} | ${fmtMs(p.duringViewsLatencyP99Ms)} `
    + `| ${fmtPct(p.agent.cpuPctOfCore)} / ${fmtPct(p.server.cpuPctOfCore)} / ${fmtPct(p.qemuCpuPctOfCore)} | ${fmtMiB(p.agent.peakRssBytes)} / ${fmtMiB(p.server.peakRssBytes)} |`);
  // a guest that did not reach its rate did not test the target: said so next to the verdict
  const atRate = RATE === TARGET_RATE ? '' : ` (measured at ${RATE} MiB/s, not the target rate)`;
  const short = Number.isFinite(p.mibPerSec) && p.mibPerSec < 0.95 * RATE ? ` (the guest reached ${p.mibPerSec} MiB/s of ${RATE})` : '';
  const targets = [
    { target: `data lag p99 <= ${TARGET_LAG_P99_MS / 1000} s at ${TARGET_RATE} MiB/s (the issue's in-guest target, ours for host mode)`, value: p.lagMs.p99, display: `${fmtS(p.lagMs.p99)} s`, met: Number.isFinite(p.lagMs.p99) ? p.lagMs.p99 <= TARGET_LAG_P99_MS : null },
    { target: `guest write latency p99 protected / alone <= ${TARGET_LATENCY_RATIO} (ours)`, value: latencyP99Ratio, display: `${fmtMs(p.latencyMs.p99)} / ${fmtMs(alone.latencyMs.p99)} ms = ${Number.isFinite(latencyP99Ratio) ? latencyP99Ratio.toFixed(2) : '-'}`, met: Number.isFinite(latencyP99Ratio) ? latencyP99Ratio <= TARGET_LATENCY_RATIO : null },
  ];
  say('');
  say('| target | measured | met |');
  say('|---|---|---|');
  for (const t of targets) say(`| ${t.target}${atRate} | ${t.display} | ${t.met === null ? 'no data' : t.met ? 'met' : 'not met'}${short} |`);

  const result = {
    date, sizeBytes: SIZE, hotBytes: HOT, rateMiBs: RATE, seconds: SECONDS, runs: RUNS, jobs: JOBS, blockBytes: BLOCK, crashInterval: CRASH_INTERVAL,
    loadAverageAtStart: r1(load0), cpus: os.cpus().length,
    targets: targets.map(({ display: _d, ...t }) => ({ ...t, rateMiBs: RATE, guestMiBs: p.mibPerSec })),
    summary: { alone, protected: protectedS, latencyP99Ratio },
    phases: results,
  };
  await fsp.mkdir(path.dirname(OUT), { recursive: true });
  await fsp.writeFile(OUT, JSON.stringify(result, null, 1) + '\n');
  say(`results: ${path.relative(REPO, OUT)}`);
}

// SIGINT / SIGTERM / SIGHUP: test/cleanup.ts's handlers (installed by cleanup()) kill every process
// the benchmark started, unmount what is mounted under its directory and remove it, then the
// signal ends the process; this only says so first
// (before anything was started there is nothing to clean up: the signal ends the process here)
let started = false;
for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) {
  process.once(sig, () => {
    say(`${sig}: ${started ? 'cleaning up' : 'stopped'}`);
    if (!started) process.exit(130);
  });
}

main().catch((err) => {
  process.stderr.write(`${(err as Error).stack ?? String(err)}\n`);
  process.exit(1);
});
