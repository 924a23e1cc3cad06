/**
 * Progress display: a redrawn line on a terminal (bytes, %, MB/s, ETA), a
 * structured log record every few seconds otherwise.
 */
import type { Logger } from '../log.js';

export function fmtBytes(n: number): string {
  const u = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${u[i]}`;
}

export function fmtDuration(s: number): string {
  if (!Number.isFinite(s)) return '?';
  if (s < 60) return `${Math.round(s)}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m${String(Math.round(s % 60)).padStart(2, '0')}s`;
  return `${Math.floor(s / 3600)}h${String(Math.floor((s % 3600) / 60)).padStart(2, '0')}m`;
}

/** One progress report of a disk's transfer; stats (bytes on the wire) only for transfers that ship data (replication). */
export interface ProgressEvent { diskId: string; kind: string; done: number; total: number; stats?: { bytesSent: number } }

export class ProgressReporter {
  private started = new Map<string, { t: number; base: number }>();
  private lastDraw = 0;
  private lastLog = 0;
  private drew = false;
  constructor(private readonly log: Logger, private readonly tty = process.stderr.isTTY === true, private readonly logEveryMs = 5000) {}

  update(p: ProgressEvent): void {
    const now = Date.now();
    const key = `${p.diskId}:${p.kind}`;
    if (!this.started.has(key)) this.started.set(key, { t: now, base: p.done });
    const s = this.started.get(key)!;
    const secs = Math.max(0.001, (now - s.t) / 1000);
    const rate = (p.done - s.base) / secs;
    const pct = p.total ? (100 * p.done) / p.total : 100;
    const eta = rate > 0 ? (p.total - p.done) / rate : Infinity;
    if (this.tty) {
      if (now - this.lastDraw < 200 && p.done < p.total) return;
      this.lastDraw = now;
      const line = `${p.diskId} ${p.kind} ${pct.toFixed(1)}%  ${fmtBytes(p.done)}/${fmtBytes(p.total)}  ${(rate / 1e6).toFixed(0)} MB/s  ETA ${fmtDuration(eta)}${p.stats ? `  sent ${fmtBytes(p.stats.bytesSent)}` : ''}`;
      process.stderr.write(`\r\x1b[K${line}`);
      this.drew = true;
    } else if (now - this.lastLog >= this.logEveryMs || p.done >= p.total) {
      this.lastLog = now;
      this.log.info('progress', { disk: p.diskId, kind: p.kind, pct: Number(pct.toFixed(1)), doneBytes: p.done, totalBytes: p.total, mbps: Number((rate / 1e6).toFixed(1)), etaSec: Number.isFinite(eta) ? Math.round(eta) : null, ...(p.stats ? { sentBytes: p.stats.bytesSent } : {}) });
    }
  }

  end(): void {
    if (this.drew) process.stderr.write('\n');
    this.drew = false;
  }
}

/** Fixed-width columns, two spaces apart, one line per row (the first row is the header). */
export function table(rows: string[][]): string {
  const w = rows[0].map((_, i) => Math.max(...rows.map((r) => (r[i] ?? '').length)));
  return rows.map((r) => r.map((x, i) => (x ?? '').padEnd(w[i])).join('  ').trimEnd()).join('\n') + '\n';
}
