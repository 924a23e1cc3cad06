/**
 * How loaded the server is, in percent: the larger of this thread's event-loop utilization
 * (the share of wall time spent running callbacks rather than waiting for I/O) and the CPU
 * use of the whole host, over the last quarter second or more. The server reports it in
 * every Ack so that an agent with bytes piling up in its socket can tell a slow link (worth
 * compressing) from a server that cannot read faster (lz4 would add decode work there).
 * The host share matters because a thread that is runnable but not scheduled counts as
 * idle for the event loop.
 */
import os from 'node:os';
import { performance, type EventLoopUtilization } from 'node:perf_hooks';

const WINDOW_MS = 250;

function cpuTimes(): { busy: number; total: number } {
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
  private pct = 0;

  /** Load percent (0-100) over the window that ended at the latest refresh; refreshes at most every 250 ms. */
  read(): number {
    const now = performance.now();
    if (now - this.lastAt >= WINDOW_MS) {
      const cur = performance.eventLoopUtilization();
      const loop = performance.eventLoopUtilization(cur, this.last).utilization;
      const cpu = cpuTimes();
      const dt = cpu.total - this.lastCpu.total;
      const host = dt > 0 ? (cpu.busy - this.lastCpu.busy) / dt : 0;
      this.pct = Math.max(0, Math.min(100, Math.round(Math.max(loop, host) * 100)));
      this.last = cur;
      this.lastCpu = cpu;
      this.lastAt = now;
    }
    return this.pct;
  }
}
