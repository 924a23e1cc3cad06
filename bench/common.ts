/**
 * What the benchmarks share: running a command and timing it, CPU seconds and memory of a process
 * from /proc, telling other load on a shared machine from ours (LoadMonitor), medians and
 * percentiles, and sampling `mobility status` every second (StatusSampler).
 */
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import { performance } from 'node:perf_hooks';
import { api, type ApiConn } from '../src/cli/api-client.js';

/** Clock ticks per second of /proc's CPU times (getconf CLK_TCK; set by initClock()). */
let CLK_TCK = 100;

/** Reads CLK_TCK once, before any CPU time is read. */
export async function initClock(): Promise<void> {
  CLK_TCK = Number((await exec('getconf', ['CLK_TCK'])).stdout.trim()) || 100;
}

export interface Exec { code: number | null; signal: NodeJS.Signals | null; stdout: string; stderr: string; ms: number }

export function exec(cmd: string, args: string[], opts: { env?: NodeJS.ProcessEnv } = {}): Promise<Exec> {
  return new Promise((resolve, reject) => {
    const t0 = performance.now();
    const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'], env: opts.env ?? process.env });
    let stdout = '';
    let stderr = '';
    child.stdout!.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr!.on('data', (d: Buffer) => { stderr += d.toString(); if (stderr.length > 1 << 20) stderr = stderr.slice(-(1 << 19)); });
    child.once('error', reject);
    child.once('close', (code, signal) => resolve({ code, signal, stdout, stderr, ms: performance.now() - t0 }));
  });
}


/** utime + stime of a live process in seconds (Linux /proc), or null. */
export function procCpuSec(pid: number | undefined): number | null {
  if (!pid) return null;
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return (Number(f[11]) + Number(f[12])) / CLK_TCK;
  } catch {
    return null;
  }
}

/**
 * Tells other load on the (shared) machine from ours: CPU ticks of the whole
 * machine (user + nice + system, from /proc/stat) minus those of this process,
 * its reaped descendants (agent, rsync, ssh, cp, cat...), its long-lived
 * children (server, sshd with its per-connection children) and kernel threads
 * (writeback, journal: mostly caused by our own writes). What remains is other
 * processes on the machine, plus time stolen by the hypervisor.
 */
export interface LoadSample { machine: number; steal: number; ours: number; kernel: number }
export class LoadMonitor {
  readonly pids = new Set<number>();
  private stat(pid: number | 'self'): string[] | null {
    try {
      const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
      return stat.slice(stat.lastIndexOf(')') + 2).split(' '); // [0] state, [1] ppid, [11] utime, [12] stime, [13] cutime, [14] cstime
    } catch {
      return null; // exited: a child of ours has its ticks in our cutime/cstime once reaped
    }
  }
  private treeTicks(pid: number | 'self'): number {
    const f = this.stat(pid);
    return f ? Number(f[11]) + Number(f[12]) + Number(f[13]) + Number(f[14]) : 0;
  }
  private kernelTicks(): number {
    let n = 0;
    for (const e of fs.readdirSync('/proc')) {
      if (!/^\d+$/.test(e)) continue;
      const f = this.stat(Number(e));
      if (f && (e === '2' || f[1] === '2')) n += Number(f[11]) + Number(f[12]);
    }
    return n;
  }
  sample(): LoadSample {
    const c = fs.readFileSync('/proc/stat', 'utf8').split('\n')[0].trim().split(/\s+/).slice(1).map(Number);
    let ours = this.treeTicks('self');
    for (const p of this.pids) ours += this.treeTicks(p);
    return { machine: c[0] + c[1] + c[2], steal: c[7] ?? 0, ours, kernel: this.kernelTicks() };
  }
  /** CPU seconds since `a`: others (+ hypervisor steal), ours (this process tree, server and sshd included), kernel threads. */
  since(a: LoadSample): { otherCpuSec: number; ownCpuSec: number; kernelThreadCpuSec: number } {
    const b = this.sample();
    const kernel = b.kernel - a.kernel;
    return {
      otherCpuSec: Math.max(0, (b.machine - a.machine) - (b.ours - a.ours) - kernel + (b.steal - a.steal)) / CLK_TCK,
      ownCpuSec: (b.ours - a.ours) / CLK_TCK,
      kernelThreadCpuSec: kernel / CLK_TCK,
    };
  }
  other(a: LoadSample): number {
    return this.since(a).otherCpuSec;
  }
  /** Waits (up to maxMs) for a second in which others used < 10% of one core. Returns the ms waited. */
  async waitQuiet(maxMs: number): Promise<number> {
    const t0 = Date.now();
    for (;;) {
      const a = this.sample();
      await new Promise((r) => setTimeout(r, 1000));
      if (this.other(a) < 0.1 || Date.now() - t0 > maxMs) return Date.now() - t0 - 1000;
    }
  }
}

export function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}


/** The p-th percentile (nearest rank, lower) of xs, NaN when empty. */
export function pct(xs: number[], p: number): number {
  if (!xs.length) return NaN;
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor((p / 100) * s.length))]!;
}

/** The largest of xs, NaN when empty. */
export const max = (xs: number[]): number => (xs.length ? Math.max(...xs) : NaN);

/** A field of /proc/PID/status in bytes (VmHWM, VmRSS), NaN once the process is gone. */
export function procKb(pid: number, field: string): number {
  try {
    const m = new RegExp(`^${field}:\\s*(\\d+) kB`, 'm').exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));
    return m ? Number(m[1]) * 1024 : NaN;
  } catch { return NaN; }
}

/** One disk's figures from one GET /v1/status answer (null: the server did not give the figure). */
export interface StatusSample { t: number; disk: string; dataLagMs: number | null; backlogBytes: number | null; rpoMs: number | null; churnBytesPerSec: number | null; healthAgeMs: number | null; state: string }

/**
 * `mobility status --json` every second, in-process through the CLI's API client (the same
 * GET /v1/status answer, without a Node start-up per sample), for the given disks of one agent.
 * One request at a time; an answer slower than 5 s is dropped (left to finish on its own), a
 * failed one skipped: on a loaded machine the next tick samples again. samples grows as answers
 * come; stop() ends the loop and resolves once the last request is done.
 */
export class StatusSampler {
  readonly samples: StatusSample[] = [];
  private running = true;
  private readonly loop: Promise<void>;

  constructor(private readonly conn: ApiConn, private readonly agentId: string, private readonly disks: string[]) {
    this.loop = this.run();
  }

  private async run(): Promise<void> {
    const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
    while (this.running) {
      const t = Date.now();
      try {
        const j = await Promise.race([api(this.conn, 'GET', '/v1/status'), sleep(5000).then((): Record<string, unknown> => ({}))]);
        for (const d of (j.disks ?? []) as Record<string, unknown>[]) {
          if (d.agent !== this.agentId || !this.disks.includes(String(d.disk))) continue;
          const n = (k: string) => (typeof d[k] === 'number' ? d[k] as number : null);
          this.samples.push({ t, disk: String(d.disk), dataLagMs: n('dataLagMs'), backlogBytes: n('backlogBytes'), rpoMs: n('rpoMs'), churnBytesPerSec: n('churnBytesPerSec'), healthAgeMs: n('healthAgeMs'), state: String(d.state) });
        }
      } catch { /* a slow answer on a loaded machine: the next tick */ }
      if (this.running) await sleep(Math.max(0, 1000 - (Date.now() - t)));
    }
  }

  async stop(): Promise<StatusSample[]> {
    this.running = false;
    await this.loop;
    return this.samples;
  }
}
