/**
 * The host-mode benchmark (bench/host.ts, `npm run bench:host`) at a toy size: it runs both phases
 * against a real qemu-storage-daemon, a real server and agent, writes a JSON whose figures hang
 * together, and leaves nothing behind, neither at its end nor when interrupted (SIGINT) in the
 * middle of the protected phase. The figures themselves are the benchmark's business: nothing here
 * depends on how fast the machine is.
 *
 * Needs what the benchmark needs: root, /dev/fuse, qemu-storage-daemon, qemu-img, qemu-io,
 * nbdinfo, nbdcopy (a missing one fails).
 */
import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import readline from 'node:readline';
import { fileURLToPath } from 'node:url';
import type { ChildProcess } from 'node:child_process';
import { SCRATCH_BASE, cleanup } from '../cleanup.js';
import { waitFor } from '../helpers.js';
import { requireQemuTools } from '../source/qemu/qemu-daemon.js';

const BENCH = fileURLToPath(new URL('../../bench/host.js', import.meta.url));
const LIMIT = 600_000;

interface Dist { p50: number; p99: number; max: number }
interface Phase {
  phase: 'alone' | 'protected'; round: number; seconds: number;
  guest: { mibPerSec: number; bytes: number; writes: number; latencyMs: Dist; busyFraction: number; commandOverheadMsP50: number };
  lagMs?: Dist; samples?: number; cuts?: { atS: number; spoolBytes: number; shipMs: number }[]; cutsFailed?: unknown[];
  agent?: { cpuPctOfCore: number; peakRssBytes: number }; server?: { cpuPctOfCore: number; peakRssBytes: number };
}
interface Result { sizeBytes: number; hotBytes: number; rateMiBs: number; targets: { target: string; met: boolean | null }[]; phases: Phase[]; summary: { latencyP99Ratio: number } }

/** What a benchmark process left: its scratch root, processes and FUSE mounts naming it. */
function leftovers(pid: number): string[] {
  const roots = fs.existsSync(SCRATCH_BASE) ? fs.readdirSync(SCRATCH_BASE).filter((n) => n.startsWith(`host-${pid}-`)) : [];
  const out = roots.map((r) => `directory ${r}`);
  for (const r of roots) {
    const full = path.join(SCRATCH_BASE, r);
    for (const line of fs.readFileSync('/proc/self/mountinfo', 'utf8').split('\n')) if (line.includes(full)) out.push(`mount ${line}`);
    for (const n of fs.readdirSync('/proc')) {
      if (!/^\d+$/.test(n)) continue;
      try {
        const cmd = fs.readFileSync(`/proc/${n}/cmdline`, 'utf8');
        if (cmd.includes(full)) out.push(`process ${n} ${cmd.replace(/\0/g, ' ').slice(0, 100)}`);
      } catch { /* gone */ }
    }
  }
  return out;
}

function runBench(c: ReturnType<typeof cleanup>, env: Record<string, string>): { child: ChildProcess; lines: string[]; stderr: () => string; exit: Promise<number | null> } {
  const child = c.spawn(process.execPath, [BENCH], { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, ...env } });
  const lines: string[] = [];
  let err = '';
  readline.createInterface({ input: child.stdout! }).on('line', (l) => lines.push(l));
  child.stderr!.on('data', (d: Buffer) => { err = (err + d.toString()).slice(-5000); });
  const exit = new Promise<number | null>((resolve) => child.once('exit', (code, sig) => resolve(code ?? (sig ? 128 : null))));
  return { child, lines, stderr: () => err, exit };
}

const small = { BENCH_HOST_SIZE: '64M', BENCH_HOST_HOT: '16M', BENCH_RATE: '4', BENCH_HOST_JOBS: '2' };

t.test('bench:host runs both phases and writes a JSON whose figures hang together, then leaves nothing behind', async (tt) => {
  requireQemuTools();
  if (!fs.existsSync('/dev/fuse')) throw new Error('/dev/fuse is required');
  const c = cleanup(tt);
  const out = path.join(c.dir('bench-host-out-'), 'host.json');
  const b = runBench(c, { ...small, BENCH_SECONDS: '20', BENCH_OUT_HOST: out });
  const pid = b.child.pid!;
  let timer: NodeJS.Timeout | undefined;
  const code = await Promise.race([b.exit, new Promise<'late'>((r) => { timer = setTimeout(() => r('late'), LIMIT); })]);
  clearTimeout(timer);
  tt.equal(code, 0, `the benchmark succeeded${code === 0 ? '' : `: ${b.lines.slice(-5).join('\n')}\n${b.stderr()}`}`);
  const j = JSON.parse(fs.readFileSync(out, 'utf8')) as Result;
  tt.same([j.sizeBytes, j.hotBytes, j.rateMiBs], [64 << 20, 16 << 20, 4], 'the knobs are recorded');
  tt.same(j.phases.map((p) => p.phase), ['alone', 'protected'], 'one round: the guest alone, then protected');
  for (const p of j.phases) {
    const g = p.guest;
    tt.ok(g.writes > 0 && g.bytes === g.writes * 65536, `${p.phase}: ${g.writes} writes of 64 KiB`);
    tt.ok(g.latencyMs.p50 > 0 && g.latencyMs.p50 <= g.latencyMs.p99 && g.latencyMs.p99 <= g.latencyMs.max, `${p.phase}: latency p50 <= p99 <= max (${JSON.stringify(g.latencyMs)})`);
    tt.ok(g.busyFraction > 0 && g.busyFraction <= 1, `${p.phase}: the writers' busy fraction is a fraction (${g.busyFraction})`);
    tt.ok(Math.abs(g.mibPerSec - g.bytes / (1 << 20) / p.seconds) <= 0.1 * g.mibPerSec + 0.1, `${p.phase}: MiB/s is the bytes over the window (${g.mibPerSec})`);
    tt.ok(g.mibPerSec <= 4 * 1.1 + 0.5, `${p.phase}: the guest is paced, never above its rate (${g.mibPerSec} MiB/s)`);
  }
  const prot = j.phases[1]!;
  tt.ok((prot.samples ?? 0) > 0, `status was sampled while the guest wrote (${prot.samples} samples)`);
  tt.ok(prot.lagMs && Number.isFinite(prot.lagMs.p99) && prot.lagMs.p50 <= prot.lagMs.p99, `data lag figures (${JSON.stringify(prot.lagMs)})`);
  tt.ok(prot.agent!.peakRssBytes > 0 && prot.server!.peakRssBytes > 0, 'agent and server peak RSS');
  tt.same(prot.cutsFailed, [], 'no cut failed');
  for (const cut of prot.cuts ?? []) tt.ok(cut.atS >= 0 && cut.atS <= prot.seconds && cut.spoolBytes >= 0, `a point inside the window (${JSON.stringify(cut)})`);
  tt.equal(j.targets.length, 2, 'both targets are reported');
  tt.ok(Number.isFinite(j.summary.latencyP99Ratio), 'the latency ratio');
  tt.ok(b.lines.some((l) => l.startsWith('| protected |')), 'the table is printed');
  await waitFor(() => leftovers(pid).length === 0, 30_000, 'nothing left behind').catch(() => undefined);
  tt.same(leftovers(pid), [], 'no directory, process or mount of the benchmark is left');
});

/** Whether a FUSE export (the agent's, in the protected phase) is mounted under the benchmark's scratch root. */
function fuseMounted(pid: number): boolean {
  const prefix = path.join(SCRATCH_BASE, `host-${pid}-`);
  return fs.readFileSync('/proc/self/mountinfo', 'utf8').split('\n').some((l) => l.includes(prefix) && / - fuse/.test(l));
}

t.test('bench:host interrupted while protecting: SIGINT leaves nothing behind (the agent\'s FUSE exports included)', async (tt) => {
  requireQemuTools();
  const c = cleanup(tt);
  const out = path.join(c.dir('bench-host-out-'), 'host.json');
  // the agent's FUSE export exists from its start through the guest window and the drain: the SIGINT lands in the protected phase
  const b = runBench(c, { ...small, BENCH_SECONDS: '5', BENCH_OUT_HOST: out, BENCH_RUNS: '1' });
  const pid = b.child.pid!;
  await waitFor(() => b.lines.some((l) => l.includes('round 1, guest alone')) || b.child.exitCode !== null, LIMIT, 'the guest-alone phase');
  await waitFor(() => fuseMounted(pid) || b.child.exitCode !== null, LIMIT, 'the agent\'s FUSE export');
  tt.ok(fuseMounted(pid), `the agent exports the disk through FUSE under the benchmark's directory${b.child.exitCode === null ? '' : `: exited ${b.child.exitCode} ${b.stderr()}`}`);
  b.child.kill('SIGINT');
  const code = await b.exit;
  tt.not(code, 0, 'the benchmark stops on SIGINT');
  tt.ok(b.lines.some((l) => l.startsWith('SIGINT')), 'and says it cleans up');
  tt.notOk(fs.existsSync(out), 'no result is written');
  await waitFor(() => leftovers(pid).length === 0, 30_000, 'nothing left behind').catch(() => undefined);
  tt.same(leftovers(pid), [], 'no directory, process or mount of the benchmark is left');
});
