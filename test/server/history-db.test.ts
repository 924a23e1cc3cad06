/**
 * The history tables of the configuration database (migration 4): batch writes, downsampling of
 * 10 s samples older than a day into 1-minute rows and deletion past 7 days, with injected
 * timestamps; an older database (schema 3) upgrades in place and keeps its data.
 */
import t from 'tap';
import path from 'node:path';
import { migrationNumber, rollBackSchema } from './schema-rollback.js';
import { ConfigDb, HISTORY_FINE_MS, HISTORY_KEEP_MS, MIGRATIONS, type HealthSample } from '../../src/server/config-db.js';
import { tmpDir } from '../helpers.js';

const sample = (t: number, o: Partial<HealthSample> = {}): HealthSample => ({
  agentId: 'a1', diskId: 'd0', resMs: 10_000, t, rpoMs: 1000, dataLagMs: 100, backlogBytes: 10, churnBytesPerSec: 100, state: 'continuous', ...o,
});

t.test('downsampling and retention of the history, with injected times', async (t) => {
  const db = ConfigDb.open(path.join(await tmpDir(t), 'data'));
  t.teardown(() => db.close());
  const now = Date.UTC(2026, 11, 3, 12, 0, 0);
  const old = now - HISTORY_FINE_MS - 3600_000; // a day and an hour ago, on a minute boundary
  const samples: HealthSample[] = [];
  // minute 1: six 10 s rows; minute 2: three rows, the last one's state is resync-required
  for (let i = 0; i < 6; i++) samples.push(sample(old + i * 10_000, { rpoMs: 1000 + i, dataLagMs: 100 * i, backlogBytes: 5 + i, churnBytesPerSec: 100 * (i + 1) }));
  samples.push(sample(old + 60_000, { dataLagMs: 7, churnBytesPerSec: null, state: 'continuous' }));
  samples.push(sample(old + 70_000, { dataLagMs: 9, churnBytesPerSec: 50 }));
  samples.push(sample(old + 80_000, { dataLagMs: 8, churnBytesPerSec: 150, state: 'resync-required' }));
  samples.push(sample(old, { diskId: 'd1', dataLagMs: 42 })); // another disk, same minute
  samples.push(sample(now - HISTORY_KEEP_MS - 60_000, { diskId: 'd2' })); // past the week
  samples.push(sample(now - HISTORY_FINE_MS + 60_000, { dataLagMs: 1 })); // within the day: stays a 10 s row
  samples.push(sample(now - 10_000, { dataLagMs: 2 }));
  const ids = db.writeHistory({
    samples,
    events: [
      { t: now - HISTORY_KEEP_MS - 1, agentId: 'a1', diskId: 'd0', kind: 'state', state: 'continuous', code: null, reason: 'new -> continuous' },
      { t: now - 5000, agentId: 'a1', diskId: 'd0', kind: 'state', state: 'resync-required', code: null, reason: 'continuous -> resync-required: x' },
      { t: now - 4000, agentId: 'a1', diskId: null, kind: 'cut-failed', state: null, code: 'MOB_ERR_CUT', reason: 'y' },
    ],
    fired: [
      { agentId: 'a1', diskId: 'd0', kind: 'rpo', firedAt: now - HISTORY_KEEP_MS - 5000, clearedAt: now - HISTORY_KEEP_MS - 1000, rpoMs: 2000, thresholdMs: 1000, reason: 'old', clearReason: 'back' },
      { agentId: 'a1', diskId: 'd1', kind: 'rpo', firedAt: now - HISTORY_KEEP_MS - 5000, clearedAt: null, rpoMs: 2000, thresholdMs: 1000, reason: 'old but active', clearReason: null },
      { agentId: 'a1', diskId: 'd0', kind: 'rpo', firedAt: now - 3000, clearedAt: null, rpoMs: 5000, thresholdMs: 1000, reason: 'recent', clearReason: null },
    ],
    cleared: [],
  });
  t.equal(ids.length, 3, 'alert ids returned');
  db.writeHistory({ samples: [], events: [], fired: [], cleared: [{ id: ids[2]!, clearedAt: now - 1000, clearReason: 'RPO back under' }] });

  const r = db.compactHistory(now);
  t.equal(r.downsampled, 10, 'the ten 10 s rows older than a day were folded');
  t.equal(r.written, 3, 'into three minute rows (two minutes of d0, one of d1)');
  const all = db.historySamples({ sinceMs: 0 });
  const d0 = all.filter((s) => s.diskId === 'd0');
  t.same(d0.map((s) => [s.t - now, s.resMs]), [
    [old - now, 60_000], [old + 60_000 - now, 60_000], [-HISTORY_FINE_MS + 60_000, 10_000], [-10_000, 10_000],
  ], 'minute rows for the old part, 10 s rows within the day, oldest first');
  t.match(d0[0], { rpoMs: 1005, dataLagMs: 500, backlogBytes: 10, churnBytesPerSec: 350, state: 'continuous' }, 'first minute: max RPO, lag and backlog, mean churn');
  t.match(d0[1], { dataLagMs: 9, churnBytesPerSec: 100, state: 'resync-required' }, 'second minute: a null churn is not averaged in, the last state wins');
  t.same(all.filter((s) => s.diskId === 'd1').map((s) => [s.t, s.dataLagMs, s.resMs]), [[old, 42, 60_000]], 'the other disk folded on its own');
  t.equal(all.filter((s) => s.diskId === 'd2').length, 0, 'rows past 7 days deleted');

  const events = db.listEvents();
  t.same(events.map((e) => e.kind), ['cut-failed', 'state'], 'the event past 7 days deleted; newest first');
  t.same(db.listEvents({ limit: 1 }).map((e) => e.kind), ['cut-failed'], 'limit');
  t.same(db.listEvents({ sinceMs: now - 4500 }).map((e) => e.kind), ['cut-failed'], 'since');
  t.same(db.listEvents({ diskId: 'd0' }).map((e) => e.reason), ['continuous -> resync-required: x'], 'by disk');
  const alerts = db.listAlerts();
  t.same(alerts.map((a) => a.reason), ['recent', 'old but active'], 'a cleared alert past 7 days deleted, an active one kept; newest first');
  t.same(db.listAlerts({ active: true }).map((a) => a.reason), ['old but active'], 'active only');
  t.match(alerts[0], { clearedAt: now - 1000, clearReason: 'RPO back under', rpoMs: 5000, thresholdMs: 1000 });
  t.same(db.lastStates(), [{ agentId: 'a1', diskId: 'd0', state: 'resync-required' }], 'the last state per disk');

  // a second run the next minute: nothing more to fold, the minute rows stay
  const again = db.compactHistory(now + 60_000);
  t.equal(again.downsampled, 0);
  t.equal(db.historySamples({ sinceMs: 0 }).length, all.length, 'idempotent');
  // a minute split across runs is merged with the row already written
  db.writeHistory({ samples: [sample(old + 50_000, { dataLagMs: 9999, churnBytesPerSec: 150 })], events: [], fired: [], cleared: [] });
  db.compactHistory(now);
  t.match(db.historySamples({ sinceMs: 0, diskId: 'd0' })[0], { t: old, resMs: 60_000, dataLagMs: 9999 }, 'late row merged into its minute');
  t.equal(db.historySamples({ sinceMs: 0, diskId: 'd0' }).filter((s) => s.t === old).length, 1, 'still one row for that minute');
});

t.test('a schema-3 database upgrades in place and gains the history tables', async (t) => {
  const dir = path.join(await tmpDir(t), 'data');
  ConfigDb.open(dir).close();
  const file = path.join(dir, 'config.db');
  // make it look like a database written by the previous server: schema 3, without the history
  // tables (and without the tables of later migrations)
  t.equal(migrationNumber(/CREATE TABLE health_samples/), 4, 'the history is migration 4');
  rollBackSchema(file, 3, (raw) => {
    raw.prepare("INSERT INTO policies (name, rpo_threshold_ms, retention_ms, crash_interval_ms, app_interval_ms, compress, bandwidth_bytes, created_at) VALUES ('gold', 1000, 60000, 1000, 0, 1, 0, 'x')").run();
  });
  const db = ConfigDb.open(dir);
  t.teardown(() => db.close());
  t.equal(db.schemaVersion, MIGRATIONS.length);
  t.match(MIGRATIONS[3], /CREATE TABLE health_samples/, 'the history is migration 4');
  t.equal(db.getPolicy('gold').rpoThresholdMs, 1000, 'existing data kept');
  t.same(db.listEvents(), [], 'history tables created');
  db.writeHistory({ samples: [sample(1)], events: [], fired: [], cleared: [] });
  t.equal(db.historySamples({ sinceMs: 0 }).length, 1);
});
