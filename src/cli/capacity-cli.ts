/**
 * `mobility capacity`: the capacity plan from the churn profile-only agents measured
 * (GET /v1/capacity; the computation is server/capacity.ts). A table per level (disks,
 * machines, the estate) with the figures each answer rests on, or --json.
 */
import { MobilityError } from '../errors.js';
import { CONN_HELP, CONN_OPTIONS, api, serverConn } from './api-client.js';
import { EXIT, parse } from './args.js';
import { fmtBytes, fmtDuration, table } from './progress.js';
import type { CapacityPlan, Figures } from '../server/capacity.js';

export const CAPACITY_HELP = `Usage: mobility capacity [--machine M] [--rpo 5m] [--retention 24h] [--bandwidth 100M] [--ps-throughput 10M] [--window 7d]
                         [connection options] [--json]

Plans a deployment from the churn measured on profiled disks (mobility enable --profile-only:
the agent tracks the disk's writes and ships nothing). Answers, per disk, per machine and for
the estate: peak, p95 and mean churn; the bandwidth that holds the RPO (churn averaged over
RPO-long windows, times the measured compression ratio), all of the time and 95 % of it; the
initial-sync time at --bandwidth (used bytes of the mounted filesystems, else the disk size,
times the ratio, over the bandwidth the mean churn leaves); replica and recovery-point storage
for --retention; and the number of process servers. Each answer shows what it rests on: the
sample window, the number of samples, the measured ratio.

  --machine M          one machine (id or hostname); default every machine with measurements
  --rpo D              the RPO to hold (default 5m)
  --retention D        recovery-point retention (default 24h)
  --bandwidth R        the replication link: bytes/s (100M = 100 MiB/s, as --max-rate) or bits
                       (100Mbit, 1Gbit); without it no initial-sync time is computed
  --ps-throughput R    churn one process server sustains (default 10M: the highest rate the
                       churn benchmark held with a steady lag, docs/benchmarks.md); measure yours
  --window D           use the samples of the last D only (default all kept: 31 days)
  --json               the whole plan as JSON (every figure, in bytes, bytes/s and seconds)
${CONN_HELP}`;

const rate = (n: number | null) => (n === null ? '-' : `${fmtBytes(n)}/s`);
const mbit = (n: number | null) => (n === null ? '-' : `${((n * 8) / 1e6).toFixed(n * 8 < 1e7 ? 2 : 1)} Mbit/s`);
const ratio = (f: Figures) => (f.basis.ratioAssumed ? '1.00 (assumed)' : f.basis.ratio.toFixed(2));
const span = (f: Figures) => (f.basis.from ? `${f.basis.from.slice(0, 16).replace('T', ' ')} .. ${f.basis.to!.slice(11, 16)} (${fmtDuration(f.basis.measuredMs / 1000)})` : '-');
const sync = (f: Figures) => (f.initialSyncSeconds !== null ? fmtDuration(f.initialSyncSeconds) : f.initialSyncNote?.startsWith('no bandwidth') ? '-' : 'never');

function churnRows(label: string[], head: string[], items: [string[], Figures][]): string {
  const rows = [[...head, 'SAMPLES', 'WINDOW (UTC)', 'RATIO', 'MEAN', 'P95', 'PEAK', 'RPO BW (100%)', 'RPO BW (95%)', 'INITIAL SYNC', 'REPLICA', 'POINTS', 'STORAGE']];
  for (const [key, f] of items) {
    rows.push([...key, `${f.basis.samples}${f.basis.incompleteSamples ? ` (+${f.basis.incompleteSamples} incomplete)` : ''}`, span(f), ratio(f),
      rate(f.meanBytesPerSec), rate(f.p95BytesPerSec), rate(f.peakBytesPerSec), mbit(f.bandwidthForRpoBytesPerSec), mbit(f.bandwidthForRpoP95BytesPerSec), sync(f),
      `${fmtBytes(f.replicaBytes)} (${fmtBytes(f.replicaUsedBytes)} used)`, f.recoveryPointBytes === null ? '-' : fmtBytes(f.recoveryPointBytes), f.storageBytes === null ? '-' : fmtBytes(f.storageBytes)]);
  }
  return `${label.join(' ')}\n${table(rows)}`;
}

export function renderPlan(p: CapacityPlan): string {
  const o = p.options;
  const e = p.estate;
  if (!p.disks.length) return 'no profiled disk and no churn measured yet: profile a disk first (mobility enable --machine M --disk DEV --profile-only)\n';
  let out = `capacity plan for an RPO of ${fmtDuration(o.rpoMs / 1000)}, ${fmtDuration(o.retentionMs / 1000)} of recovery points`
    + `${o.bandwidthBytesPerSec === null ? ', no --bandwidth given' : `, a link of ${rate(o.bandwidthBytesPerSec)} (${mbit(o.bandwidthBytesPerSec)})`}\n\n`;
  out += churnRows(['DISKS'], ['AGENT', 'DISK'], p.disks.map((d) => [[d.agent, d.disk], d]));
  out += '\n' + churnRows(['MACHINES'], ['AGENT', 'HOST', 'DISKS'], p.machines.map((m) => [[m.agent, m.hostname ?? '-', String(m.disks.length)], m]));
  out += '\nESTATE\n';
  out += table([
    ['ANSWER', 'VALUE', 'BASED ON'],
    ['peak / p95 / mean churn', `${rate(e.peakBytesPerSec)} / ${rate(e.p95BytesPerSec)} / ${rate(e.meanBytesPerSec)}`, `${e.basis.samples} samples of ${e.machines} machine(s), ${e.disks} disk(s), ${span(e)}${e.basis.incompleteSamples ? `; ${e.basis.incompleteSamples} incomplete samples left out` : ''}`],
    ['bandwidth to hold the RPO', `${mbit(e.bandwidthForRpoBytesPerSec)} (${rate(e.bandwidthForRpoBytesPerSec)}); 95 % of the time: ${mbit(e.bandwidthForRpoP95BytesPerSec)}`,
      `churn over ${fmtDuration(o.rpoMs / 1000)} windows at its highest ${rate(e.rpoWindowPeakBytesPerSec)} x measured ratio ${ratio(e)} (${fmtBytes(e.basis.compressedBytes)} of ${fmtBytes(e.basis.sampledBytes)} sampled)`],
    ['the given link holds the RPO', e.rpoHeld === null ? '-' : e.rpoHeld ? 'yes' : 'NO', o.bandwidthBytesPerSec === null ? 'give --bandwidth' : `${mbit(o.bandwidthBytesPerSec)} against ${mbit(e.bandwidthForRpoBytesPerSec)}`],
    ['initial sync', e.initialSyncSeconds !== null ? fmtDuration(e.initialSyncSeconds) : e.initialSyncNote ?? '-',
      `${fmtBytes(e.dataBytes)} to read (used, else disk size) x ratio = ${fmtBytes(e.initialSyncWireBytes)} over the link less the mean churn`],
    ['replica storage', `${fmtBytes(e.replicaBytes)} provisioned, about ${fmtBytes(e.replicaUsedBytes)} used`, 'the disks\' sizes; sparse replicas hold about the used bytes'],
    ['recovery-point storage', e.recoveryPointBytes === null ? '-' : fmtBytes(e.recoveryPointBytes), `the churn of the worst ${fmtDuration(o.retentionMs / 1000)} window (raw: undo journals are not compressed)${e.recoveryPointNote ? `; ${e.recoveryPointNote.replace(/(\d+) s/g, (_, n: string) => fmtDuration(Number(n)))}` : ''}`],
    ['total storage', e.storageBytes === null ? '-' : fmtBytes(e.storageBytes), 'used replica bytes + recovery points'],
    ['process servers', e.processServers === null ? '-' : String(e.processServers), e.processServersBasis.replace(/(\d+) B\/s/g, (_, n: string) => rate(Number(n)))],
  ]);
  return out;
}

export async function cmdCapacity(argv: string[]): Promise<number> {
  const { values: v } = parse(argv, {
    ...CONN_OPTIONS, json: { type: 'boolean' }, machine: { type: 'string' }, rpo: { type: 'string' }, retention: { type: 'string' },
    bandwidth: { type: 'string' }, 'ps-throughput': { type: 'string' }, window: { type: 'string' },
  });
  if (v.help) { process.stdout.write(CAPACITY_HELP); return EXIT.OK; }
  for (const k of ['machine', 'rpo', 'retention', 'bandwidth', 'ps-throughput', 'window']) {
    if (v[k] === '') throw new MobilityError('MOB_ERR_USAGE', `--${k} needs a value`);
  }
  const c = await serverConn(v);
  const q = new URLSearchParams();
  const put = (name: string, key: string) => { if (typeof v[key] === 'string') q.set(name, v[key] as string); };
  put('machine', 'machine'); put('rpo', 'rpo'); put('retention', 'retention'); put('bandwidth', 'bandwidth'); put('psThroughput', 'ps-throughput'); put('window', 'window');
  const qs = q.toString();
  const j = await api(c, 'GET', `/v1/capacity${qs ? `?${qs}` : ''}`);
  process.stdout.write(v.json ? JSON.stringify(j, null, 2) + '\n' : renderPlan(j as unknown as CapacityPlan));
  return EXIT.OK;
}
