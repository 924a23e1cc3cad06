/**
 * `mobility demo` as root: the whole product on this machine, with real processes and a real
 * block device. A `mobility server` on 127.0.0.1 (TLS, new CA), a 128 MiB loop device with ext4
 * and files on it, `mobility register` with the server's passphrase, `mobility agent` (the
 * Mobility service) with its control connection, a policy, `enable` (preflight on the agent),
 * the initial replication with its progress, continuous protection with three recovery points
 * taken after changing files, and a test failover of the middle point proven by `e2fsck -fn`
 * of the image and the checksums of every file as they were at that point (and the files
 * written after it absent). Then status, the points, and the console URL to open.
 *
 * On a terminal it waits for Enter before tearing down (so the console can be opened);
 * elsewhere it tears down at once: disable (the agent removes its trace instance), stop the
 * agent and the server, unmount, detach the loop device, remove the work directory (unless
 * --keep). SIGINT/SIGTERM tear down the same way.
 */
import { execFile, execFileSync, spawn, type ChildProcess } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { MobilityError } from '../errors.js';
import { CLI_PATH, spawnServer, stopServer, type SpawnedServer } from '../server/spawn.js';
import { TracefsTracker } from '../source/tracker/tracefs.js';
import { api, fmtAge, serverConn, type ApiConn } from './api-client.js';
import { fmtBytes, table } from './progress.js';

const DISK_MB = 128;
const TOOLS = ['losetup', 'mkfs.ext4', 'e2fsck', 'mount', 'umount', 'fsfreeze'];
const WAIT_MS = 300_000;

/** Why the whole-product demo cannot run here (null: it can): root, tracefs, the tools. */
export function fullDemoBlocker(): string | null {
  if (process.getuid?.() !== 0) return 'not root (continuous protection tracks a block device through tracefs)';
  if (!['/sys/kernel/tracing/instances', '/sys/kernel/debug/tracing/instances'].some((d) => fs.existsSync(d))) return 'tracefs is not mounted (mount -t tracefs nodev /sys/kernel/tracing)';
  for (const t of TOOLS) {
    if (!['/usr/sbin', '/usr/bin', '/sbin', '/bin'].some((d) => fs.existsSync(path.join(d, t)))) return `${t} is missing (apt-get install e2fsprogs util-linux mount)`;
  }
  return null;
}

const sh = (cmd: string, args: string[]) => execFileSync(cmd, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
const shAsync = (cmd: string, args: string[], cwd?: string) => new Promise<{ code: number; out: string }>((resolve) => {
  execFile(cmd, args, { encoding: 'utf8', cwd, timeout: WAIT_MS, maxBuffer: 16 << 20 }, (err, stdout, stderr) => resolve({ code: err ? (typeof err.code === 'number' ? err.code : 1) : 0, out: stdout + stderr }));
});

function cli(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(process.execPath, [CLI_PATH, ...args], { encoding: 'utf8', timeout: WAIT_MS }, (err, stdout, stderr) => {
      resolve({ code: err ? (typeof err.code === 'number' ? err.code : 1) : 0, stdout, stderr });
    });
  });
}

async function waitFor<T>(what: string, fn: () => Promise<T | null | undefined | false>, ms = WAIT_MS): Promise<T> {
  const end = Date.now() + ms;
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() > end) throw new MobilityError('MOB_ERR_INTERNAL', `the demo gave up waiting for ${what} after ${ms / 1000} s`);
    await new Promise((r) => setTimeout(r, 250));
  }
}

/** Writes n files of mixed content (random and text) under dir/batch-NAME; returns nothing: checksums are taken of the whole tree. */
async function writeFiles(dir: string, name: string, n: number): Promise<void> {
  const d = path.join(dir, `batch-${name}`);
  await fsp.mkdir(d, { recursive: true });
  for (let i = 0; i < n; i++) {
    const text = Buffer.from(`${name} file ${i}: ${'the quick brown fox jumps over the lazy dog '.repeat(4000)}`);
    await fsp.writeFile(path.join(d, `f${i}.bin`), Buffer.concat([crypto.randomBytes(256 * 1024), text]));
  }
}

/** sha256 of every file under dir, by relative path. */
async function checksums(dir: string): Promise<Map<string, string>> {
  const out = new Map<string, string>();
  const walk = async (rel: string) => {
    for (const e of await fsp.readdir(path.join(dir, rel), { withFileTypes: true })) {
      const r = path.join(rel, e.name);
      if (e.isDirectory()) { if (e.name !== 'lost+found') await walk(r); } else if (e.isFile()) {
        out.set(r, crypto.createHash('sha256').update(await fsp.readFile(path.join(dir, r))).digest('hex'));
      }
    }
  };
  await walk('');
  return out;
}

interface DiskView { agent: string; disk: string; state: string; progressPermille?: number | null; rpoMs: number | null; points: number; reason: string }

export async function runFullDemo(opts: { dir?: string; keep?: boolean }): Promise<number> {
  const out = (s: string) => process.stdout.write(s + '\n');
  const dir = opts.dir ?? (await fsp.mkdtemp(path.join(os.tmpdir(), 'mobility-demo-')));
  await fsp.mkdir(dir, { recursive: true });
  let server: SpawnedServer | null = null;
  let agent: ChildProcess | null = null;
  let loop: string | null = null;
  let mounted: string[] = [];
  let conn: ApiConn | null = null;
  let agentId: string | null = null;
  let enabled = false;
  let tornDown: Promise<void> | null = null;

  const teardown = () => (tornDown ??= (async () => {
    out('tearing down: disable protection, stop the agent and the server, unmount, detach the loop device');
    if (conn && agentId && enabled) {
      await api(conn, 'POST', '/v1/disable', { machine: agentId, disk: 'data', keepReplica: false }).catch(() => undefined);
      // the agent removes its trace instance once it has no disk left
      const gone = () => !fs.readdirSync('/sys/kernel/tracing/instances').some((n) => n.startsWith(`mobility-${agentId}-`));
      await waitFor('the trace instance removed', async () => { try { return gone(); } catch { return true; } }, 30_000).catch(() => undefined);
    }
    if (agent && agent.exitCode === null && agent.signalCode === null) {
      const a = agent;
      await new Promise<void>((r) => { const k = setTimeout(() => a.kill('SIGKILL'), 30_000); a.once('exit', () => { clearTimeout(k); r(); }); a.kill('SIGTERM'); });
    }
    if (agentId) {
      try {
        for (const n of fs.readdirSync('/sys/kernel/tracing/instances')) if (n.startsWith(`mobility-${agentId}-`)) TracefsTracker.remove(n);
      } catch { /* none left */ }
    }
    if (server) await stopServer(server).catch(() => undefined);
    for (const m of mounted.reverse()) { try { sh('umount', [m]); } catch { try { sh('umount', ['-l', m]); } catch { /* gone */ } } }
    mounted = [];
    if (loop) { try { sh('losetup', ['-d', loop]); } catch { /* gone */ } }
    if (!opts.keep && !opts.dir) await fsp.rm(dir, { recursive: true, force: true });
    else out(`work directory kept: ${dir}`);
  })());
  const onSignal = (sig: string) => {
    out(`\n${sig}: stopping the demo`);
    void teardown().finally(() => process.exit(130));
  };
  process.removeAllListeners('SIGINT');
  process.once('SIGINT', () => onSignal('SIGINT'));
  process.once('SIGTERM', () => onSignal('SIGTERM'));

  let ok = true;
  try {
    out('mobility demo: the whole product on this machine (root: a loop device with ext4, real processes)');
    out(`work directory: ${dir}`);

    out('1. configuration + process server: mobility server on 127.0.0.1 (TLS, a new CA, token and registration passphrase in its data directory)');
    const dataDir = path.join(dir, 'server');
    server = await spawnServer(dataDir, { timeoutMs: 120_000 });
    const url = server.info.url;
    conn = await serverConn({ server: url, 'data-dir': dataDir });
    out(`   listening at ${url}, certificate SHA256 ${server.info.fingerprint}`);

    out(`2. the machine to protect: a ${DISK_MB} MiB loop device with ext4, files on it`);
    const img = path.join(dir, 'disk.img');
    await fsp.writeFile(img, '');
    await fsp.truncate(img, DISK_MB * 1024 * 1024);
    loop = sh('losetup', ['--find', '--show', img]).trim();
    sh('mkfs.ext4', ['-q', '-F', '-E', 'lazy_itable_init=0,lazy_journal_init=0', loop]);
    const mnt = path.join(dir, 'mnt');
    await fsp.mkdir(mnt);
    sh('mount', [loop, mnt]);
    mounted.push(mnt);
    await writeFiles(mnt, '0', 8);
    sh('sync', []);
    out(`   ${loop} mounted at ${mnt}: 8 files`);

    out('3. the Mobility service: mobility register (with the server\'s passphrase), then mobility agent');
    const stateDir = path.join(dir, 'agent-state');
    const midFile = path.join(dir, 'machine-id');
    await fsp.writeFile(midFile, crypto.randomBytes(16).toString('hex') + '\n');
    const config = path.join(dir, 'agent.json');
    const agentLog = path.join(dir, 'agent.log');
    await fsp.writeFile(config, JSON.stringify({ server: url, stateDir, machineIdFile: midFile, logFile: agentLog }, null, 2), { mode: 0o600 });
    const reg = await cli(['register', '--config', config, '--passphrase-file', path.join(dataDir, 'passphrase'), '--json']);
    if (reg.code !== 0) throw new MobilityError('MOB_ERR_CONFIG', `mobility register failed: ${reg.stderr.trim()}`);
    agentId = (JSON.parse(reg.stdout) as { agentId: string }).agentId;
    const id = agentId;
    agent = spawn(process.execPath, [CLI_PATH, 'agent', '--config', config, '--json-logs'], { stdio: ['ignore', 'ignore', 'ignore'] });
    await waitFor('the agent\'s control connection', async () => {
      const m = await api(conn!, 'GET', '/v1/machines');
      return (m.machines as { agentId: string; connected: boolean }[]).some((x) => x.agentId === id && x.connected);
    });
    out(`   registered as ${id} (its own client certificate from the server's CA); agent pid ${agent.pid}, connected; log ${agentLog}`);

    out('4. a replication policy and enable: preflight on the agent, then the disk is assigned');
    await api(conn, 'POST', '/v1/policies', { name: 'demo', rpoThresholdMs: 120_000, retentionMs: 3_600_000, crashIntervalMs: 15_000, appIntervalMs: 0 });
    const en = await api(conn, 'POST', '/v1/enable', { machine: id, disk: loop, diskId: 'data', policy: 'demo' });
    enabled = true;
    out(`   policy demo: RPO alert 2 min, a crash-consistent point every 15 s, 1 h of points; ${(en.preflight as unknown[]).length} preflight checks passed`);

    out('5. initial replication (the agent reads the disk, ships what is not zero, the server verifies and fsyncs)');
    const status = async () => ((await api(conn!, 'GET', '/v1/status')).disks as DiskView[]).find((d) => d.agent === id && d.disk === 'data');
    let shown = -1;
    const tty = process.stdout.isTTY === true;
    await waitFor('the initial replication', async () => {
      const d = await status();
      if (!d) return false;
      const pct = Math.floor((d.progressPermille ?? 0) / 10);
      if (d.state === 'initial-sync' && pct !== shown && (tty || pct >= shown + 25)) {
        shown = pct;
        if (tty) process.stdout.write(`\r   initial-sync ${pct}%   `); else out(`   initial-sync ${pct}%`);
      }
      return d.state === 'continuous';
    });
    if (tty) process.stdout.write('\n');
    out('   continuous: every write is tracked and shipped within a second');

    out('6. continuous protection: three recovery points, each taken (mobility cut) after changing files');
    const points: { id: string; sums: Map<string, string>; batch: string }[] = [];
    for (const b of ['1', '2', '3']) {
      await writeFiles(mnt, b, 4);
      sh('sync', []);
      const sums = await checksums(mnt);
      const cut = await api(conn, 'POST', '/v1/cut', { machine: id, kind: 'crash', timeoutMs: 240_000 });
      const p = cut.point as { id: string; frozenMs: number };
      points.push({ id: p.id, sums, batch: b });
      out(`   point ${p.id}: 4 files added (${sums.size} files on the disk), frozen ${p.frozenMs} ms`);
    }

    const target = points[1]!;
    out(`7. test failover of the middle point ${target.id}: a writable image, checked, while replication goes on`);
    const tf = await api(conn, 'POST', '/v1/test-failover', { agent: id, point: target.id });
    const image = (tf.disks as { localPath: string | null; location: string }[])[0]!;
    const file = image.localPath ?? image.location;
    const fsck = await shAsync('e2fsck', ['-fn', file]);
    ok &&= fsck.code === 0;
    out(`   image ${file}: e2fsck -fn ${fsck.code === 0 ? 'clean' : `FAILED (exit ${fsck.code})\n${fsck.out.slice(-2000)}`}`);
    const check = path.join(dir, 'check');
    await fsp.mkdir(check);
    sh('mount', ['-o', 'ro,loop,noload', file, check]);
    mounted.push(check);
    const got = await checksums(check);
    sh('umount', [check]);
    mounted = mounted.filter((m) => m !== check);
    const same = got.size === target.sums.size && [...target.sums].every(([f, h]) => got.get(f) === h);
    const later = [...got.keys()].filter((f) => f.startsWith('batch-3')).length;
    ok &&= same && later === 0;
    out(`   ${got.size} files: checksums ${same ? 'EQUAL to' : 'DIFFERENT from'} the disk's at the point; files written after it: ${later === 0 ? 'absent, as they should be' : `${later} present (WRONG)`}`);
    await api(conn, 'POST', '/v1/test-failover', { agent: id, point: target.id, cleanup: true });
    out('   test failover cleaned up');

    out('8. what an operator sees');
    const d = await status();
    if (d) {
      out(table([['AGENT', 'DISK', 'STATE', 'RPO', 'POINTS'], [d.agent, d.disk, d.state, fmtAge(d.rpoMs), String(d.points)]]).trimEnd().replace(/^/gm, '   '));
    }
    const pts = (await api(conn, 'GET', `/v1/points?agent=${encodeURIComponent(id)}`)).points as { id: string; takenAt: string; kind: string; frozenMs: number }[];
    out(`   ${pts.length} recovery points (newest: ${pts[pts.length - 1]?.id ?? '-'}); the replica holds ${fmtBytes(DISK_MB * 1024 * 1024)} of disk`);
    out(`   the same from the CLI: node ${path.relative(process.cwd(), CLI_PATH) || CLI_PATH} status --data-dir ${dataDir} --server ${url}`);
    // an operator for the console, with a password of its own (in a 0600 file of the demo's)
    const pwFile = path.join(dir, 'console-password');
    await fsp.writeFile(pwFile, crypto.randomBytes(12).toString('base64url') + '\n', { mode: 0o600 });
    const op = await cli(['operator', 'add', 'demo', '--password-file', pwFile, '--data-dir', dataDir]);
    out(`   console (dashboard): ${url.replace(/^wss:/, 'https:').replace(/^ws:/, 'http:')}/console/`
      + (op.code === 0 ? ` (operator demo, password in ${pwFile}; the certificate is the demo CA's: ${path.join(dataDir, 'tls', 'ca.pem')})` : ` (no operator: ${op.stderr.trim().split('\n').pop()})`));
    out(ok ? 'RESULT: protected, recovery points taken, the test failover image is clean and equals the disk at its point' : 'RESULT: FAILED (see above)');
    if (process.stdin.isTTY && process.stdout.isTTY) {
      out('press Enter to stop the demo (server, agent, loop device)');
      await new Promise<void>((r) => { process.stdin.resume(); process.stdin.once('data', () => { process.stdin.pause(); r(); }); });
    }
  } catch (err) {
    ok = false;
    throw err;
  } finally {
    await teardown();
  }
  return ok ? 0 : 1;
}
