/**
 * Benchmark: what the sampled verification of every recovery point costs inside the freeze.
 *
 * ext4 on a loop device, a real server and `mobility protect` (no hooks), N crash cuts idle
 * and N under fio load (4 KiB random buffered writes, fsync every 64, rate-limited). For each
 * cut the agent reports frozenMs (the whole freeze) and sampleWaitMs (reading and digesting the
 * sample inside the freeze: 64 random pages + up to 64 written pages, synchronous reads; this
 * is the freeze time verification adds).
 * Peer measured in the same run: a bare `fsfreeze -f; fsfreeze -u` of the same filesystem
 * (the least any freeze can cost here).
 *
 * Needs root, losetup, mkfs.ext4, fsfreeze, fio and tracefs.
 * Output: a table and bench/results/cut-verify.json (BENCH_OUT overrides). BENCH_CUTS (default 15).
 */
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import readline from 'node:readline';
import { performance } from 'node:perf_hooks';
import { fileURLToPath } from 'node:url';
import { CLI_PATH, spawnServer, stopServer } from '../src/server/spawn.js';

const CUTS = Number(process.env.BENCH_CUTS ?? '15');
const REPO = fileURLToPath(new URL('../../', import.meta.url));
const OUT = process.env.BENCH_OUT ? path.resolve(process.env.BENCH_OUT) : path.join(REPO, 'bench', 'results', 'cut-verify.json');
const sh = (cmd: string, args: string[]) => execFileSync(cmd, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
const say = (s: string) => process.stdout.write(s + '\n');

interface Ev { event: string; [k: string]: unknown }

function pct(xs: number[], p: number): number {
  if (!xs.length) return NaN;
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor((p / 100) * s.length))]!;
}

async function main(): Promise<void> {
  const dir = await fsp.mkdtemp(path.join(os.tmpdir(), 'mobility-bench-cut-'));
  const img = path.join(dir, 'disk.img');
  await fsp.writeFile(img, '');
  await fsp.truncate(img, 1024 * 1024 * 1024);
  const loop = sh('losetup', ['--find', '--show', img]).trim();
  const mnt = path.join(dir, 'mnt');
  await fsp.mkdir(mnt);
  sh('mkfs.ext4', ['-q', '-F', loop]);
  sh('mount', ['-o', 'noatime', loop, mnt]);
  const agentId = `bench-cut-${process.pid}`;
  let agent: ChildProcess | null = null;
  let fio: ChildProcess | null = null;
  const server = await spawnServer(path.join(dir, 'srv'));
  const cleanup = async () => {
    fio?.kill('SIGKILL');
    agent?.kill('SIGTERM');
    await new Promise((r) => setTimeout(r, 500));
    await stopServer(server);
    try { sh('fsfreeze', ['-u', mnt]); } catch { /* not frozen */ }
    try { sh('umount', ['-l', mnt]); } catch { /* gone */ }
    try { sh('losetup', ['-d', loop]); } catch { /* gone */ }
    for (const n of fs.readdirSync('/sys/kernel/tracing/instances').filter((x) => x.startsWith(`mobility-${agentId}-`))) {
      try { fs.rmdirSync(path.join('/sys/kernel/tracing/instances', n)); } catch { /* busy or gone */ }
    }
    await fsp.rm(dir, { recursive: true, force: true });
  };
  try {
    sh('dd', ['if=/dev/urandom', `of=${mnt}/seed`, 'bs=1M', 'count=128', 'status=none']);
    sh('sync', []);
    const events: Ev[] = [];
    agent = spawn(process.execPath, [CLI_PATH, 'protect', '--server', server.info.url, '--token-file', server.info.tokenFile, '--ca', server.info.caFile!,
      '--disk', `${loop}=d0`, '--agent-id', agentId, '--state-dir', path.join(dir, 'agent'), '--json-logs', '--crash-interval', '60m', '--app-interval', '60m'],
    { stdio: ['ignore', 'pipe', 'ignore'] });
    readline.createInterface({ input: agent.stdout! }).on('line', (l) => { try { events.push(JSON.parse(l) as Ev); } catch { /* not an event */ } });
    const waitCut = async (from: number): Promise<Ev> => {
      for (;;) {
        const e = events.slice(from).find((x) => x.event === 'cut' || x.event === 'cut-failed');
        if (e) return e;
        if (agent!.exitCode !== null) throw new Error('the agent exited');
        await new Promise((r) => setTimeout(r, 20));
      }
    };
    await waitCut(0); // the first point after the initial sync

    const bare: number[] = [];
    const run = async (label: string) => {
      const rows: Ev[] = [];
      for (let i = 0; i < CUTS; i++) {
        const t0 = performance.now();
        sh('fsfreeze', ['-f', mnt]);
        sh('fsfreeze', ['-u', mnt]);
        bare.push(performance.now() - t0);
        const from = events.length;
        agent!.kill('SIGUSR2');
        const e = await waitCut(from);
        if (e.event === 'cut') rows.push(e);
        else say(`${label}: cut failed: ${String(e.code)} ${String(e.message)}`);
        await new Promise((r) => setTimeout(r, 300));
      }
      return rows;
    };
    const idle = await run('idle');
    fio = spawn('fio', ['--name=churn', `--directory=${mnt}`, '--rw=randwrite', '--bs=4k', '--size=128M', '--time_based', '--runtime=600',
      '--ioengine=psync', '--fsync=64', '--rate=20m'], { stdio: 'ignore' });
    await new Promise((r) => setTimeout(r, 3000));
    const load = await run('load');
    fio.kill('SIGKILL');
    fio = null;

    const summary = (rows: Ev[]) => {
      const f = rows.map((r) => Number(r.frozenMs));
      const w = rows.map((r) => Number(r.sampleWaitMs));
      const rd = rows.map((r) => Number(r.sampleReadMs));
      const pg = rows.map((r) => Number(r.samplePages));
      return {
        cuts: rows.length, frozenP50: pct(f, 50), frozenP99: pct(f, 99), sampleWaitP50: pct(w, 50), sampleWaitP99: pct(w, 99), sampleWaitMax: Math.max(...w),
        sampleReadP50: pct(rd, 50), sampleReadP99: pct(rd, 99), pagesP50: pct(pg, 50),
      };
    };
    const result = {
      date: new Date().toISOString(), cutsPerRound: CUTS, bareFreezeThawP50Ms: Math.round(pct(bare, 50) * 10) / 10,
      idle: summary(idle), load: summary(load),
    };
    say('');
    say('| round | cuts | freeze p50 / p99 | added by verification p50 / p99 / max | sample read p50 / p99 | pages | bare fsfreeze -f/-u p50 |');
    say('|---|---|---|---|---|---|---|');
    for (const [name, s] of [['idle', result.idle], ['fio 20 MiB/s', result.load]] as const) {
      say(`| ${name} | ${s.cuts} | ${s.frozenP50} / ${s.frozenP99} ms | ${s.sampleWaitP50} / ${s.sampleWaitP99} / ${s.sampleWaitMax} ms | ${s.sampleReadP50} / ${s.sampleReadP99} ms | ${s.pagesP50} | ${result.bareFreezeThawP50Ms} ms |`);
    }
    say(`ratio (verification wait / freeze, p50): idle ${(result.idle.sampleWaitP50 / Math.max(1, result.idle.frozenP50)).toFixed(3)}, load ${(result.load.sampleWaitP50 / Math.max(1, result.load.frozenP50)).toFixed(3)}`);
    await fsp.mkdir(path.dirname(OUT), { recursive: true });
    await fsp.writeFile(OUT, JSON.stringify(result, null, 1) + '\n');
    say(`results: ${path.relative(REPO, OUT)}`);
  } finally {
    await cleanup();
  }
}

main().catch((err) => { process.stderr.write(`${(err as Error).stack ?? String(err)}\n`); process.exit(1); });
