/**
 * The capacity planner (server/capacity.ts) on hand-built churn samples, every expected figure
 * worked out by hand in the comments: percentiles, RPO-windowed bandwidth with the measured
 * ratio, initial sync over the link the mean churn leaves, storage for the retention, and the
 * process-server count; machines summed per report, the estate per bucket.
 */
import t from 'tap';
import type { ChurnSample } from '../../src/server/config-db.js';
import { initialSyncSeconds, parseRate, parseSpan, percentile, planCapacity, windowedRates } from '../../src/server/capacity.js';

const T0 = 1_700_000_000_000; // a multiple of 10 s
const base = { intervalMs: 10_000, writes: 1, sizeBytes: 1 << 30, usedBytes: null as number | null, complete: true, sampledBytes: 0, compressedBytes: 0 };

/** Disk a of m1: sample k (1..20) ends at T0 + 10 s k with 10 000 k bytes: 1000 k B/s; each sampled 64 KiB -> 16 KiB (ratio 0.25). */
const ramp: ChurnSample[] = Array.from({ length: 20 }, (_, i) => ({
  ...base, agentId: 'm1', diskId: 'a', t: T0 + (i + 1) * 10_000, bytes: (i + 1) * 10_000, sampledBytes: 65_536, compressedBytes: 16_384, usedBytes: 100_000_000,
}));
/** Disk c of m1: 1000 B/s at the same report times; nothing sampled. */
const constC: ChurnSample[] = ramp.map((s) => ({ ...base, agentId: 'm1', diskId: 'c', t: s.t, bytes: 10_000, sizeBytes: 1 << 20 }));
/** Disk b of m2: 5000 B/s, nothing sampled (ratio assumed 1), 512 MiB, nothing mounted. */
const constB: ChurnSample[] = ramp.map((s) => ({ ...base, agentId: 'm2', diskId: 'b', t: s.t + 3000, bytes: 50_000, sizeBytes: 512 << 20 }));
/** An incomplete sample (events lost): counted, left out of every figure. */
const lost: ChurnSample = { ...base, agentId: 'm1', diskId: 'a', t: T0 + 21 * 10_000, bytes: 999_999_999, complete: false, sampledBytes: 65_536, compressedBytes: 65_536, usedBytes: 100_000_000 };

t.test('percentile (nearest rank) and RPO-long windows', async (t) => {
  t.equal(percentile([], 95), null);
  t.equal(percentile([5], 95), 5);
  t.equal(percentile(Array.from({ length: 20 }, (_, i) => i + 1), 95), 19, 'rank ceil(0.95 x 20) = 19');
  t.equal(percentile(Array.from({ length: 10 }, (_, i) => i + 1), 95), 10, 'rank ceil(9.5) = 10');
  t.equal(percentile([3, 1, 2], 50), 2, 'unsorted input');
  // 10 s points of 10, 20, 30 kB (measured from 0 s): a 30 s window at the third holds all three
  // (60 kB / 30 s); 20 s ones end at the second (30 kB / 20 s) and the third (50 kB / 20 s). Windows
  // the measurement does not cover whole (the first 10 or 20 s) do not count
  const pts = [{ t: 10_000, ms: 10_000, bytes: 10_000 }, { t: 20_000, ms: 10_000, bytes: 20_000 }, { t: 30_000, ms: 10_000, bytes: 30_000 }];
  t.same(windowedRates(pts, 30_000), [2000]);
  t.same(windowedRates(pts, 20_000), [1500, 2500]);
  t.same(windowedRates(pts, 1000), [1000, 2000, 3000], 'a window shorter than a sample is the sample');
  t.same(windowedRates(pts, 60_000), [2000], 'a measurement shorter than the window: its own mean, once');
  // a burst in the first sample does not make an RPO-long window of its own
  const burst = [{ t: 10_000, ms: 10_000, bytes: 1_000_000 }, ...Array.from({ length: 59 }, (_, i) => ({ t: (i + 2) * 10_000, ms: 10_000, bytes: 10_000 }))];
  t.equal(Math.max(...windowedRates(burst, 300_000)), (1_000_000 + 29 * 10_000) / 300, 'the highest 5-minute average holds the burst with 29 quiet samples');
  t.same(windowedRates([], 1000), []);
});

t.test('initial sync over what the mean churn leaves of the link', async (t) => {
  t.same(initialSyncSeconds(1000, 200, 100), { seconds: 10, note: null }, '1000 B over 200 - 100 B/s');
  t.same(initialSyncSeconds(0, 200, 100), { seconds: 0, note: null });
  t.equal(initialSyncSeconds(1000, null, 0).seconds, null);
  const never = initialSyncSeconds(1000, 100, 100);
  t.equal(never.seconds, null);
  t.match(never.note, /never finish/);
});

t.test('rates and spans as the CLI writes them', async (t) => {
  t.equal(parseRate('100M', 'bandwidth'), 100 * 1024 * 1024, 'bytes, binary units, as --max-rate');
  t.equal(parseRate('100Mbit', 'bandwidth'), 12_500_000, 'bits, decimal units, as links are sold');
  t.equal(parseRate('1Gbit', 'bandwidth'), 125_000_000);
  t.equal(parseRate('512K', 'bandwidth'), 524_288);
  t.equal(parseSpan('5m', 'rpo'), 300_000);
  t.equal(parseSpan('7d', 'retention'), 7 * 86_400_000);
  t.equal(parseSpan('90', 'rpo'), 90_000, 'seconds by default');
  for (const bad of ['', 'fast', '0', '-5m', '5w']) t.throws(() => parseSpan(bad, 'rpo'), { code: 'MOB_ERR_USAGE' }, `span ${JSON.stringify(bad)}`);
  for (const bad of ['', 'lots', '0', '10Mbyte']) t.throws(() => parseRate(bad, 'bandwidth'), { code: 'MOB_ERR_USAGE' }, `rate ${JSON.stringify(bad)}`);
});

t.test('a plan from hand-built samples', async (t) => {
  const o = { rpoMs: 30_000, retentionMs: 100_000, bandwidthBytesPerSec: 1_000_000, psThroughputBytesPerSec: 5000 };
  const profiled = [{ agentId: 'm3', diskId: 'new' }];
  const p = planCapacity([...constB, lost, ...ramp, ...constC], o, profiled, new Map([['m1', 'web1']]), T0 + 300_000);

  t.same(p.disks.map((d) => `${d.agent}/${d.disk}`), ['m1/a', 'm1/c', 'm2/b', 'm3/new'], 'every disk with samples, and a profiled one with none yet');
  const a = p.disks[0]!;
  t.equal(a.basis.samples, 20);
  t.equal(a.basis.incompleteSamples, 1, 'the incomplete sample is counted');
  t.equal(a.totalBytes, 2_100_000, 'and its bytes left out: 10 000 x (1 + ... + 20)');
  t.equal(a.basis.measuredMs, 200_000);
  t.equal(a.basis.from, new Date(T0).toISOString(), 'the window starts where the first interval began');
  t.equal(a.basis.to, new Date(T0 + 200_000).toISOString());
  t.equal(a.meanBytesPerSec, 10_500, '2 100 000 B / 200 s');
  t.equal(a.p95BytesPerSec, 19_000, 'rank 19 of 1000..20 000');
  t.equal(a.peakBytesPerSec, 20_000);
  t.equal(a.peakAt, new Date(T0 + 200_000).toISOString());
  t.equal(a.basis.ratio, 0.25, '16 KiB of 64 KiB per sample; the incomplete sample\'s are left out too');
  t.notOk(a.basis.ratioAssumed);
  // 30 s windows, whole ones only (k >= 3): samples k-2..k: 10 000 (3k - 3) B / 30 s = 1000 (k - 1); k = 20: 19 000;
  // p95 (rank ceil(0.95 x 18) = 18 of 2000..19 000) 19 000
  t.equal(a.rpoWindowPeakBytesPerSec, 19_000);
  t.equal(a.rpoWindowP95BytesPerSec, 19_000);
  t.equal(a.bandwidthForRpoBytesPerSec, 4750, '19 000 x 0.25');
  t.equal(a.bandwidthForRpoP95BytesPerSec, 4750, '19 000 x 0.25');
  t.equal(a.rpoHeld, true, '1 000 000 B/s >= 4750');
  t.equal(a.dataBytes, 100_000_000, 'the used bytes, not the size');
  t.equal(a.initialSyncWireBytes, 25_000_000, 'x 0.25');
  t.equal(a.initialSyncSeconds, 25_000_000 / (1_000_000 - 10_500 * 0.25), 'over the link less the mean churn on the wire (2625 B/s)');
  t.equal(a.replicaBytes, 1 << 30);
  t.equal(a.replicaUsedBytes, 100_000_000);
  // 100 s windows: k >= 10 holds k-9..k: 10 000 (10k - 45) B / 100 s = 1000k - 4500; k = 20: 15 500 B/s x 100 s
  t.equal(a.recoveryPointBytes, 1_550_000);
  t.equal(a.storageBytes, 101_550_000);

  const b = p.disks[2]!;
  t.ok(b.basis.ratioAssumed, 'nothing sampled: the ratio is assumed');
  t.equal(b.basis.ratio, 1);
  t.equal(b.dataBytes, 512 << 20, 'nothing mounted: the disk size');
  t.equal(b.bandwidthForRpoBytesPerSec, 5000);

  const none = p.disks[3]!;
  t.equal(none.basis.samples, 0);
  t.equal(none.peakBytesPerSec, null);
  t.equal(none.bandwidthForRpoBytesPerSec, null);
  t.equal(none.basis.from, null);

  const m1 = p.machines.find((m) => m.agent === 'm1')!;
  t.equal(m1.hostname, 'web1');
  t.same(m1.disks, ['a', 'c']);
  t.equal(m1.basis.samples, 20, 'one point per report: the disks of a report are summed');
  t.equal(m1.peakBytesPerSec, 21_000, '20 000 + 1000');
  t.equal(m1.p95BytesPerSec, 20_000);
  t.equal(m1.rpoWindowPeakBytesPerSec, 20_000, '19 000 + 1000');
  t.equal(m1.basis.ratio, 0.25, 'only disk a sampled anything');
  t.equal(m1.bandwidthForRpoBytesPerSec, 5000);
  t.equal(m1.sizeBytes, (1 << 30) + (1 << 20));
  t.equal(m1.dataBytes, 100_000_000 + (1 << 20));
  t.equal(p.machines.find((m) => m.agent === 'm3')!.peakBytesPerSec, null);

  const e = p.estate;
  t.equal(e.machines, 3);
  t.equal(e.disks, 4);
  // buckets of 10 s: m1 (at T0 + 10k s) and m2 (3 s later) fall in the same bucket: 1000k + 1000 + 5000
  t.equal(e.peakBytesPerSec, 26_000);
  t.equal(e.rpoWindowPeakBytesPerSec, 25_000, '19 000 + 1000 + 5000');
  t.equal(e.processServers, 5, 'ceil(25 000 / 5000)');
  t.match(e.processServersBasis, /25000 B\/s.*5000 B\/s/);
  t.equal(e.meanBytesPerSec, 10_500 + 1000 + 5000);
  t.equal(e.basis.samples, 40, '20 reports of m1 and 20 of m2');
  t.equal(e.basis.incompleteSamples, 1);
  t.equal(e.replicaBytes, (1 << 30) + (1 << 20) + (512 << 20));

  const tight = planCapacity(ramp, { ...o, psThroughputBytesPerSec: 100_000, bandwidthBytesPerSec: 2000 }, [], new Map(), T0);
  t.equal(tight.estate.processServers, 1, 'at least one process server');
  t.equal(tight.estate.rpoHeld, false, '2000 B/s < 4750');
  t.equal(tight.disks[0]!.initialSyncSeconds, null, 'the link (2000 B/s) does not carry the mean churn (2625 B/s on the wire)');
  t.match(tight.disks[0]!.initialSyncNote, /never finish/);

  const empty = planCapacity([], o, [], new Map(), T0);
  t.equal(empty.estate.processServers, null);
  t.equal(empty.disks.length, 0);
});

t.test('the churn control message is checked before anything is stored', async (t) => {
  const { parseChurn } = await import('../../src/server/control.js');
  const good = { diskId: 'd1', intervalMs: 10_000, bytes: 4096, writes: 1, sampledBytes: 65_536, compressedBytes: 1000, sizeBytes: 1 << 20, usedBytes: null, complete: true };
  t.same(parseChurn({ disks: [good] }), [good]);
  t.same(parseChurn({ disks: [{ ...good, usedBytes: 5 }] })[0]!.usedBytes, 5);
  const bad: [string, unknown][] = [
    ['no list', { disks: 'x' }],
    ['too many disks', { disks: Array.from({ length: 257 }, () => good) }],
    ['not an object', { disks: [1] }],
    ['no disk id', { disks: [{ ...good, diskId: '' }] }],
    ['negative bytes', { disks: [{ ...good, bytes: -1 }] }],
    ['fractional bytes', { disks: [{ ...good, bytes: 1.5 }] }],
    ['a zero interval', { disks: [{ ...good, intervalMs: 0 }] }],
    ['bytes as a string', { disks: [{ ...good, bytes: '10' }] }],
    ['more compressed than sampled', { disks: [{ ...good, compressedBytes: 70_000 }] }],
    ['used bytes negative', { disks: [{ ...good, usedBytes: -5 }] }],
    ['complete missing', { disks: [{ ...good, complete: undefined }] }],
  ];
  for (const [what, m] of bad) t.throws(() => parseChurn(m as Record<string, unknown>), { code: 'MOB_ERR_FRAME_MALFORMED' }, what);
});

t.test('churn samples in the configuration database: a database from before capacity planning gains the tables, samples round-trip, old ones go', async (t) => {
  const { migrationNumber, rollBackSchema } = await import('./schema-rollback.js');
  const path = await import('node:path');
  const { ConfigDb, MIGRATIONS, CHURN_KEEP_MS } = await import('../../src/server/config-db.js');
  const { tmpDir } = await import('../helpers.js');
  const dir = path.join(await tmpDir(t), 'data');
  ConfigDb.open(dir).close();
  // as the server before capacity planning left it
  rollBackSchema(path.join(dir, 'config.db'), migrationNumber(/CREATE TABLE profile_disks/) - 1);
  const db = ConfigDb.open(dir);
  t.teardown(() => db.close());
  t.equal(db.schemaVersion, MIGRATIONS.length, 'upgraded in place');
  db.upsertAgent({ id: 'm1', machineId: 'ab'.repeat(16), hostname: 'web1', certFingerprint: 'x', registeredWith: 'passphrase' });
  db.enableProfile('m1', 'a', '/dev/sdb');
  t.same(db.listProfileDisks('m1').map((d) => [d.diskId, d.device]), [['a', '/dev/sdb']]);
  t.same(db.listDisks('m1'), [], 'a profiled disk is not a protected one');
  const now = T0 + CHURN_KEEP_MS + 50_000;
  db.recordChurn([{ ...ramp[0]!, t: T0 }, { ...ramp[1]!, t: now - 1000, usedBytes: null }], now);
  const back = db.churnSamples({ agentId: 'm1' });
  t.equal(back.length, 1, 'a sample older than the retention is deleted at the next write');
  t.same(back[0], { ...ramp[1]!, t: now - 1000, usedBytes: null }, 'a sample round-trips');
  t.ok(db.disableProfile('m1', 'a'));
  t.notOk(db.disableProfile('m1', 'a'), 'twice: nothing to disable');
  t.equal(db.churnSamples().length, 1, 'disabling keeps the samples');
});
