/**
 * History in the CLI: `mobility status --history` (samples per disk as a compact table),
 * `mobility events` and `mobility alerts`, and the lines of active alerts `mobility status` shows.
 */
import { MobilityError } from '../errors.js';
import { api, fmtAge, type ApiConn } from './api-client.js';
import { fmtBytes, table } from './progress.js';
import type { Values } from './args.js';

interface Sample { at: string; resMs: number; rpoMs: number | null; dataLagMs: number | null; backlogBytes: number | null; churnBytesPerSec: number | null; state: string }
interface Series { agent: string; disk: string; samples: Sample[] }
export interface AlertView {
  id: number; agent: string; disk: string; kind: string; active: boolean; firedAt: string; clearedAt: string | null;
  rpoMs: number | null; thresholdMs: number; reason: string; clearReason: string | null;
}
interface EventView { id: number; at: string; agent: string; disk: string | null; kind: string; state: string | null; code: string | null; reason: string }

/** Rows of the text table per range: 1h in 5-minute rows, 24h in hours, 7d in 6-hour rows. */
const TABLE_STEP: Record<string, number> = { '1h': 300_000, '24h': 3600_000, '7d': 6 * 3600_000 };

const q = (o: Record<string, string | undefined>) => {
  const p = new URLSearchParams();
  for (const [k, v] of Object.entries(o)) if (v !== undefined && v !== '') p.set(k, v);
  const s = p.toString();
  return s ? `?${s}` : '';
};

function checkRange(r: string): string {
  if (!TABLE_STEP[r]) throw new MobilityError('MOB_ERR_USAGE', `--range wants 1h, 24h or 7d, got ${r}`);
  return r;
}

/** Folds samples into rows of step ms: highest RPO, lag and backlog, mean churn, last state. */
export function foldSamples(samples: Sample[], step: number): Sample[] {
  const out: Sample[] = [];
  let n = 0;
  const mx = (a: number | null, b: number | null) => (a === null ? b : b === null ? a : Math.max(a, b));
  for (const s of samples) {
    const t = Math.floor(Date.parse(s.at) / step) * step;
    const last = out[out.length - 1];
    if (last && Date.parse(last.at) === t) {
      last.rpoMs = mx(last.rpoMs, s.rpoMs); last.dataLagMs = mx(last.dataLagMs, s.dataLagMs); last.backlogBytes = mx(last.backlogBytes, s.backlogBytes);
      if (s.churnBytesPerSec !== null) { last.churnBytesPerSec = ((last.churnBytesPerSec ?? 0) * n + s.churnBytesPerSec) / (n + 1); n++; }
      last.state = s.state;
    } else {
      out.push({ ...s, at: new Date(t).toISOString(), resMs: step });
      n = s.churnBytesPerSec === null ? 0 : 1;
    }
  }
  return out;
}

/** mobility status --history */
export async function statusHistory(c: ApiConn, v: Values): Promise<void> {
  const range = checkRange((v.range as string | undefined) ?? '1h');
  const disk = (v.disk as string[] | undefined)?.[0];
  const j = await api(c, 'GET', `/v1/history${q({ agent: v.agent as string | undefined, disk, range })}`);
  if (v.json) { process.stdout.write(JSON.stringify(j, null, 2) + '\n'); return; }
  const series = (j.series ?? []) as Series[];
  if (!series.length) { process.stdout.write(`no history in the last ${range}\n`); return; }
  const rows = [['AGENT', 'DISK', 'FROM (UTC)', 'STATE', 'MAX RPO', 'MAX LAG', 'MAX BACKLOG', 'CHURN/s', 'SAMPLES']];
  for (const s of series) {
    const step = TABLE_STEP[range]!;
    for (const f of foldSamples(s.samples, step)) {
      const count = s.samples.filter((x) => Math.floor(Date.parse(x.at) / step) * step === Date.parse(f.at)).length;
      rows.push([s.agent, s.disk, f.at.slice(0, 16).replace('T', ' '), f.state, fmtAge(f.rpoMs), fmtAge(f.dataLagMs),
        f.backlogBytes === null ? '-' : fmtBytes(f.backlogBytes), f.churnBytesPerSec === null ? '-' : fmtBytes(Math.round(f.churnBytesPerSec)), String(count)]);
    }
  }
  process.stdout.write(`history of the last ${range} (rows of ${fmtAge(TABLE_STEP[range]!)}; --json for every sample)\n` + table(rows));
}

export function alertLines(alerts: AlertView[]): string {
  if (!alerts.length) return '';
  return `ACTIVE ALERTS (${alerts.length}):\n` + alerts.map((a) => `  ${a.firedAt}  ${a.agent}/${a.disk}  ${a.kind}: ${a.reason}\n`).join('');
}

/** mobility alerts [--all] */
export async function cmdAlerts(c: ApiConn, v: Values): Promise<void> {
  const j = await api(c, 'GET', `/v1/alerts${v.all ? '' : '?active=1'}`);
  if (v.json) { process.stdout.write(JSON.stringify(j, null, 2) + '\n'); return; }
  const alerts = (j.alerts ?? []) as AlertView[];
  if (!alerts.length) { process.stdout.write(v.all ? 'no alerts\n' : 'no active alerts\n'); return; }
  process.stdout.write(table([['FIRED (UTC)', 'CLEARED', 'AGENT', 'DISK', 'KIND', 'RPO', 'THRESHOLD', 'REASON'], ...alerts.map((a) => [
    a.firedAt, a.clearedAt ?? 'active', a.agent, a.disk, a.kind, fmtAge(a.rpoMs), fmtAge(a.thresholdMs), a.clearedAt ? `${a.reason}; cleared: ${a.clearReason ?? ''}` : a.reason,
  ])]));
}

/** mobility events [--since T] [--limit N] [--agent A] [--disk D] */
export async function cmdEvents(c: ApiConn, v: Values): Promise<void> {
  let since = v.since as string | undefined;
  if (since !== undefined && /^\d+[smhd]$/.test(since)) {
    const n = Number(since.slice(0, -1)) * { s: 1000, m: 60_000, h: 3600_000, d: 86400_000 }[since.slice(-1) as 's' | 'm' | 'h' | 'd'];
    since = new Date(Date.now() - n).toISOString();
  }
  const j = await api(c, 'GET', `/v1/events${q({ since, limit: v.limit as string | undefined, agent: v.agent as string | undefined, disk: (v.disk as string[] | undefined)?.[0] })}`);
  if (v.json) { process.stdout.write(JSON.stringify(j, null, 2) + '\n'); return; }
  const events = (j.events ?? []) as EventView[];
  if (!events.length) { process.stdout.write('no events\n'); return; }
  process.stdout.write(table([['AT (UTC)', 'AGENT', 'DISK', 'EVENT', 'CODE', 'REASON'], ...events.map((e) => [
    e.at, e.agent, e.disk ?? '-', e.kind, e.code ?? '-', e.reason,
  ])]));
}
