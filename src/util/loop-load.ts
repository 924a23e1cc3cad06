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
import { closeSync, openSync, readSync } from 'node:fs';
import os from 'node:os';
import { performance, type EventLoopUtilization } from 'node:perf_hooks';

const WINDOW_MS = 250;

/**
 * Busy and total CPU ticks of the host from /proc/stat's `cpu` line. Time in I/O wait counts as
 * spare (a disk-bound server has CPU to decode lz4); time stolen by a hypervisor counts as busy
 * (it is CPU this host does not get). os.cpus() leaves both out of the total.
 */
export function parseProcStat(text: string): { busy: number; total: number } | null {
  const line = text.split('\n').find((l) => l.startsWith('cpu '));
  if (!line) return null;
  const f = line.trim().split(/\s+/).slice(1).map(Number);
  if (f.length < 4 || f.some((x) => !Number.isFinite(x))) return null;
  // user nice system idle iowait irq softirq steal (guest time is already inside user/nice)
  const [user, nice, system, idle, iowait = 0, irq = 0, softirq = 0, steal = 0] = f;
  const busy = user + nice + system + irq + softirq + steal;
  return { busy, total: busy + idle + iowait };
}

/** The first line of /proc/stat is all we need: read 512 bytes, not the whole (per-CPU) file. */
function procStatTimes(): { busy: number; total: number } | null {
  let fd = -1;
  try {
    fd = openSync('/proc/stat', 'r');
    const buf = Buffer.allocUnsafe(512);
    const n = readSync(fd, buf, 0, buf.length, 0);
    return parseProcStat(buf.toString('latin1', 0, n));
  } catch {
    return null;
  } finally {
    if (fd >= 0) closeSync(fd);
  }
}

function osCpuTimes(): { busy: number; total: number } {
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
  /** One source for the whole life of the instance: ticks of /proc/stat and of os.cpus() do not mix. */
  private readonly fromProc = process.platform === 'linux' && procStatTimes() !== null;
  private last: EventLoopUtilization = performance.eventLoopUtilization();
  private lastCpu: { busy: number; total: number } | null = this.cpuTimes();
  private lastAt = performance.now();
  private pct = 1;

  private cpuTimes(): { busy: number; total: number } | null {
    return this.fromProc ? procStatTimes() : osCpuTimes();
  }

  /** Load percent (1-100: 0 on the wire means not reported) over the window that ended at the latest refresh; refreshes at most every 250 ms. */
  read(): number {
    const now = performance.now();
    if (now - this.lastAt >= WINDOW_MS) {
      const cur = performance.eventLoopUtilization();
      const loop = performance.eventLoopUtilization(cur, this.last).utilization;
      const cpu = this.cpuTimes();
      // a failed read (say, out of file descriptors) leaves the host's share out of this window
      const dt = cpu && this.lastCpu ? cpu.total - this.lastCpu.total : 0;
      const host = cpu && this.lastCpu && dt > 0 ? (cpu.busy - this.lastCpu.busy) / dt : 0;
      this.pct = Math.max(1, Math.min(100, Math.round(Math.max(loop, host) * 100)));
      this.last = cur;
      this.lastCpu = cpu;
      this.lastAt = now;
    }
    return this.pct;
  }
}
