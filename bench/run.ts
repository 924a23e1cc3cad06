/**
 * Benchmark: Mobility against real peers on the same machine, in the same run.
 *
 *   1. a mixed-content image (writeSampleImage: ~25% zeros, 25% random, 50% text)
 *   2. a private sshd on 127.0.0.1 (own host key, config and authorized_keys)
 *   3. initial replication: ours (fresh replica store and agent state, over wss)
 *      vs `rsync -W --sparse` over that sshd + `sync`, vs `cp --sparse=always` + `sync`
 *   4. incremental after 1% churn: ours (auto -> incremental) vs
 *      `rsync --inplace --no-whole-file` + `sync`; wire bytes of both; then a
 *      text-only churn for our wire bytes / changed bytes
 *   5. checksum resync of identical disks vs `cat image | wc -c`
 *   6. peak RSS and CPU seconds of agent and server during the initial run
 *
 * Every measurement: one warm-up, then the median of BENCH_RUNS timed runs
 * (default 3), measurements interleaved run by run. BENCH_SIZE sets the image
 * size (default 2G). Nothing is dropped from the page cache: every tool reads
 * its input from cache. `sync` runs (untimed) before each timed command so the
 * timed `sync` after rsync and cp flushes only that command's writes; ours
 * acknowledges only fsynced data, so its time already includes durability.
 * Replicas are checked with sha256 after every run; a mismatch aborts.
 *
 * Output: a table on stdout and bench/results/latest.json (BENCH_OUT overrides).
 * BENCH_KEEP=1 keeps the work directory. The machine may be shared: before each
 * timed round the benchmark waits (up to BENCH_QUIET_WAIT s, default 120) for
 * other processes to go quiet, and it reports the CPU others used during each
 * timed command.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { fileURLToPath } from 'node:url';
import { parseSize } from '../src/cli/args.js';
import { LoadMonitor, exec, initClock, median, procCpuSec, type Exec } from './common.js';
import { CLI_PATH, spawnServer, stopServer, type SpawnedServer } from '../src/server/spawn.js';
import { churnImage, sha256File, writeSampleImage, type RegionKind } from '../src/util/sample-image.js';

const MiB = 1024 * 1024;
const SIZE = parseSize(process.env.BENCH_SIZE ?? '2G');
const RUNS = Number(process.env.BENCH_RUNS ?? '3');
const KEEP = process.env.BENCH_KEEP === '1';
/** Longest wait for other load to settle before a timed round (BENCH_QUIET_WAIT seconds, default 120). */
const QUIET_WAIT_MS = Number(process.env.BENCH_QUIET_WAIT ?? '120') * 1000;
const REPO = fileURLToPath(new URL('../../', import.meta.url));
const OUT = process.env.BENCH_OUT ? path.resolve(process.env.BENCH_OUT) : path.join(REPO, 'bench', 'results', 'latest.json');
const AGENT_ID = 'bench';
const DISK_ID = 'disk0';
/** The fastest cipher OpenSSH offers here: rsync gets its best case. */
const SSH_CIPHER = 'aes128-gcm@openssh.com';

if (!Number.isInteger(RUNS) || RUNS < 1) throw new Error(`BENCH_RUNS must be a positive integer, got ${process.env.BENCH_RUNS}`);
if (SIZE <= 0 || SIZE % 4096 !== 0) throw new Error(`BENCH_SIZE must be a positive multiple of 4 KiB, got ${process.env.BENCH_SIZE}`);

const say = (s: string) => process.stdout.write(s + '\n');
const load = new LoadMonitor();

// ---------------------------------------------------------------- processes

async function must(cmd: string, args: string[], what: string): Promise<Exec> {
  const r = await exec(cmd, args);
  if (r.code !== 0) throw new Error(`${what} failed (exit ${r.code ?? r.signal}): ${(r.stderr || r.stdout).slice(-2000)}`);
  return r;
}

const syncAll = () => must('sync', [], 'sync');

/** Finds an executable on PATH or in the usual sbin directories (sshd is not on a normal user's PATH). */
function findTool(name: string, pkg: string): string {
  const dirs = [...(process.env.PATH ?? '').split(':'), '/usr/sbin', '/usr/local/sbin', '/sbin'].filter(Boolean);
  for (const d of dirs) {
    const p = path.join(d, name);
    try {
      fs.accessSync(p, fs.constants.X_OK);
      return p;
    } catch { /* next */ }
  }
  throw new Error(`benchmark needs '${name}', which is not installed: apt-get install --no-install-recommends ${pkg}`);
}

// ---------------------------------------------------------------- statistics

// ---------------------------------------------------------------- sshd

interface Sshd { child: ChildProcess; port: number; rsh: string; dest: string; sshArgs: string[]; ssh: string }

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const port = (s.address() as net.AddressInfo).port;
      s.close(() => resolve(port));
    });
  });
}

async function startSshd(dir: string): Promise<Sshd> {
  const sshd = findTool('sshd', 'openssh-server');
  const keygen = findTool('ssh-keygen', 'openssh-client');
  const ssh = findTool('ssh', 'openssh-client');
  await fsp.mkdir(dir, { recursive: true, mode: 0o700 });
  const hostKey = path.join(dir, 'host_ed25519');
  const userKey = path.join(dir, 'user_ed25519');
  await must(keygen, ['-q', '-t', 'ed25519', '-N', '', '-C', 'mobility-bench-host', '-f', hostKey], 'ssh-keygen (host key)');
  await must(keygen, ['-q', '-t', 'ed25519', '-N', '', '-C', 'mobility-bench-user', '-f', userKey], 'ssh-keygen (user key)');
  const authorized = path.join(dir, 'authorized_keys');
  await fsp.writeFile(authorized, await fsp.readFile(userKey + '.pub'), { mode: 0o600 });
  // sshd insists on its privilege-separation directory (the distribution's service unit creates it)
  if (process.getuid?.() === 0) await fsp.mkdir('/run/sshd', { recursive: true, mode: 0o755 }).catch(() => undefined);
  const user = os.userInfo().username;
  const knownHosts = path.join(dir, 'known_hosts');
  let lastErr = '';
  for (let attempt = 0; attempt < 5; attempt++) {
    const port = await freePort();
    const config = path.join(dir, 'sshd_config');
    await fsp.writeFile(config, [
      `Port ${port}`, 'ListenAddress 127.0.0.1', `HostKey ${hostKey}`, `PidFile ${path.join(dir, 'sshd.pid')}`,
      `AuthorizedKeysFile ${authorized}`, 'PubkeyAuthentication yes', 'PasswordAuthentication no', 'KbdInteractiveAuthentication no',
      'PermitRootLogin prohibit-password', 'UsePAM no', 'StrictModes no', 'PrintMotd no', 'X11Forwarding no', 'LogLevel ERROR', '',
    ].join('\n'));
    await must(sshd, ['-t', '-f', config], 'sshd config test');
    await fsp.writeFile(knownHosts, `[127.0.0.1]:${port} ${(await fsp.readFile(hostKey + '.pub', 'utf8')).trim()}\n`);
    const child = spawn(sshd, ['-D', '-e', '-f', config], { stdio: ['ignore', 'ignore', 'pipe'] });
    let err = '';
    child.stderr!.on('data', (d: Buffer) => { err += d.toString(); if (err.length > 65536) err = err.slice(-32768); });
    const sshArgs = [
      '-F', '/dev/null', '-i', userKey, '-p', String(port), '-o', 'IdentitiesOnly=yes', '-o', 'BatchMode=yes',
      '-o', `UserKnownHostsFile=${knownHosts}`, '-o', 'StrictHostKeyChecking=yes', '-o', `Ciphers=${SSH_CIPHER}`,
      '-o', 'Compression=no', '-o', 'LogLevel=ERROR',
    ];
    const dest = `${user}@127.0.0.1`;
    const deadline = Date.now() + 15_000;
    let probe: Exec | null = null;
    while (Date.now() < deadline && child.exitCode === null) {
      probe = await exec(ssh, [...sshArgs, dest, 'true']);
      if (probe.code === 0) break;
      await new Promise((r) => setTimeout(r, 200));
    }
    if (probe?.code === 0 && child.exitCode === null) {
      return { child, port, rsh: [ssh, ...sshArgs].join(' '), dest, sshArgs, ssh };
    }
    child.kill('SIGTERM');
    lastErr = `sshd: ${err.trim() || '(no output)'}; ssh: ${probe?.stderr.trim() ?? '(not tried)'}`;
    if (!/address already in use/i.test(err)) break;
  }
  throw new Error(`could not start a private sshd on 127.0.0.1 and log in with a key (${lastErr}). `
    + 'Needs openssh-server and openssh-client; the login user\'s account must not be locked (usermod -p \'*\' USER).');
}

// ---------------------------------------------------------------- ours

interface Resources { maxRssBytes: number; userCpuSec: number; systemCpuSec: number }
interface Stats { bytesScanned: number; blocksSent: number; pagesSent: number; bytesChanged: number; bytesSent: number; zeroBlocks: number; mismatchBytes: number }
interface AgentJson { disks: { kind: string; reason: string; durationMs: number; stats: Stats }[]; resources: Resources }
interface AgentRun { ms: number; otherCpuSec: number; ownCpuSec: number; kernelThreadCpuSec: number; kind: string; passMs: number; stats: Stats; resources: Resources }

function stoppedResources(s: SpawnedServer): Resources | null {
  const lines = s.stderr().split('\n').reverse();
  for (const l of lines) {
    if (!l.includes('"stopped"')) continue;
    try {
      const rec = JSON.parse(l) as { message?: string; resources?: Resources };
      if (rec.message === 'stopped' && rec.resources) return rec.resources;
    } catch { /* not JSON */ }
  }
  return null;
}

// ---------------------------------------------------------------- main

interface Row { measurement: string; ours: number; peer: number | null; ratio: number | null; unit: string; target: string; met: boolean | null }

async function main(): Promise<void> {
  for (const [t, p] of [['rsync', 'rsync'], ['sshd', 'openssh-server'], ['ssh', 'openssh-client'], ['ssh-keygen', 'openssh-client'], ['cp', 'coreutils'], ['cat', 'coreutils'], ['wc', 'coreutils'], ['sync', 'coreutils']]) findTool(t, p);
  if (!fs.existsSync(CLI_PATH)) throw new Error(`${CLI_PATH} is missing: build first (npm run bench builds)`);
  await initClock();

  const work = await fsp.mkdtemp(path.join(os.tmpdir(), 'mobility-bench-'));
  let sshd: Sshd | null = null;
  const servers = new Set<SpawnedServer>();
  const cleanup = async () => {
    for (const s of servers) await stopServer(s).catch(() => undefined);
    if (sshd && sshd.child.exitCode === null) {
      const c = sshd.child;
      await new Promise<void>((r) => { c.once('exit', () => r()); c.kill('SIGTERM'); });
    }
    if (!KEEP) await fsp.rm(work, { recursive: true, force: true });
    else say(`work directory kept: ${work}`);
  };
  const onSignal = (sig: NodeJS.Signals) => {
    say(`\n${sig}: cleaning up`);
    void cleanup().finally(() => process.exit(130));
  };
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);

  try {
    const image = path.join(work, 'disk0.img');
    const srvDir = path.join(work, 'server');
    const template = path.join(work, 'server-template');
    const agentDir = path.join(work, 'agent');
    const replica = path.join(srvDir, 'replicas', AGENT_ID, DISK_ID, 'replica.img');
    const rsyncTarget = path.join(work, 'rsync-target.img');
    const cpTarget = path.join(work, 'cp-target.img');

    const [rsyncVersion, sshVersion, fsType, gitHead, gitDirty] = await Promise.all([
      exec('rsync', ['--version']).then((r) => r.stdout.split('\n')[0].trim()),
      exec('ssh', ['-V']).then((r) => (r.stderr || r.stdout).trim()),
      exec('stat', ['-f', '-c', '%T', work]).then((r) => r.stdout.trim()),
      exec('git', ['-C', REPO, 'rev-parse', 'HEAD']).then((r) => (r.code === 0 ? r.stdout.trim() : null), () => null),
      exec('git', ['-C', REPO, 'status', '--porcelain', '--', 'src']).then((r) => (r.code === 0 ? r.stdout.trim().split('\n').filter(Boolean) : null), () => null),
    ]);
    const machine = {
      nproc: os.availableParallelism(), cpuModel: os.cpus()[0]?.model ?? '?', memoryBytes: os.totalmem(), kernel: os.release(),
      platform: `${os.type()} ${os.arch()}`, node: process.version, rsync: rsyncVersion, ssh: sshVersion, workFsType: fsType,
      loadAvgAtStart: os.loadavg(), loadAvgAtEnd: [] as number[],
    };
    say(`Mobility benchmark: image ${(SIZE / MiB).toFixed(0)} MiB, 1 warm-up + ${RUNS} timed run(s) per measurement`);
    say(`machine: ${machine.nproc} cpu (${machine.cpuModel}), ${(machine.memoryBytes / 2 ** 30).toFixed(1)} GiB, kernel ${machine.kernel}, node ${machine.node}, work fs ${fsType}`);
    say('page cache: nothing is dropped; every tool reads its input from cache');
    {
      const a = load.sample();
      await new Promise((r) => setTimeout(r, 2000));
      const other = load.other(a);
      if (other > 0.2) say(`WARNING: other processes use ${(50 * other).toFixed(0)}% of one core right now; timed rounds wait for quiet, figures may still be noisy`);
    }

    say('generating the image...');
    const { kinds } = await writeSampleImage(image, SIZE, 1);
    const count: Record<RegionKind, number> = { zero: 0, random: 0, text: 0 };
    for (const k of kinds) count[k]++;
    let imageSha = await sha256File(image);
    say(`  regions: ${count.zero} zero, ${count.random} random, ${count.text} text (256 KiB each)`);

    say('starting a private sshd on 127.0.0.1...');
    sshd = await startSshd(path.join(work, 'ssh'));
    if (sshd.child.pid) load.pids.add(sshd.child.pid);
    say(`  sshd on port ${sshd.port}, cipher ${SSH_CIPHER}, ${sshVersion}, ${rsyncVersion}`);

    // server identity (CA, certificate, token) made once; each initial run copies it into a fresh data dir
    {
      const s = await spawnServer(template);
      await stopServer(s);
      await fsp.rm(path.join(template, 'replicas'), { recursive: true, force: true });
    }
    const freshServerDir = async () => {
      await fsp.rm(srvDir, { recursive: true, force: true });
      await fsp.mkdir(srvDir, { recursive: true, mode: 0o700 });
      await fsp.cp(path.join(template, 'tls'), path.join(srvDir, 'tls'), { recursive: true });
      await fsp.cp(path.join(template, 'token'), path.join(srvDir, 'token'));
    };
    const startServer = async () => {
      const s = await spawnServer(srvDir);
      servers.add(s);
      if (s.child.pid) load.pids.add(s.child.pid);
      return s;
    };
    const endServer = async (s: SpawnedServer) => {
      await stopServer(s);
      servers.delete(s);
      if (s.child.pid) load.pids.delete(s.child.pid); // reaped: its CPU is now in our cutime
      return stoppedResources(s);
    };

    /** Before a timed round: wait for other load on the machine to settle (noted in the results). */
    const quiet = async () => {
      const waited = await load.waitQuiet(QUIET_WAIT_MS);
      if (waited >= 1000) say(`  (waited ${(waited / 1000).toFixed(0)} s for other load on the machine to settle)`);
      return waited;
    };

    const runAgent = async (s: SpawnedServer, mode: string, expectKind: string, extra: string[] = []): Promise<AgentRun> => {
      const args = [
        CLI_PATH, 'replicate', '--server', s.info.url, '--token-file', s.info.tokenFile, '--ca', s.info.caFile!,
        '--disk', `${image}=${DISK_ID}`, '--agent-id', AGENT_ID, '--state-dir', agentDir, '--json', '--json-logs', '--mode', mode, ...extra,
      ];
      const l0 = load.sample();
      const r = await exec(process.execPath, args);
      const cpu = load.since(l0);
      if (r.code !== 0) throw new Error(`mobility replicate --mode ${mode} failed (exit ${r.code ?? r.signal}): ${r.stderr.slice(-3000)}`);
      const j = JSON.parse(r.stdout) as AgentJson;
      const d = j.disks[0];
      if (d.kind !== expectKind) throw new Error(`expected a ${expectKind} pass, the agent ran ${d.kind} (${d.reason})`);
      return { ms: r.ms, ...cpu, kind: d.kind, passMs: d.durationMs, stats: d.stats, resources: j.resources };
    };

    const checkSame = async (what: string, file: string) => {
      const h = await sha256File(file);
      if (h !== imageSha) throw new Error(`CORRECTNESS: ${what} differs from the source image (sha256 ${h} != ${imageSha})`);
    };

    const rsyncStats = (out: string) => {
      const num = (label: string) => {
        const m = new RegExp(`^${label}:\\s*([0-9.,]+)`, 'm').exec(out);
        return m ? Number(m[1].replace(/[.,]/g, '')) : NaN;
      };
      return { bytesSent: num('Total bytes sent'), bytesReceived: num('Total bytes received'), literalData: num('Literal data'), matchedData: num('Matched data') };
    };
    const runRsync = async (args: string[]) => {
      await syncAll();
      const l0 = load.sample();
      const t0 = performance.now();
      const r = await must('rsync', [...args, '--stats', '--no-h', '-e', sshd!.rsh, image, `${sshd!.dest}:${rsyncTarget}`], 'rsync');
      const t1 = performance.now();
      await syncAll();
      const t2 = performance.now();
      return { ms: t2 - t0, ...load.since(l0), rsyncMs: t1 - t0, syncMs: t2 - t1, ...rsyncStats(r.stdout) };
    };

    // ------------------------------------------------------------ 3. initial
    say('\n[initial] ours (fresh replica, wss) vs rsync -W --sparse over ssh + sync vs cp --sparse=always + sync');
    const initial = {
      ours: [] as (AgentRun & { server: Resources | null; serverCpuDuringRunSec: number | null })[],
      rsync: [] as Awaited<ReturnType<typeof runRsync>>[],
      cp: [] as { ms: number; otherCpuSec: number; ownCpuSec: number; kernelThreadCpuSec: number; cpMs: number; syncMs: number }[],
      waitedForQuietMs: [] as number[],
    };
    for (let r = 0; r <= RUNS; r++) {
      const label = r === 0 ? 'warm-up' : `run ${r}/${RUNS}`;
      if (r > 0) initial.waitedForQuietMs.push(await quiet());
      await freshServerDir();
      await fsp.rm(agentDir, { recursive: true, force: true });
      const s = await startServer();
      await syncAll();
      const cpu0 = procCpuSec(s.child.pid);
      const ours = await runAgent(s, 'auto', 'initial');
      const cpu1 = procCpuSec(s.child.pid);
      const server = await endServer(s);
      await checkSame('replica after initial', replica);

      await fsp.rm(rsyncTarget, { force: true });
      const rs = await runRsync(['-W', '--sparse']);
      await checkSame('rsync target', rsyncTarget);

      await fsp.rm(cpTarget, { force: true });
      await syncAll();
      const l0 = load.sample();
      const t0 = performance.now();
      await must('cp', ['--sparse=always', image, cpTarget], 'cp');
      const t1 = performance.now();
      await syncAll();
      const t2 = performance.now();
      const cpCpu = load.since(l0);
      const cpOther = cpCpu.otherCpuSec;
      await checkSame('cp target', cpTarget);
      await fsp.rm(cpTarget, { force: true });

      say(`  ${label}: ours ${(ours.ms / 1000).toFixed(2)} s (${(ours.stats.bytesSent / MiB).toFixed(0)} MiB on the wire, agent RSS ${(ours.resources.maxRssBytes / MiB).toFixed(0)} MiB, server RSS ${server ? (server.maxRssBytes / MiB).toFixed(0) : '?'} MiB)`
        + `, rsync ${(rs.ms / 1000).toFixed(2)} s (sync ${(rs.syncMs / 1000).toFixed(2)}), cp ${((t2 - t0) / 1000).toFixed(2)} s (sync ${((t2 - t1) / 1000).toFixed(2)})`
        + `; other load ${ours.otherCpuSec.toFixed(1)}/${rs.otherCpuSec.toFixed(1)}/${cpOther.toFixed(1)} cpu-s`);
      if (r === 0) continue;
      initial.ours.push({ ...ours, server, serverCpuDuringRunSec: cpu0 !== null && cpu1 !== null ? cpu1 - cpu0 : null });
      initial.rsync.push(rs);
      initial.cp.push({ ms: t2 - t0, ...cpCpu, cpMs: t1 - t0, syncMs: t2 - t1 });
    }

    // ------------------------------------------------------------ 4. incremental
    // the last initial run left: replica == image (ours, with its agent state) and rsync target == image
    say('\n[incremental] 1% churn: ours (auto -> incremental) vs rsync --inplace --no-whole-file over ssh + sync');
    const srv = await startServer();
    await checkSame('replica before incremental', replica);
    await checkSame('rsync target before incremental', rsyncTarget);
    const incremental = { ours: [] as AgentRun[], rsync: [] as Awaited<ReturnType<typeof runRsync>>[], changedBytes: [] as number[], written: [] as Record<RegionKind, number>[], waitedForQuietMs: [] as number[] };
    for (let r = 0; r <= RUNS; r++) {
      const label = r === 0 ? 'warm-up' : `run ${r}/${RUNS}`;
      if (r > 0) incremental.waitedForQuietMs.push(await quiet());
      const written = await churnImage(image, SIZE, 0.01, r, kinds);
      imageSha = await sha256File(image);
      const changed = written.zero + written.random + written.text;
      await syncAll();
      const ours = await runAgent(srv, 'auto', 'incremental');
      await checkSame('replica after incremental', replica);
      // -I: always delta-transfer, never skip on size+mtime
      const rs = await runRsync(['--inplace', '--no-whole-file', '-I']);
      await checkSame('rsync target after incremental', rsyncTarget);
      say(`  ${label}: churn ${(changed / MiB).toFixed(1)} MiB; ours ${(ours.ms / 1000).toFixed(2)} s, ${(ours.stats.bytesSent / MiB).toFixed(2)} MiB on the wire`
        + `; rsync ${(rs.ms / 1000).toFixed(2)} s (sync ${(rs.syncMs / 1000).toFixed(2)}), ${(rs.bytesSent / MiB).toFixed(2)} MiB sent, ${(rs.bytesReceived / MiB).toFixed(2)} MiB received`
        + `; other load ${ours.otherCpuSec.toFixed(1)}/${rs.otherCpuSec.toFixed(1)} cpu-s`);
      if (r === 0) continue;
      incremental.ours.push(ours);
      incremental.rsync.push(rs);
      incremental.changedBytes.push(changed);
      incremental.written.push(written);
    }

    // compression is what this measures: --compress always, as on a metered or slow link (on
    // loopback the default, auto, rightly sends raw: the link is never the bottleneck)
    say('\n[text churn] 1% churn inside text regions only: ours (--compress always) wire bytes / changed bytes (rsync for reference)');
    const textChurn = { ours: [] as AgentRun[], rsync: [] as Awaited<ReturnType<typeof runRsync>>[], changedBytes: [] as number[], ratio: [] as number[], rsyncRatio: [] as number[] };
    for (let r = 1; r <= RUNS; r++) {
      const written = await churnImage(image, SIZE, 0.01, 100 + r, kinds, 'text');
      imageSha = await sha256File(image);
      await syncAll();
      const ours = await runAgent(srv, 'auto', 'incremental', ['--compress', 'always']);
      await checkSame('replica after text churn', replica);
      const rs = await runRsync(['--inplace', '--no-whole-file', '-I']);
      await checkSame('rsync target after text churn', rsyncTarget);
      const ratio = ours.stats.bytesSent / written.text;
      say(`  run ${r}/${RUNS}: churn ${(written.text / MiB).toFixed(1)} MiB text; ours ${(ours.stats.bytesSent / MiB).toFixed(2)} MiB on the wire (ratio ${ratio.toFixed(3)}), `
        + `rsync ${(rs.bytesSent / MiB).toFixed(2)} MiB sent (ratio ${(rs.bytesSent / written.text).toFixed(3)})`);
      textChurn.ours.push(ours);
      textChurn.rsync.push(rs);
      textChurn.changedBytes.push(written.text);
      textChurn.ratio.push(ratio);
      textChurn.rsyncRatio.push(rs.bytesSent / written.text);
    }

    // ------------------------------------------------------------ 5. resync
    say('\n[resync] checksum resync of identical disks vs cat image | wc -c');
    const resync = { ours: [] as AgentRun[], cat: [] as number[], catOtherCpuSec: [] as number[], catOwnCpuSec: [] as number[], catKernelThreadCpuSec: [] as number[], waitedForQuietMs: [] as number[] };
    const quoted = `'${image.replace(/'/g, `'\\''`)}'`;
    for (let r = 0; r <= RUNS; r++) {
      const label = r === 0 ? 'warm-up' : `run ${r}/${RUNS}`;
      if (r > 0) resync.waitedForQuietMs.push(await quiet());
      await syncAll();
      const ours = await runAgent(srv, 'resync', 'resync');
      if (ours.stats.pagesSent !== 0 || ours.stats.mismatchBytes !== 0) throw new Error(`CORRECTNESS: resync of identical disks shipped ${ours.stats.pagesSent} pages`);
      const l0 = load.sample();
      const cat = await must('sh', ['-c', `cat ${quoted} | wc -c`], 'cat | wc -c');
      const catCpu = load.since(l0);
      const catOther = catCpu.otherCpuSec;
      if (Number(cat.stdout.trim()) !== SIZE) throw new Error(`cat | wc -c counted ${cat.stdout.trim()}, expected ${SIZE}`);
      say(`  ${label}: ours ${(ours.ms / 1000).toFixed(2)} s, cat|wc ${(cat.ms / 1000).toFixed(2)} s; other load ${ours.otherCpuSec.toFixed(1)}/${catOther.toFixed(1)} cpu-s`);
      if (r === 0) continue;
      resync.ours.push(ours);
      resync.cat.push(cat.ms);
      resync.catOtherCpuSec.push(catOther);
      resync.catOwnCpuSec.push(catCpu.ownCpuSec);
      resync.catKernelThreadCpuSec.push(catCpu.kernelThreadCpuSec);
    }
    await checkSame('replica after resync', replica);
    const srvLater = await endServer(srv);
    machine.loadAvgAtEnd = os.loadavg();

    // ------------------------------------------------------------ results
    const med = (xs: number[]) => median(xs);
    const ms = {
      initialOurs: med(initial.ours.map((x) => x.ms)), initialRsync: med(initial.rsync.map((x) => x.ms)), initialCp: med(initial.cp.map((x) => x.ms)),
      incOurs: med(incremental.ours.map((x) => x.ms)), incRsync: med(incremental.rsync.map((x) => x.ms)),
      resyncOurs: med(resync.ours.map((x) => x.ms)), cat: med(resync.cat),
    };
    const agentRss = Math.max(...initial.ours.map((x) => x.resources.maxRssBytes));
    const serverRssList = initial.ours.map((x) => x.server?.maxRssBytes ?? NaN);
    const serverRss = Math.max(...serverRssList);
    const incWireOurs = med(incremental.ours.map((x) => x.stats.bytesSent));
    const incWireRsync = med(incremental.rsync.map((x) => x.bytesSent));
    const incChanged = med(incremental.changedBytes);
    const textRatio = med(textChurn.ratio);
    const s = (x: number) => x / 1000;
    const rows: Row[] = [
      { measurement: 'initial: ours vs rsync -W --sparse (+sync)', ours: s(ms.initialOurs), peer: s(ms.initialRsync), ratio: ms.initialOurs / ms.initialRsync, unit: 's', target: '<= 0.50', met: ms.initialOurs / ms.initialRsync <= 0.5 },
      { measurement: 'initial: ours vs cp --sparse=always (+sync)', ours: s(ms.initialOurs), peer: s(ms.initialCp), ratio: ms.initialOurs / ms.initialCp, unit: 's', target: '<= 2.00', met: ms.initialOurs / ms.initialCp <= 2 },
      { measurement: 'incremental 1%: ours vs rsync --inplace (+sync)', ours: s(ms.incOurs), peer: s(ms.incRsync), ratio: ms.incOurs / ms.incRsync, unit: 's', target: '<= 0.40 (2.5x faster)', met: ms.incOurs / ms.incRsync <= 0.4 },
      { measurement: 'incremental 1%: wire bytes, ours vs rsync sent', ours: incWireOurs / MiB, peer: incWireRsync / MiB, ratio: incWireOurs / incWireRsync, unit: 'MiB', target: '-', met: null },
      { measurement: 'incremental 1%: ours wire / changed bytes', ours: incWireOurs / MiB, peer: incChanged / MiB, ratio: incWireOurs / incChanged, unit: 'MiB', target: '-', met: null },
      { measurement: 'text churn: ours (compress always) wire / changed bytes', ours: med(textChurn.ours.map((x) => x.stats.bytesSent)) / MiB, peer: med(textChurn.changedBytes) / MiB, ratio: textRatio, unit: 'MiB', target: '<= 0.60', met: textRatio <= 0.6 },
      { measurement: 'resync identical: ours vs cat | wc -c', ours: s(ms.resyncOurs), peer: s(ms.cat), ratio: ms.resyncOurs / ms.cat, unit: 's', target: '<= 1.30', met: ms.resyncOurs / ms.cat <= 1.3 },
      { measurement: 'initial: agent peak RSS (max of runs)', ours: agentRss / MiB, peer: null, ratio: null, unit: 'MiB', target: '<= 200 MiB', met: agentRss <= 200 * MiB },
      { measurement: 'initial: server peak RSS (max of runs)', ours: serverRss / MiB, peer: null, ratio: null, unit: 'MiB', target: '<= 200 MiB', met: serverRss <= 200 * MiB },
      { measurement: 'initial: CPU s, ours (agent+server) vs rsync (all procs)', ours: med(initial.ours.map((x) => x.ownCpuSec)), peer: med(initial.rsync.map((x) => x.ownCpuSec)), ratio: med(initial.ours.map((x) => x.ownCpuSec)) / med(initial.rsync.map((x) => x.ownCpuSec)), unit: 's', target: '-', met: null },
      { measurement: 'initial: CPU s, ours vs cp + sync', ours: med(initial.ours.map((x) => x.ownCpuSec)), peer: med(initial.cp.map((x) => x.ownCpuSec)), ratio: med(initial.ours.map((x) => x.ownCpuSec)) / med(initial.cp.map((x) => x.ownCpuSec)), unit: 's', target: '-', met: null },
      { measurement: 'incremental 1%: CPU s, ours vs rsync', ours: med(incremental.ours.map((x) => x.ownCpuSec)), peer: med(incremental.rsync.map((x) => x.ownCpuSec)), ratio: med(incremental.ours.map((x) => x.ownCpuSec)) / med(incremental.rsync.map((x) => x.ownCpuSec)), unit: 's', target: '-', met: null },
      { measurement: 'resync: CPU s, ours vs cat | wc -c', ours: med(resync.ours.map((x) => x.ownCpuSec)), peer: med(resync.catOwnCpuSec), ratio: med(resync.ours.map((x) => x.ownCpuSec)) / med(resync.catOwnCpuSec), unit: 's', target: '-', met: null },
      { measurement: 'initial: agent CPU user+sys', ours: med(initial.ours.map((x) => x.resources.userCpuSec + x.resources.systemCpuSec)), peer: null, ratio: null, unit: 's', target: '-', met: null },
      { measurement: 'initial: server CPU user+sys (whole process)', ours: med(initial.ours.map((x) => (x.server ? x.server.userCpuSec + x.server.systemCpuSec : NaN))), peer: null, ratio: null, unit: 's', target: '-', met: null },
    ];

    const fmt = (x: number | null, d = 2) => (x === null ? '-' : Number.isFinite(x) ? x.toFixed(d) : '?');
    const table: string[][] = [['measurement', 'ours (median)', 'peer (median)', 'ratio', 'target', 'met?']];
    for (const r of rows) {
      table.push([r.measurement, `${fmt(r.ours)} ${r.unit}`, r.peer === null ? '-' : `${fmt(r.peer)} ${r.unit}`, fmt(r.ratio, 3), r.target, r.met === null ? '-' : r.met ? 'yes' : 'NO']);
    }
    const widths = table[0].map((_, i) => Math.max(...table.map((row) => row[i].length)));
    say(`\nResults (${(SIZE / MiB).toFixed(0)} MiB image, median of ${RUNS} timed run(s) after a warm-up; page cache not dropped; ratio = ours / peer)`);
    table.forEach((row, i) => {
      say(row.map((c, j) => c.padEnd(widths[j])).join('  '));
      if (i === 0) say(widths.map((w) => '-'.repeat(w)).join('  '));
    });

    // a timed run is 'disturbed' when other processes used more than 15% of one core on average during it (and > 0.1 cpu-s: ticks are 10 ms)
    const disturbed: string[] = [];
    const flag = (what: string, runs: { ms: number; other: number }[]) => runs.forEach((x, i) => {
      if (x.other > Math.max(0.1, 0.15 * (x.ms / 1000))) disturbed.push(`${what} run ${i + 1}: others used ${x.other.toFixed(1)} cpu-s in ${(x.ms / 1000).toFixed(1)} s`);
    });
    flag('initial ours', initial.ours.map((x) => ({ ms: x.ms, other: x.otherCpuSec })));
    flag('initial rsync', initial.rsync.map((x) => ({ ms: x.ms, other: x.otherCpuSec })));
    flag('initial cp', initial.cp.map((x) => ({ ms: x.ms, other: x.otherCpuSec })));
    flag('incremental ours', incremental.ours.map((x) => ({ ms: x.ms, other: x.otherCpuSec })));
    flag('incremental rsync', incremental.rsync.map((x) => ({ ms: x.ms, other: x.otherCpuSec })));
    flag('resync ours', resync.ours.map((x) => ({ ms: x.ms, other: x.otherCpuSec })));
    flag('cat | wc', resync.cat.map((ms, i) => ({ ms, other: resync.catOtherCpuSec[i] })));
    if (disturbed.length) {
      say('\nother processes were busy during these timed runs:');
      for (const d of disturbed) say(`  ${d}`);
    } else say('\nno timed run saw other load above 15% of one core');

    const result = {
      date: new Date().toISOString(),
      config: {
        sizeBytes: SIZE, timedRuns: RUNS, warmupRuns: 1, pageCacheDropped: false, sshCipher: SSH_CIPHER, sampleImageSeed: 1,
        regions: count, transport: 'wss on 127.0.0.1 (TLS, ws + bufferutil)', peerSync: 'sync after rsync and cp, inside the timed interval; untimed sync before every timed command',
        incrementalChurnSeeds: Array.from({ length: RUNS }, (_, i) => i + 1), textChurnSeeds: Array.from({ length: RUNS }, (_, i) => 101 + i),
      },
      machine,
      code: { commit: gitHead, uncommittedSrcFiles: gitDirty },
      disturbedRuns: disturbed,
      medians: { ...ms, incWireOurs, incWireRsync, incChanged, textRatio, agentRssBytes: agentRss, serverRssBytes: serverRss },
      rows,
      raw: {
        initial, incremental, textChurn, resync,
        serverAfterIncrementalAndResync: srvLater,
      },
    };
    await fsp.mkdir(path.dirname(OUT), { recursive: true });
    const tmp = OUT + '.tmp';
    await fsp.writeFile(tmp, JSON.stringify(result, null, 2) + '\n');
    await fsp.rename(tmp, OUT);
    const rel = path.relative(process.cwd(), OUT);
    say(`\nraw results: ${rel && !rel.startsWith('..') ? rel : OUT}`);
  } finally {
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
    await cleanup();
  }
}

main().then(
  () => process.exit(0),
  (err: unknown) => {
    process.stderr.write(`benchmark failed: ${err instanceof Error ? err.stack ?? err.message : String(err)}\n`);
    process.exit(1);
  },
);
