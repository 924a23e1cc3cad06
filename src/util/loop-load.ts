/**
 * How loaded the server is, in percent: the larger of this thread's event-loop utilization
 * (the share of wall time spent running callbacks rather than waiting for I/O) and the CPU
 * use of the whole host, over the last quarter second or more. The server reports it in
 * every Ack so that an agent with bytes piling up in its socket can tell a slow link (worth
 * compressing) from a server that cannot read faster (lz4 would add decode work there).
 * The host share matters because a thread that is runnable but not scheduled counts as
 * idle for the event loop; host time in I/O wait counts as spare (a disk-bound server has
 * CPU to decode lz4).
 */
import { readFileSync } from 'node:fs';
import os from 'node:os';
import { performance, type EventLoopUtilization } from 'node:perf_hooks';

const WINDOW_MS = 250;

/**
 * Busy and total CPU ticks of the host. On Linux from /proc/stat's `cpu` line, where time in
 * I/O wait and time stolen by a hypervisor count as not busy (os.cpus() leaves both out of the
 * total, which makes an I/O-bound host look CPU-busy); elsewhere from os.cpus().
 */
export function parseProcStat(text: string): { busy: number; total: number } | null {
  const line = text.split('\n').find((l) => l.startsWith('cpu '));
  if (!line) return null;
  const f = line.trim().split(/\s+/).slice(1).map(Number);
  if (f.length < 4 || f.some((x) => !Number.isFinite(x))) return null;
  // user nice system idle iowait irq softirq steal (guest time is already inside user/nice)
  const [user, nice, system, idle, iowait = 0, irq = 0, softirq = 0, steal = 0] = f;
  const busy = user + nice + system + irq + softirq;
  return { busy, total: busy + idle + iowait + steal };
}

function cpuTimes(): { busy: number; total: number } {
  if (process.platform === 'linux') {
    try {
      const t = parseProcStat(readFileSync('/proc/stat', 'latin1'));
      if (t) return t;
    } catch {
      // no /proc: the portable figures below
    }
  }
  let busy = 0;
  let total = 0;
  for (const c of os.cpus()) {
    const t = c.times;
    busy += t.user + t.nice + t.sys + t.irq;
    total += t.user + t.nice + t.sys + t.irq + t.idle;
  }
  return { busy, total };
}

export class LoopLoad {
  private last: EventLoopUtilization = performance.eventLoopUtilization();
  private lastCpu = cpuTimes();
  private lastAt = performance.now();
  private pct = 1;

  /** Load percent (1-100: 0 on the wire means not reported) over the window that ended at the latest refresh; refreshes at most every 250 ms. */
  read(): number {
    const now = performance.now();
    if (now - this.lastAt >= WINDOW_MS) {
      const cur = performance.eventLoopUtilization();
      const loop = performance.eventLoopUtilization(cur, this.last).utilization;
      const cpu = cpuTimes();
      const dt = cpu.total - this.lastCpu.total;
      const host = dt > 0 ? (cpu.busy - this.lastCpu.busy) / dt : 0;
      this.pct = Math.max(1, Math.min(100, Math.round(Math.max(loop, host) * 100)));
      this.last = cur;
      this.lastCpu = cpu;
      this.lastAt = now;
    }
    return this.pct;
  }
}
