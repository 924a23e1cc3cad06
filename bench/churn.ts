/**
 * Benchmark: continuous protection under steady churn, and what the cuts cost the application
 * ("the benchmark tells the whole story", issue 12).
 *
 * For each rate (BENCH_RATES, MiB/s, default 10,30,50), on a fresh setup: ext4 on a 1 GiB loop
 * device, a 256 MiB fio file set (4 files, laid out and synced before protection starts), a real
 * `mobility server` and `mobility protect --crash-interval 15s` (no hooks, every other option at
 * its default). After the initial sync and the first point, fio writes 4 KiB random buffered
 * writes with an fsync every 64 at a fixed rate (fio --rate) for BENCH_SECONDS (default 60). Per run:
 *
 *   - fio (its JSON output): achieved MiB/s, write completion latency p99 / max, fsync latency max;
 *   - `mobility status --json` (the same GET /v1/status answer, taken every second in-process
 *     through the CLI's API client: no Node start-up per sample): data lag, backlog, RPO,
 *     p50 / p99 / max over the fio window;
 *   - the agent's events: every cut whose freeze started inside the fio window (frozenMs
 *     p50 / p99 / max, spoolBytes, shipMs) and every cut-failed with its code. When a freeze
 *     started comes from the agent's JSON logs ('cut sent' follows the thaw and the shipping; the
 *     event waits for the server's acknowledgement), which also give the freezes no cut event
 *     reports: a remainder over the spool budget (thawed at once, converged further, frozen
 *     again) and failed cuts;
 *   - /proc: agent and server CPU (utime+stime, over the fio window), peak RSS (VmHWM, process
 *     lifetime, initial sync included) and the server's write_bytes from fio start until the
 *     backlog is drained after fio stops, divided by the bytes fio wrote; the rest of the machine
 *     (busy CPU minus agent, server and fio: kernel threads of the loop device and ext4, and
 *     whatever else runs on the 2-core VM) in the window.
 *
 * Floor in the same run (BENCH_BARE=0 leaves it out): fio alone on the same setup, nothing protecting
 * the disk (what the machine gives the workload at that rate).
 * Peer in the same run: BENCH_BASE_CLI=/path/to/another/build/dist/src/cli/main.js runs the same
 * schedule against that build (its server and its agent), interleaved rate by rate (fio alone, base,
 * then this build). The tables give both, the ratio this/base for freeze p99 and lag p99, and the
 * issue's targets (freeze p99 <= 100 ms, lag p99 <= 2 s at 50 MiB/s), met or not.
 *
 * Needs root, losetup, mkfs.ext4, fio and tracefs.
 * Output: tables and bench/results/churn.json (BENCH_OUT_CHURN overrides). BENCH_LOG_DIR=DIR keeps the
 * agents' events and logs and the servers' logs there (BUILD-RATE-agent.log, BUILD-RATE-server.log).
 */
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import readline from 'node:readline';
import { fileURLToPath } from 'node:url';
import { connOptions, type ApiConn } from '../src/cli/api-client.js';
import { CLI_PATH, stopServer, type ServerInfo, type SpawnedServer } from '../src/server/spawn.js';
import { removeTraceInstances } from '../test/cleanup.js';
import { StatusSampler, max, pct, procKb } from './common.js';

const MiB = 1024 * 1024;
const RATES = (process.env.BENCH_RATES ?? '10,30,50').split(',').map((s) => Number(s.trim())).filter((n) => n > 0);
const SECONDS = Number(process.env.BENCH_SECONDS ?? '60');
/** The agent's --block-size (default: the agent's own default). */
const BLOCK_SIZE = process.env.BENCH_BLOCK_SIZE ?? null;
const BARE = process.env.BENCH_BARE !== '0';
const BASE_CLI = process.env.BENCH_BASE_CLI ? path.resolve(process.env.BENCH_BASE_CLI) : null;
const REPO = fileURLToPath(new URL('../../', import.meta.url));
const LOG_DIR = process.env.BENCH_LOG_DIR ? path.resolve(process.env.BENCH_LOG_DIR) : null;
const OUT = process.env.BENCH_OUT_CHURN ? path.resolve(process.env.BENCH_OUT_CHURN) : path.join(REPO, 'bench', 'results', 'churn.json');
const CRASH_INTERVAL = '15s';
const FILESET = '256M';
const NRFILES = 4;
const TARGET_FREEZE_P99_MS = 100;
const TARGET_LAG_P99_MS = 2000;
const TARGET_RATE = 50;
const CLK_TCK = Number(execFileSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).trim()) || 100;
const sh = (cmd: string, args: string[]) => execFileSync(cmd, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
const say = (s: string) => process.stdout.write(s + '\n');
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

interface Ev { event: string; at?: string; [k: string]: unknown }
/** A line of the agent's --json-logs (stderr). */
interface LogLine { message: string; timestamp: string; cutId?: number; frozenMs?: number; shipMs?: number; [k: string]: unknown }
/** A freeze of the filesystems, from the agent's logs: a recorded cut's, a failed cut's, or one thawed at once (remainder over the spool budget). */
interface Freeze { cutId: number; start: number; frozenMs: number; what: 'cut' | 'failed' | 'over-budget' }
interface ProcSnap { cpuTicks: number; writeBytes: number }

const r1 = (x: number) => Math.round(x * 10) / 10;
const r2 = (x: number) => Math.round(x * 100) / 100;
const r3 = (x: number) => Math.round(x * 1000) / 1000;

const fmtS = (ms: number) => (Number.isFinite(ms) ? `${r1(ms / 1000)}` : '-');
const fmtMiB = (b: number) => (Number.isFinite(b) ? `${r1(b / MiB)}` : '-');
const fmtMs = (ms: number) => (Number.isFinite(ms) ? `${Math.round(ms)}` : '-');
const ratio = (cur: number, base: number) => (Number.isFinite(cur) && Number.isFinite(base) && base > 0 ? (cur / base).toFixed(2) : '-');

/** utime+stime (clock ticks) and write_bytes of a live process. */
function procSnap(pid: number): ProcSnap {
  const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
  const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  const io = fs.readFileSync(`/proc/${pid}/io`, 'utf8');
  return { cpuTicks: Number(f[11]) + Number(f[12]), writeBytes: Number(/^write_bytes:\s*(\d+)/m.exec(io)?.[1] ?? 0) };
}

/** Busy and total jiffies of the whole machine (/proc/stat). */
function machineCpu(): { busy: number; total: number } {
  const f = fs.readFileSync('/proc/stat', 'utf8').split('\n')[0]!.trim().split(/\s+/).slice(1).map(Number);
  const total = f.reduce((a, b) => a + b, 0);
  return { busy: total - (f[3] ?? 0) - (f[4] ?? 0), total };
}

/** `mobility server` of the given build (as src/server/spawn.ts does for this build). */
async function startServer(cli: string, dataDir: string): Promise<SpawnedServer> {
  const child = spawn(process.execPath, [cli, 'server', '--data-dir', dataDir, '--listen', '127.0.0.1:0', '--json-logs'], { stdio: ['ignore', 'pipe', 'pipe'] });
  let err = '';
  child.stderr!.on('data', (d: Buffer) => { err = (err + d.toString()).slice(-(1 << 19)); });
  const rl = readline.createInterface({ input: child.stdout! });
  const info = await new Promise<ServerInfo>((resolve, reject) => {
    const t = setTimeout(() => { child.kill('SIGKILL'); reject(new Error(`server did not start: ${err}`)); }, 60_000);
    rl.once('line', (line) => {
      clearTimeout(t);
      try { resolve(JSON.parse(line) as ServerInfo); } catch { child.kill('SIGKILL'); reject(new Error(`unexpected server output: ${line}`)); }
    });
    child.once('exit', (code) => { clearTimeout(t); reject(new Error(`server exited with ${code}: ${err}`)); });
  });
  return { child, info, stderr: () => err };
}

interface FioJson {
  jobs: { usr_cpu: number; sys_cpu: number; write: { io_bytes: number; runtime: number; clat_ns: { max: number; percentile?: Record<string, number> } }; sync?: { lat_ns?: { max: number } } }[];
}

/** What fio reports about one timed run. */
function fioFigures(j: FioJson): RunResult['fio'] {
  const job = j.jobs[0]!;
  const w = job.write;
  return {
    mibPerSec: r1(w.io_bytes / MiB / (w.runtime / 1000)), bytes: w.io_bytes,
    writeClatP99Ms: r3((w.clat_ns.percentile?.['99.000000'] ?? NaN) / 1e6), writeClatMaxMs: r1(w.clat_ns.max / 1e6),
    syncLatMaxMs: r1((job.sync?.lat_ns?.max ?? NaN) / 1e6), cpuPctOfCore: Math.round(job.usr_cpu + job.sys_cpu),
  };
}

/** SIGKILL to a process and all its descendants (fio's job processes start their own sessions: a group kill misses them). */
function killTree(pid: number): void {
  const children = new Map<number, number[]>();
  for (const n of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(n)) continue;
    try {
      const stat = fs.readFileSync(`/proc/${n}/stat`, 'utf8');
      const ppid = Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]);
      children.set(ppid, [...(children.get(ppid) ?? []), Number(n)]);
    } catch { /* gone */ }
  }
  const all: number[] = [];
  const walk = (p: number) => { all.push(p); for (const c of children.get(p) ?? []) walk(c); };
  walk(pid);
  for (const p of all) { try { process.kill(p, 'SIGKILL'); } catch { /* gone */ } }
}

const killGroup = (c: ChildProcess | null, sig: NodeJS.Signals) => {
  if (!c?.pid || c.exitCode !== null || c.signalCode !== null) return;
  try { process.kill(-c.pid, sig); } catch { try { c.kill(sig); } catch { /* gone */ } }
};
const exited = (c: ChildProcess, ms: number) => new Promise<boolean>((resolve) => {
  if (c.exitCode !== null || c.signalCode !== null) return resolve(true);
  const t = setTimeout(() => resolve(false), ms);
  c.once('exit', () => { clearTimeout(t); resolve(true); });
});

/** The release of the running setup, also called from the signal handlers. */
let release: (() => Promise<void>) | null = null;

type Build = 'none' | 'base' | 'current';
const LABEL: Record<Build, string> = { none: 'fio alone', base: 'base', current: 'current' };

interface RunResult {
  /** none: fio alone on the same setup, nothing protecting the disk */
  build: Build; rateMiBs: number; seconds: number;
  fio: { mibPerSec: number; bytes: number; writeClatP99Ms: number; writeClatMaxMs: number; syncLatMaxMs: number; cpuPctOfCore: number };
  lagMs: { p50: number; p99: number; max: number }; backlogBytes: { p50: number; max: number }; rpoMs: { p50: number; max: number };
  freezeMs: { n: number; p50: number; p99: number; max: number; all: number[] };
  cutsFailed: Record<string, number>; spoolBytesP50: number | null; shipMsP50: number | null;
  agent: { cpuPctOfCore: number; peakRssBytes: number; writeBytes: number }; server: { cpuPctOfCore: number; peakRssBytes: number; writeBytes: number };
  serverWrittenPerChurnedByte: number;
  /** bytes the server received over the connection (its stop statistics, less the initial pass) per byte fio wrote */
  wirePerChurnedByte: number;
  drainMs: number | null; machineBusyCores: number; othersBusyCores: number; samples: number;
  /** the status samples of the window: [s after fio start, data lag ms, backlog bytes, RPO ms] */
  series: [number, number | null, number | null, number | null][];
  /** freezes not in a recorded cut's frozenMs (over the spool budget: thawed at once; failed cuts), and all freezes, in the window */
  otherFreezesMs: number[]; allFreezesMs: { n: number; p50: number; p99: number; max: number; total: number };
  /** every cut and cut-failed event of the run, freeze start relative to fio's start (inWindow: counted above) */
  cutEvents: { frozeAtS: number; event: string; inWindow: boolean; frozenMs?: number; spoolBytes?: number; shipMs?: number; code?: string; message?: string; note?: string }[];
}

async function runOne(build: Build, cli: string | null, rate: number): Promise<RunResult> {
  const dir = await fsp.mkdtemp(path.join(os.tmpdir(), 'mobility-bench-churn-'));
  const img = path.join(dir, 'disk.img');
  const mnt = path.join(dir, 'mnt');
  const agentId = `bench-churn-${process.pid}-${build}-${rate}`;
  let loop: string | null = null;
  let mounted = false;
  let server: SpawnedServer | null = null;
  let agent: ChildProcess | null = null;
  let fio: ChildProcess | null = null;
  let releasing: Promise<void> | null = null;
  // one release, whoever asks first (the run's end, or a signal while the run is failing because of it)
  const cleanup = () => (releasing ??= releaseAll());
  const releaseAll = async () => {
    if (fio?.pid) killTree(fio.pid);
    if (agent) {
      killGroup(agent, 'SIGTERM');
      if (!(await exited(agent, 15_000))) { killGroup(agent, 'SIGKILL'); await exited(agent, 5_000); }
    }
    if (server) { const s = server; await Promise.race([stopServer(s), sleep(15_000).then(() => s.child.kill('SIGKILL'))]); }
    if (mounted) {
      try { sh('fsfreeze', ['-u', mnt]); } catch { /* not frozen */ }
      try { sh('umount', ['-l', mnt]); } catch { /* gone */ }
    }
    if (loop) { try { sh('losetup', ['-d', loop]); } catch { /* gone */ } }
    const left = removeTraceInstances(agentId);
    if (left.length) say(`  could not remove trace instances: ${left.join(', ')}`);
    await fsp.rm(dir, { recursive: true, force: true });
  };
  release = cleanup;
  try {
    await fsp.writeFile(img, '');
    await fsp.truncate(img, 1024 * MiB);
    loop = sh('losetup', ['--find', '--show', img]).trim();
    await fsp.mkdir(mnt);
    sh('mkfs.ext4', ['-q', '-F', '-E', 'lazy_itable_init=0,lazy_journal_init=0', loop]);
    sh('mount', ['-o', 'noatime', loop, mnt]);
    mounted = true;
    const fioJob = ['--name=churn', `--directory=${mnt}`, `--size=${FILESET}`, `--nrfiles=${NRFILES}`, '--bs=4k'];
    // the file set is laid out before protection starts: the initial sync covers it, the churn only rewrites it
    sh('fio', [...fioJob, '--rw=randwrite', '--create_only=1']);
    sh('sync', []);
    const fioOut = path.join(dir, 'fio.json');
    const runFio = async () => {
      const start = Date.now();
      fio = spawn('fio', [...fioJob, '--rw=randwrite', '--ioengine=psync', '--fsync=64', `--rate=${rate}m`, '--time_based', `--runtime=${SECONDS}`,
        '--output-format=json', `--output=${fioOut}`], { stdio: ['ignore', 'ignore', 'pipe'], detached: true });
      let fioErr = '';
      fio.stderr!.on('data', (d: Buffer) => { fioErr = (fioErr + d.toString()).slice(-5000); });
      const f = fio;
      const code = await new Promise<number | null>((r) => f.once('exit', (c) => r(c)));
      const end = Date.now();
      fio = null;
      if (code !== 0) throw new Error(`fio exited with ${code}: ${fioErr}`);
      return { start, end };
    };

    if (!cli) {
      const m0 = machineCpu();
      const { start, end } = await runFio();
      const m1 = machineCpu();
      const f = fioFigures(JSON.parse(await fsp.readFile(fioOut, 'utf8')) as FioJson);
      const busy = ((m1.busy - m0.busy) / (m1.total - m0.total)) * os.cpus().length;
      const nan = { p50: NaN, p99: NaN, max: NaN };
      say(`  fio alone ${rate} MiB/s: ${f.mibPerSec} MiB/s for ${r1((end - start) / 1000)} s, write clat max ${f.writeClatMaxMs} ms`);
      return {
        build, rateMiBs: rate, seconds: r1((end - start) / 1000), fio: f, lagMs: nan, backlogBytes: { p50: NaN, max: NaN }, rpoMs: { p50: NaN, max: NaN },
        freezeMs: { n: 0, ...nan, all: [] }, cutsFailed: {}, spoolBytesP50: null, shipMsP50: null,
        agent: { cpuPctOfCore: NaN, peakRssBytes: NaN, writeBytes: NaN }, server: { cpuPctOfCore: NaN, peakRssBytes: NaN, writeBytes: NaN },
        serverWrittenPerChurnedByte: NaN, wirePerChurnedByte: NaN, series: [], drainMs: null, machineBusyCores: r1(busy), othersBusyCores: r2(busy - f.cpuPctOfCore / 100), samples: 0,
        otherFreezesMs: [], allFreezesMs: { n: 0, ...nan, total: 0 }, cutEvents: [],
      };
    }

    server = await startServer(cli, path.join(dir, 'srv'));
    const conn: ApiConn = await connOptions({ server: server.info.url, 'token-file': server.info.tokenFile, ca: server.info.caFile! });
    const events: Ev[] = [];
    const logs: LogLine[] = [];
    let stderr = '';
    agent = spawn(process.execPath, [cli, 'protect', '--server', server.info.url, '--token-file', server.info.tokenFile, '--ca', server.info.caFile!,
      '--disk', `${loop}=d0`, '--agent-id', agentId, '--state-dir', path.join(dir, 'agent'), '--json-logs', '--crash-interval', CRASH_INTERVAL, ...(BLOCK_SIZE ? ['--block-size', BLOCK_SIZE] : [])],
    { stdio: ['ignore', 'pipe', 'pipe'], detached: true });
    readline.createInterface({ input: agent.stdout! }).on('line', (l) => { try { events.push(JSON.parse(l) as Ev); } catch { /* not an event */ } });
    agent.stderr!.on('data', (d: Buffer) => { stderr = (stderr + d.toString()).slice(-20_000); });
    readline.createInterface({ input: agent.stderr! }).on('line', (l) => {
      if (!l.includes('"cut')) return;
      try { logs.push(JSON.parse(l) as LogLine); } catch { /* not a log line */ }
    });
    if (LOG_DIR) {
      await fsp.mkdir(LOG_DIR, { recursive: true });
      const log = fs.createWriteStream(path.join(LOG_DIR, `${build}-${rate}-agent.log`));
      agent.stdout!.pipe(log);
      agent.stderr!.pipe(log);
      server.child.stderr!.pipe(fs.createWriteStream(path.join(LOG_DIR, `${build}-${rate}-server.log`)));
    }
    const a = agent;
    const t0 = Date.now();
    // the first point after the initial sync
    for (;;) {
      // (a first cut that fails is retried by the agent: wait for the one that succeeds)
      if (events.some((x) => x.event === 'cut')) break;
      if (a.exitCode !== null) throw new Error(`the agent exited (${a.exitCode}): ${stderr.slice(-3000)}`);
      if (Date.now() - t0 > 900_000) throw new Error(`no first point within 15 min: ${JSON.stringify(events.slice(-5))}`);
      await sleep(200);
    }
    const syncMs = Date.now() - t0;
    const spid = server.child.pid!;
    const apid = a.pid!;

    // the sampler: status every second (one request at a time)
    const sampler = new StatusSampler(conn, agentId, ['d0']);
    const samples = sampler.samples;

    const a0 = procSnap(apid);
    const s0 = procSnap(spid);
    const m0 = machineCpu();
    const { start: fioStart, end: fioEnd } = await runFio();
    const a1 = procSnap(apid);
    const s1 = procSnap(spid);
    const m1 = machineCpu();
    const windowS = (fioEnd - fioStart) / 1000;

    // drained: a health report received after fio stopped says the backlog is empty
    let drainMs: number | null = null;
    while (Date.now() - fioEnd < 120_000) {
      const last = samples[samples.length - 1];
      if (last && last.t > fioEnd && last.backlogBytes === 0 && last.healthAgeMs !== null && last.t - last.healthAgeMs > fioEnd + 200) {
        drainMs = last.t - last.healthAgeMs - fioEnd;
        break;
      }
      if (a.exitCode !== null) throw new Error(`the agent exited (${a.exitCode}): ${stderr.slice(-3000)}`);
      await sleep(250);
    }
    const s2 = procSnap(spid);
    const a2 = procSnap(apid);
    await sampler.stop();
    const peakAgent = procKb(apid, 'VmHWM');
    const peakServer = procKb(spid, 'VmHWM');
    // the server's own count of the bytes it received (its stop statistics), less the initial pass
    killGroup(a, 'SIGTERM');
    if (!(await exited(a, 15_000))) killGroup(a, 'SIGKILL');
    const srv = server;
    await Promise.race([stopServer(srv), sleep(15_000).then(() => srv.child.kill('SIGKILL'))]);
    const stopped = srv.stderr().split('\n').reverse().find((l) => l.includes('"stopped"'));
    let received = NaN;
    try { received = Number((JSON.parse(stopped ?? '') as { stats?: { bytesReceived?: number } }).stats?.bytesReceived ?? NaN); } catch { /* no statistics */ }
    const initialSent = Number(events.find((e) => e.event === 'pass-done' && e.kind === 'initial')?.bytesSent ?? 0);

    const fioRes = fioFigures(JSON.parse(await fsp.readFile(fioOut, 'utf8')) as FioJson);
    const fioBytes = fioRes.bytes;

    const inWindow = samples.filter((s) => s.t >= fioStart && s.t <= fioEnd);
    const nums = (k: 'dataLagMs' | 'backlogBytes' | 'rpoMs') => inWindow.map((s) => s[k]).filter((x): x is number => x !== null);
    // Every freeze, from the agent's logs ('cut sent' comes right after the thaw and the spool's shipping; an event
    // only at the server's acknowledgement): a cut belongs to the window when its freeze began while fio ran.
    const freezes: Freeze[] = [];
    for (const l of logs) {
      const ts = Date.parse(l.timestamp);
      const fm = Number(l.frozenMs ?? 0);
      if (l.message === 'cut sent') freezes.push({ cutId: Number(l.cutId), start: ts - fm - Number(l.shipMs ?? 0), frozenMs: fm, what: 'cut' });
      else if (l.message.startsWith('cut remainder over the spool budget')) freezes.push({ cutId: Number(l.cutId), start: ts - fm, frozenMs: fm, what: 'over-budget' });
      else if (l.message.startsWith('cut failed') && fm > 0) freezes.push({ cutId: Number(l.cutId), start: ts - fm, frozenMs: fm, what: 'failed' });
    }
    const within = (t: number) => t >= fioStart && t <= fioEnd;
    const startOf = (e: Ev): number => {
      const f = freezes.find((x) => x.cutId === Number(e.cutId) && x.what !== 'over-budget');
      if (f) return f.start;
      const failedLog = logs.find((l) => l.message.startsWith('cut failed') && Number(l.cutId) === Number(e.cutId));
      return failedLog ? Date.parse(failedLog.timestamp) : Date.parse(e.at ?? '') - Number(e.frozenMs ?? 0) - Number(e.shipMs ?? 0);
    };
    const cuts = events.filter((e) => e.event === 'cut' && within(startOf(e)));
    const failed = events.filter((e) => e.event === 'cut-failed' && within(startOf(e)));
    const windowFreezes = freezes.filter((f) => within(f.start));
    const extraFreezes = windowFreezes.filter((f) => f.what !== 'cut').map((f) => f.frozenMs);
    const allFrozen = windowFreezes.map((f) => f.frozenMs);
    const cutsFailed: Record<string, number> = {};
    for (const e of failed) cutsFailed[String(e.code)] = (cutsFailed[String(e.code)] ?? 0) + 1;
    const frozen = cuts.map((e) => Number(e.frozenMs));
    const spooled = cuts.filter((e) => typeof e.spoolBytes === 'number').map((e) => Number(e.spoolBytes));
    const ship = cuts.filter((e) => typeof e.shipMs === 'number').map((e) => Number(e.shipMs));
    const lag = nums('dataLagMs');
    const backlog = nums('backlogBytes');
    const rpo = nums('rpoMs');
    const agentCpu = (a1.cpuTicks - a0.cpuTicks) / CLK_TCK;
    const serverCpu = (s1.cpuTicks - s0.cpuTicks) / CLK_TCK;
    const machineBusy = ((m1.busy - m0.busy) / (m1.total - m0.total)) * os.cpus().length;
    const fioCpu = fioRes.cpuPctOfCore / 100;
    const cutEvents: RunResult['cutEvents'] = events.filter((e) => e.event === 'cut' || e.event === 'cut-failed').map((e) => ({
      frozeAtS: r1((startOf(e) - fioStart) / 1000), event: e.event, inWindow: cuts.includes(e) || failed.includes(e),
      ...(e.event === 'cut'
        ? { frozenMs: Number(e.frozenMs), ...(typeof e.spoolBytes === 'number' ? { spoolBytes: e.spoolBytes, shipMs: Number(e.shipMs) } : {}), ...(e.note ? { note: String(e.note) } : {}) }
        : { code: String(e.code), message: String(e.message) }),
    }));
    const res: RunResult = {
      build, rateMiBs: rate, seconds: r1(windowS),
      fio: fioRes,
      lagMs: { p50: pct(lag, 50), p99: pct(lag, 99), max: max(lag) },
      backlogBytes: { p50: pct(backlog, 50), max: max(backlog) },
      rpoMs: { p50: pct(rpo, 50), max: max(rpo) },
      freezeMs: { n: frozen.length, p50: pct(frozen, 50), p99: pct(frozen, 99), max: max(frozen), all: frozen },
      otherFreezesMs: extraFreezes,
      allFreezesMs: { n: allFrozen.length, p50: pct(allFrozen, 50), p99: pct(allFrozen, 99), max: max(allFrozen), total: allFrozen.reduce((x, y) => x + y, 0) },
      cutsFailed, spoolBytesP50: spooled.length ? pct(spooled, 50) : null, shipMsP50: ship.length ? pct(ship, 50) : null,
      agent: { cpuPctOfCore: Math.round((agentCpu / windowS) * 100), peakRssBytes: peakAgent, writeBytes: a2.writeBytes - a0.writeBytes },
      server: { cpuPctOfCore: Math.round((serverCpu / windowS) * 100), peakRssBytes: peakServer, writeBytes: s2.writeBytes - s0.writeBytes },
      serverWrittenPerChurnedByte: r3((s2.writeBytes - s0.writeBytes) / fioBytes), wirePerChurnedByte: r3((received - initialSent) / fioBytes),
      series: inWindow.map((x) => [r1((x.t - fioStart) / 1000), x.dataLagMs, x.backlogBytes, x.rpoMs]),
      drainMs, machineBusyCores: r1(machineBusy), othersBusyCores: r2(machineBusy - (agentCpu + serverCpu) / windowS - fioCpu), samples: inWindow.length, cutEvents,
    };
    const evs = cutEvents.map((e) => `${e.inWindow ? '' : '('}${e.frozeAtS} s ${e.event === 'cut' ? `${e.frozenMs} ms${e.spoolBytes !== undefined ? ` spool ${fmtMiB(e.spoolBytes)} MiB ship ${e.shipMs} ms` : ''}` : e.code}${e.inWindow ? '' : ')'}`);
    say(`  ${build} ${rate} MiB/s: initial sync + first point ${r1(syncMs / 1000)} s; fio ${res.fio.mibPerSec} MiB/s for ${res.seconds} s; cuts (freeze start in s after fio start, freeze; in parentheses: outside the window) ${evs.join(', ')}`
      + `${extraFreezes.length ? `; other freezes ${extraFreezes.join(', ')} ms` : ''}; `
      + `drained ${drainMs === null ? 'not within 120 s' : `${r1(drainMs / 1000)} s`} after fio`);
    return res;
  } finally {
    await cleanup();
    release = null;
  }
}


async function main(): Promise<void> {
  if (!RATES.length || !(SECONDS > 0)) throw new Error('BENCH_RATES wants MiB/s values such as 10,30,50 and BENCH_SECONDS a positive number');
  for (const tool of ['losetup', 'mkfs.ext4', 'fsfreeze', 'fio']) {
    try { sh('sh', ['-c', `command -v ${tool}`]); } catch { throw new Error(`${tool} is required`); }
  }
  if (!fs.existsSync('/sys/kernel/tracing/instances')) throw new Error('tracefs (/sys/kernel/tracing/instances) is required');
  if (BASE_CLI && !fs.existsSync(BASE_CLI)) throw new Error(`BENCH_BASE_CLI ${BASE_CLI} does not exist`);
  const builds: [Build, string | null][] = [...(BARE ? [['none', null] as [Build, null]] : []), ...(BASE_CLI ? [['base', BASE_CLI] as [Build, string]] : []), ['current', CLI_PATH]];
  const results: RunResult[] = [];
  const date = new Date().toISOString();
  const load0 = os.loadavg()[0]!;
  say(`churn: rates ${RATES.join(', ')} MiB/s, ${SECONDS} s each, ${builds.map(([b]) => LABEL[b]).join(' then ')} per rate; load average ${load0.toFixed(1)} on ${os.cpus().length} CPUs`);
  for (const rate of RATES) {
    for (const [build, cli] of builds) results.push(await runOne(build, cli, rate));
  }

  say('');
  say('| rate | build | fio MiB/s | lag p50 / p99 / max (s) | backlog p50 / max (MiB) | RPO p50 / max (s) | freeze p50 / p99 / max (ms), cuts | other freezes (ms) | cut-failed | fio write clat p99 / max (ms) | agent / server / fio CPU (% core) | agent / server peak RSS (MiB) | wire / server disk bytes per churned byte | rest of the machine busy (cores) |');
  say('|---|---|---|---|---|---|---|---|---|---|---|---|---|---|');
  const pctCore = (x: number) => (Number.isFinite(x) ? String(x) : '-');
  for (const r of results) {
    const fails = r.build === 'none' ? '-' : Object.entries(r.cutsFailed).map(([c, n]) => `${n} ${c}`).join(', ') || '0';
    say(`| ${r.rateMiBs} | ${LABEL[r.build]} | ${r.fio.mibPerSec} | ${fmtS(r.lagMs.p50)} / ${fmtS(r.lagMs.p99)} / ${fmtS(r.lagMs.max)} | ${fmtMiB(r.backlogBytes.p50)} / ${fmtMiB(r.backlogBytes.max)} | ${fmtS(r.rpoMs.p50)} / ${fmtS(r.rpoMs.max)} `
      + `| ${fmtMs(r.freezeMs.p50)} / ${fmtMs(r.freezeMs.p99)} / ${fmtMs(r.freezeMs.max)}, ${r.freezeMs.n} | ${r.otherFreezesMs.map(fmtMs).join(', ') || '-'} | ${fails} | ${r2(r.fio.writeClatP99Ms)} / ${fmtMs(r.fio.writeClatMaxMs)} `
      + `| ${pctCore(r.agent.cpuPctOfCore)} / ${pctCore(r.server.cpuPctOfCore)} / ${r.fio.cpuPctOfCore} | ${fmtMiB(r.agent.peakRssBytes)} / ${fmtMiB(r.server.peakRssBytes)} | ${pctCore(r.wirePerChurnedByte)} / ${pctCore(r.serverWrittenPerChurnedByte)} | ${r.othersBusyCores} |`);
  }
  const get = (build: string, rate: number) => results.find((r) => r.build === build && r.rateMiBs === rate);
  if (BASE_CLI) {
    say('');
    say('| rate | freeze p99 base / current (ms) | ratio current/base | lag p99 base / current (s) | ratio current/base |');
    say('|---|---|---|---|---|');
    for (const rate of RATES) {
      const b = get('base', rate)!;
      const c = get('current', rate)!;
      say(`| ${rate} MiB/s | ${fmtMs(b.freezeMs.p99)} / ${fmtMs(c.freezeMs.p99)} | ${ratio(c.freezeMs.p99, b.freezeMs.p99)} | ${fmtS(b.lagMs.p99)} / ${fmtS(c.lagMs.p99)} | ${ratio(c.lagMs.p99, b.lagMs.p99)} |`);
    }
  }
  // the issue sets its targets at 50 MiB/s; without that rate in the run, the highest one measured (said so)
  const tRate = RATES.includes(TARGET_RATE) ? TARGET_RATE : Math.max(...RATES);
  const targets = [
    { target: `freeze p99 <= ${TARGET_FREEZE_P99_MS} ms`, value: (r: RunResult) => r.freezeMs.p99, ok: (v: number) => v <= TARGET_FREEZE_P99_MS, fmt: (v: number) => `${fmtMs(v)} ms` },
    { target: `every freeze in the window (failed and over-budget attempts too) p99 <= ${TARGET_FREEZE_P99_MS} ms`, value: (r: RunResult) => r.allFreezesMs.p99, ok: (v: number) => v <= TARGET_FREEZE_P99_MS, fmt: (v: number) => `${fmtMs(v)} ms` },
    { target: `data lag p99 <= ${TARGET_LAG_P99_MS / 1000} s`, value: (r: RunResult) => r.lagMs.p99, ok: (v: number) => v <= TARGET_LAG_P99_MS, fmt: (v: number) => `${fmtS(v)} s` },
  ];
  const targetRows = targets.map((t) => {
    const c = get('current', tRate)!;
    const b = get('base', tRate);
    const cv = t.value(c);
    return { target: t.target, rateMiBs: tRate, base: b ? t.value(b) : null, current: cv, met: Number.isFinite(cv) ? t.ok(cv) : null, display: [b ? t.fmt(t.value(b)) : '-', t.fmt(cv)] };
  });
  say('');
  say(`| target (issue 12, at ${TARGET_RATE} MiB/s) | measured at | base | current | current met |`);
  say('|---|---|---|---|---|');
  for (const t of targetRows) say(`| ${t.target} | ${t.rateMiBs} MiB/s${t.rateMiBs === TARGET_RATE ? '' : ' (not the target rate)'} | ${t.display[0]} | ${t.display[1]} | ${t.met === null ? 'no data (no cut in the window)' : t.met ? 'met' : 'not met'} |`);

  const result = {
    date, rates: RATES, secondsPerRate: SECONDS, crashInterval: CRASH_INTERVAL, baseBuild: BASE_CLI ? 'BENCH_BASE_CLI' : null,
    loadAverageAtStart: r1(load0), cpus: os.cpus().length,
    targets: targetRows.map(({ display: _d, ...t }) => t),
    runs: results,
  };
  await fsp.mkdir(path.dirname(OUT), { recursive: true });
  await fsp.writeFile(OUT, JSON.stringify(result, null, 1) + '\n');
  say(`results: ${path.relative(REPO, OUT)}`);
}

let interrupted: Promise<void> | null = null;
for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) {
  process.once(sig, () => {
    say(`${sig}: cleaning up`);
    interrupted ??= (release ? release() : Promise.resolve()).finally(() => process.exit(130));
  });
}

main().catch(async (err) => {
  // a run that fails because a signal stopped its processes: the signal's release ends the process
  if (interrupted) return void (await interrupted);
  process.stderr.write(`${(err as Error).stack ?? String(err)}\n`);
  process.exit(1);
});
