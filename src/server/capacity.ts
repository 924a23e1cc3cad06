/**
 * Capacity planning from measured churn (`mobility capacity`, GET /v1/capacity): a pure
 * function over the churn samples profile-only agents reported (ConfigDb.churnSamples), in the
 * spirit of Azure Site Recovery's Deployment Planner report. Every answer carries the figures
 * it was computed from.
 *
 * Definitions (all rates in bytes per second of data written, "churn"):
 *   - a sample's rate = its bytes / its interval; samples marked incomplete (trace events lost)
 *     are counted but left out of every figure (their bytes are a lower bound);
 *   - peak = the highest sample rate; p95 = the nearest-rank 95th percentile of the sample rates
 *     (sorted ascending, the value at rank ceil(0.95 n)); mean = all bytes / all measured time;
 *   - a machine's series: its disks' samples summed per report (one report carries every disk
 *     of the machine at the same time); the estate's: the machines' rates summed per bucket of
 *     the longest report interval (a machine with two reports in one bucket counts their mean);
 *   - the measured ratio = compressed / sampled bytes over the samples (changed blocks read back
 *     and encoded as the data path does: zero blocks cost nothing, lz4 when it shrinks); with no
 *     sampled byte it is taken as 1 (incompressible) and said so;
 *   - bandwidth to hold the RPO: the churn of every RPO-long window must cross the link within
 *     that window, so the figure is the highest rate averaged over a window of the RPO (a window
 *     = the samples ending within one RPO of a sample's end; never finer than one sample) times
 *     the ratio ("100 % of the time"); the p95 of the windowed rates times the ratio is what
 *     holds it 95 % of the time;
 *   - initial sync at the given bandwidth: the data to read (used bytes of the mounted
 *     filesystems, else the disk size) times the ratio, over the bandwidth left after the mean
 *     churn's wire bytes (replication goes on meanwhile); null with a reason when the link does
 *     not even carry the mean churn. Disks of a machine, and machines of the estate, share the
 *     link: their data and churn add up;
 *   - storage: replicas take the disks' sizes (provisioned; the file store keeps them sparse,
 *     about the used bytes); recovery points keep the old bytes of every block overwritten in
 *     the retention window, at most the churn of the worst retention-long window (raw: undo
 *     journals are not compressed);
 *   - process servers: the estate's RPO-windowed peak churn over the throughput one process
 *     server sustains (an assumption, an option: see DEFAULT_PS_THROUGHPUT), rounded up, at
 *     least one.
 */
import { MobilityError } from '../errors.js';
import { CHURN_KEEP_MS, type ChurnSample } from './config-db.js';

/**
 * Churn one process server sustains, bytes/s: 10 MiB/s, the highest fio rate the churn run of
 * docs/benchmarks.md (npm run bench:churn) held with a steady data lag, agent and server on one
 * 2-core VM (at 30 and 50 MiB/s the protected workload reached only 11 to 18 MiB/s and the lag
 * grew). Measure your appliance and pass psThroughput.
 */
export const DEFAULT_PS_THROUGHPUT = 10 * 1024 * 1024;
export const DEFAULT_RPO_MS = 5 * 60_000;
export const DEFAULT_RETENTION_MS = 24 * 3600_000;

export interface CapacityOptions {
  rpoMs: number;
  retentionMs: number;
  /** The replication link, bytes/s; null: initial-sync times are not computed. */
  bandwidthBytesPerSec: number | null;
  psThroughputBytesPerSec: number;
}

/** What an answer was based on. */
export interface Basis {
  from: string | null; to: string | null;
  /** Time covered by the samples used (sum of their intervals, ms). */
  measuredMs: number;
  samples: number;
  /** Samples left out: trace events were lost in their interval. */
  incompleteSamples: number;
  sampledBytes: number; compressedBytes: number;
  /** compressed / sampled (1 when nothing was sampled: see ratioAssumed). */
  ratio: number;
  ratioAssumed: boolean;
}

export interface Figures {
  basis: Basis;
  totalBytes: number;
  meanBytesPerSec: number | null;
  p95BytesPerSec: number | null;
  peakBytesPerSec: number | null;
  peakAt: string | null;
  /** Churn averaged over RPO-long windows: the highest, and their p95. */
  rpoWindowPeakBytesPerSec: number | null;
  rpoWindowP95BytesPerSec: number | null;
  /** Link bandwidth (bytes/s on the wire) that holds the RPO all of the time, and 95 % of the time. */
  bandwidthForRpoBytesPerSec: number | null;
  bandwidthForRpoP95BytesPerSec: number | null;
  /** The given bandwidth holds the RPO (null without a bandwidth or samples). */
  rpoHeld: boolean | null;
  sizeBytes: number;
  /** Used bytes of the mounted filesystems, or the size where nothing is mounted. */
  dataBytes: number;
  initialSyncWireBytes: number;
  initialSyncSeconds: number | null;
  initialSyncNote: string | null;
  replicaBytes: number;
  replicaUsedBytes: number;
  recoveryPointBytes: number | null;
  /** Set when the measurement is shorter than the retention: the figure extrapolates the measured churn. */
  recoveryPointNote: string | null;
  storageBytes: number | null;
}

export interface DiskPlan extends Figures { agent: string; disk: string }
export interface MachinePlan extends Figures { agent: string; hostname: string | null; disks: string[] }
export interface EstatePlan extends Figures {
  machines: number; disks: number;
  processServers: number | null;
  processServersBasis: string;
}

export interface CapacityPlan {
  generatedAt: string;
  options: CapacityOptions;
  disks: DiskPlan[];
  machines: MachinePlan[];
  estate: EstatePlan;
}

/** A point of a churn series: the end of an interval, its length, its bytes. */
interface Pt { t: number; ms: number; bytes: number }

/** Nearest-rank percentile (p in 0..100) of values; null for none. */
export function percentile(values: number[], p: number): number | null {
  if (!values.length) return null;
  const s = [...values].sort((a, b) => a - b);
  const rank = Math.max(1, Math.ceil((p / 100) * s.length));
  return s[rank - 1]!;
}

/**
 * Rates averaged over windows of windowMs ending at each point: the points ending within
 * windowMs of the point's end (itself included), their bytes over their measured time. Only
 * windows the measurement covers whole count (a window at the start of the measurement would
 * be one sample's burst, not an RPO-long average); a measurement shorter than windowMs gives
 * one rate, its own mean.
 */
export function windowedRates(pts: Pt[], windowMs: number): number[] {
  const s = [...pts].sort((a, b) => a.t - b.t);
  if (!s.length) return [];
  const start = s[0]!.t - s[0]!.ms;
  const out: number[] = [];
  let lo = 0;
  let bytes = 0;
  let ms = 0;
  let allBytes = 0;
  let allMs = 0;
  for (let i = 0; i < s.length; i++) {
    bytes += s[i]!.bytes;
    ms += s[i]!.ms;
    allBytes += s[i]!.bytes;
    allMs += s[i]!.ms;
    while (lo < i && s[lo]!.t <= s[i]!.t - windowMs) { bytes -= s[lo]!.bytes; ms -= s[lo]!.ms; lo++; }
    if (s[i]!.t - start >= windowMs) out.push(bytes / (ms / 1000));
  }
  if (!out.length && allMs > 0) out.push(allBytes / (allMs / 1000));
  return out;
}

/** Initial-sync seconds for wire bytes over a link, with the mean churn's wire bytes taking their share. */
export function initialSyncSeconds(wireBytes: number, bandwidth: number | null, churnWireBytesPerSec: number): { seconds: number | null; note: string | null } {
  if (bandwidth === null) return { seconds: null, note: 'no bandwidth given' };
  if (wireBytes === 0) return { seconds: 0, note: null };
  const left = bandwidth - churnWireBytesPerSec;
  if (left <= 0) return { seconds: null, note: `the link (${bandwidth} B/s) does not carry the mean churn (${Math.round(churnWireBytesPerSec)} B/s on the wire): the initial sync would never finish` };
  return { seconds: wireBytes / left, note: null };
}

interface Scope { pts: Pt[]; incomplete: number; sampled: number; compressed: number; sizeBytes: number; dataBytes: number }

function figures(sc: Scope, o: CapacityOptions): Figures {
  const pts = sc.pts;
  const totalBytes = pts.reduce((a, p) => a + p.bytes, 0);
  const measuredMs = pts.reduce((a, p) => a + p.ms, 0);
  const rates = pts.map((p) => p.bytes / (p.ms / 1000));
  const ratioAssumed = sc.sampled === 0;
  const ratio = ratioAssumed ? 1 : sc.compressed / sc.sampled;
  let peakIdx = -1;
  rates.forEach((r, i) => { if (peakIdx < 0 || r > rates[peakIdx]!) peakIdx = i; });
  const rpoW = windowedRates(pts, o.rpoMs);
  const rpoPeak = rpoW.length ? Math.max(...rpoW) : null;
  const rpoP95 = percentile(rpoW, 95);
  const retW = windowedRates(pts, o.retentionMs);
  const mean = measuredMs ? totalBytes / (measuredMs / 1000) : null;
  const bw = rpoPeak === null ? null : rpoPeak * ratio;
  const wire = sc.dataBytes * ratio;
  const init = initialSyncSeconds(wire, o.bandwidthBytesPerSec, (mean ?? 0) * ratio);
  const points = retW.length ? Math.max(...retW) * (o.retentionMs / 1000) : null;
  const sorted = [...pts].sort((a, b) => a.t - b.t);
  return {
    basis: {
      from: sorted.length ? new Date(sorted[0]!.t - sorted[0]!.ms).toISOString() : null, to: sorted.length ? new Date(sorted[sorted.length - 1]!.t).toISOString() : null,
      measuredMs, samples: pts.length, incompleteSamples: sc.incomplete, sampledBytes: sc.sampled, compressedBytes: sc.compressed, ratio, ratioAssumed,
    },
    totalBytes, meanBytesPerSec: mean, p95BytesPerSec: percentile(rates, 95), peakBytesPerSec: peakIdx < 0 ? null : rates[peakIdx]!,
    peakAt: peakIdx < 0 ? null : new Date(pts[peakIdx]!.t).toISOString(),
    rpoWindowPeakBytesPerSec: rpoPeak, rpoWindowP95BytesPerSec: rpoP95,
    bandwidthForRpoBytesPerSec: bw, bandwidthForRpoP95BytesPerSec: rpoP95 === null ? null : rpoP95 * ratio,
    rpoHeld: bw === null || o.bandwidthBytesPerSec === null ? null : o.bandwidthBytesPerSec >= bw,
    sizeBytes: sc.sizeBytes, dataBytes: sc.dataBytes, initialSyncWireBytes: wire, initialSyncSeconds: init.seconds, initialSyncNote: init.note,
    replicaBytes: sc.sizeBytes, replicaUsedBytes: sc.dataBytes, recoveryPointBytes: points,
    recoveryPointNote: points !== null && measuredMs < o.retentionMs ? `extrapolated: ${Math.round(measuredMs / 1000)} s measured for a retention of ${Math.round(o.retentionMs / 1000)} s` : null,
    storageBytes: points === null ? null : sc.dataBytes + points,
  };
}

/**
 * The plan. samples: every churn sample to consider (any order); profiled: disks being
 * profiled (listed even before their first sample); hostnames: agent id -> hostname.
 */
export function planCapacity(samples: ChurnSample[], o: CapacityOptions, profiled: { agentId: string; diskId: string }[] = [], hostnames: Map<string, string> = new Map(), nowMs = Date.now()): CapacityPlan {
  const byDisk = new Map<string, ChurnSample[]>();
  const k = (a: string, d: string) => `${a}\u0000${d}`;
  for (const p of profiled) if (!byDisk.has(k(p.agentId, p.diskId))) byDisk.set(k(p.agentId, p.diskId), []);
  for (const s of samples) {
    const key = k(s.agentId, s.diskId);
    const l = byDisk.get(key);
    if (l) l.push(s); else byDisk.set(key, [s]);
  }
  const diskScopes: { agent: string; disk: string; sc: Scope; list: ChurnSample[] }[] = [];
  for (const [key, list] of byDisk) {
    const [agent, disk] = key.split('\u0000') as [string, string];
    list.sort((a, b) => a.t - b.t);
    const good = list.filter((s) => s.complete);
    const last = list[list.length - 1];
    diskScopes.push({
      agent, disk, list,
      sc: {
        pts: good.map((s) => ({ t: s.t, ms: s.intervalMs, bytes: s.bytes })), incomplete: list.length - good.length,
        sampled: good.reduce((a, s) => a + s.sampledBytes, 0), compressed: good.reduce((a, s) => a + s.compressedBytes, 0),
        sizeBytes: last?.sizeBytes ?? 0, dataBytes: last ? last.usedBytes ?? last.sizeBytes : 0,
      },
    });
  }
  diskScopes.sort((a, b) => a.agent.localeCompare(b.agent) || a.disk.localeCompare(b.disk));
  const disks: DiskPlan[] = diskScopes.map((d) => ({ agent: d.agent, disk: d.disk, ...figures(d.sc, o) }));

  // machines: the disks' samples summed per report time
  const agents = [...new Set(diskScopes.map((d) => d.agent))];
  const machineScopes = new Map<string, Scope>();
  const machines: MachinePlan[] = agents.map((agent) => {
    const mine = diskScopes.filter((d) => d.agent === agent);
    const byT = new Map<number, Pt>();
    for (const d of mine) {
      for (const p of d.sc.pts) {
        const q = byT.get(p.t);
        if (q) { q.bytes += p.bytes; q.ms = Math.max(q.ms, p.ms); } else byT.set(p.t, { ...p });
      }
    }
    const sc: Scope = {
      pts: [...byT.values()], incomplete: mine.reduce((a, d) => a + d.sc.incomplete, 0), sampled: mine.reduce((a, d) => a + d.sc.sampled, 0),
      compressed: mine.reduce((a, d) => a + d.sc.compressed, 0), sizeBytes: mine.reduce((a, d) => a + d.sc.sizeBytes, 0), dataBytes: mine.reduce((a, d) => a + d.sc.dataBytes, 0),
    };
    machineScopes.set(agent, sc);
    return { agent, hostname: hostnames.get(agent) ?? null, disks: mine.map((d) => d.disk), ...figures(sc, o) };
  });

  // the estate: machines' rates summed per bucket of the longest interval
  const bucketMs = Math.max(1000, ...[...machineScopes.values()].flatMap((s) => s.pts.map((p) => p.ms)));
  const buckets = new Map<number, Map<string, { bytes: number; ms: number; n: number }>>();
  for (const [agent, sc] of machineScopes) {
    for (const p of sc.pts) {
      const b = Math.floor(p.t / bucketMs) * bucketMs + bucketMs;
      let m = buckets.get(b);
      if (!m) buckets.set(b, (m = new Map()));
      const x = m.get(agent);
      if (x) { x.bytes += p.bytes; x.ms += p.ms; x.n++; } else m.set(agent, { bytes: p.bytes, ms: p.ms, n: 1 });
    }
  }
  // each bucket as one point of bucketMs whose bytes give the summed rate of the machines in it
  const estatePts: Pt[] = [...buckets.entries()].map(([t, m]) => {
    let rate = 0;
    for (const x of m.values()) rate += x.bytes / (x.ms / 1000);
    return { t, ms: bucketMs, bytes: rate * (bucketMs / 1000) };
  });
  const all = [...machineScopes.values()];
  const estateScope: Scope = {
    pts: estatePts, incomplete: all.reduce((a, s) => a + s.incomplete, 0), sampled: all.reduce((a, s) => a + s.sampled, 0),
    compressed: all.reduce((a, s) => a + s.compressed, 0), sizeBytes: all.reduce((a, s) => a + s.sizeBytes, 0), dataBytes: all.reduce((a, s) => a + s.dataBytes, 0),
  };
  const ef = figures(estateScope, o);
  // the estate's measured time is the span the buckets cover, its samples those of its machines
  ef.basis.samples = all.reduce((a, s) => a + s.pts.length, 0);
  const peak = ef.rpoWindowPeakBytesPerSec;
  const processServers = peak === null ? null : Math.max(1, Math.ceil(peak / o.psThroughputBytesPerSec));
  return {
    generatedAt: new Date(nowMs).toISOString(), options: o, disks, machines,
    estate: {
      ...ef, machines: machines.length, disks: disks.length, processServers,
      processServersBasis: peak === null ? 'no measured churn yet'
        : `the estate's churn at its highest over an RPO-long window (${Math.round(peak)} B/s) over ${o.psThroughputBytesPerSec} B/s of churn per process server, rounded up`,
    },
  };
}

/** A duration as the CLI writes it: 90s, 5m, 24h, 7d, or a number of seconds. */
export function parseSpan(s: string, what: string): number {
  const m = /^(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?$/.exec(s.trim());
  if (!m) throw new MobilityError('MOB_ERR_USAGE', `${what} is not a duration: ${JSON.stringify(s)} (e.g. 30s, 5m, 24h, 7d)`);
  const v = Math.round(Number(m[1]) * { ms: 1, s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000 }[(m[2] ?? 's') as 'ms' | 's' | 'm' | 'h' | 'd']);
  if (!(v > 0) || !Number.isSafeInteger(v)) throw new MobilityError('MOB_ERR_USAGE', `${what} must be more than zero, got ${JSON.stringify(s)}`);
  return v;
}

/**
 * A rate in bytes per second: 100M (MiB/s, as --max-rate), 1.5G, 500K, or in bits with a
 * "bit" suffix in decimal units as links are sold: 100Mbit = 12 500 000 B/s, 1Gbit.
 */
export function parseRate(s: string, what: string): number {
  const t = s.trim();
  const bits = /^(\d+(?:\.\d+)?)\s*([KMGT]?)(?:bit|bps|b\/s)$/i.exec(t);
  let v: number;
  if (bits) {
    v = Math.round((Number(bits[1]) * { '': 1, K: 1e3, M: 1e6, G: 1e9, T: 1e12 }[bits[2]!.toUpperCase() as '' | 'K' | 'M' | 'G' | 'T']) / 8);
  } else {
    const m = /^(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B)?(?:\/s)?$/i.exec(t);
    if (!m) throw new MobilityError('MOB_ERR_USAGE', `${what} is not a rate: ${JSON.stringify(s)} (bytes/s as 100M or 1G, or bits as 100Mbit)`);
    v = Math.round(Number(m[1]) * { '': 1, K: 1024, M: 1024 ** 2, G: 1024 ** 3, T: 1024 ** 4 }[m[2]!.toUpperCase() as '' | 'K' | 'M' | 'G' | 'T']);
  }
  if (!(v > 0) || !Number.isSafeInteger(v)) throw new MobilityError('MOB_ERR_USAGE', `${what} must be more than zero, got ${JSON.stringify(s)}`);
  return v;
}

/** What planFromDb reads from the configuration database. */
export interface CapacityDb {
  findAgent(m: string): { id: string };
  churnSamples(o: { agentId?: string | null; sinceMs?: number }): ChurnSample[];
  listProfileDisks(agentId?: string): { agentId: string; diskId: string }[];
  listAgents(): { id: string; hostname: string }[];
}

/**
 * The plan of GET /v1/capacity and the console's Capacity page from its textual options
 * (machine id or host name, rpo / retention / window as durations, bandwidth / psThroughput as
 * rates; null or empty: the default). MOB_ERR_USAGE for a bad value.
 */
export function planFromDb(db: CapacityDb, q: { machine?: string | null; rpo?: string | null; retention?: string | null; bandwidth?: string | null; psThroughput?: string | null; window?: string | null }, now = Date.now()):
  CapacityPlan & { machine: string | null; window: { from: string; to: string } } {
  const opt = (v: string | null | undefined) => (v === undefined || v === null || v === '' ? null : v);
  const machine = opt(q.machine);
  const agent = machine === null ? null : db.findAgent(machine);
  const rpo = opt(q.rpo);
  const retention = opt(q.retention);
  const bandwidth = opt(q.bandwidth);
  const ps = opt(q.psThroughput);
  const window = opt(q.window);
  const o = {
    rpoMs: rpo === null ? DEFAULT_RPO_MS : parseSpan(rpo, 'rpo'),
    retentionMs: retention === null ? DEFAULT_RETENTION_MS : parseSpan(retention, 'retention'),
    bandwidthBytesPerSec: bandwidth === null ? null : parseRate(bandwidth, 'bandwidth'),
    psThroughputBytesPerSec: ps === null ? DEFAULT_PS_THROUGHPUT : parseRate(ps, 'psThroughput'),
  };
  const sinceMs = now - (window === null ? CHURN_KEEP_MS : parseSpan(window, 'window'));
  const samples = db.churnSamples({ agentId: agent?.id ?? null, sinceMs });
  const profiled = db.listProfileDisks(agent?.id).map((d) => ({ agentId: d.agentId, diskId: d.diskId }));
  const hostnames = new Map(db.listAgents().map((x) => [x.id, x.hostname] as [string, string]));
  return { machine: agent?.id ?? null, window: { from: new Date(sinceMs).toISOString(), to: new Date(now).toISOString() }, ...planCapacity(samples, o, profiled, hostnames, now) };
}
