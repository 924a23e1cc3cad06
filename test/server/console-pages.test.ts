/**
 * The console's Capacity and Recovery plans pages, rendered from a real configuration database:
 * the capacity figures are planFromDb's (GET /v1/capacity's) for the options in the page's
 * query, a bad option is shown as an error rather than failing the page, and the plans page
 * shows each plan's steps and its runs with their outcome.
 */
import t from 'tap';
import path from 'node:path';
import { ConfigDb, type ChurnSample } from '../../src/server/config-db.js';
import { planFromDb } from '../../src/server/capacity.js';
import { pageBody, type RenderData } from '../../src/server/console/pages.js';
import { pageView } from '../../src/server/console/console-service.js';
import type { ConsoleServerView } from '../../src/server/console/console-view.js';
import { tmpDir } from '../helpers.js';

t.test('capacity and recovery plan pages', async (t) => {
  const db = ConfigDb.open(path.join(await tmpDir(t), 'data'));
  t.teardown(() => db.close());
  db.upsertAgent({ id: 'm1', machineId: 'ab'.repeat(16), hostname: 'web1', certFingerprint: 'x', registeredWith: 'passphrase' });
  db.enableProfile('m1', 'a', '/dev/sdb');
  const now = Date.now();
  const samples: ChurnSample[] = Array.from({ length: 30 }, (_, i) => ({
    agentId: 'm1', diskId: 'a', t: now - (30 - i) * 10_000, intervalMs: 10_000, bytes: (i + 1) * 100_000, writes: 10,
    sampledBytes: 65_536, compressedBytes: 32_768, sizeBytes: 1 << 30, usedBytes: 200 << 20, complete: true,
  }));
  db.recordChurn(samples, now);
  const d: RenderData = { server: { db } as unknown as ConsoleServerView, status: [], jobs: { list: () => [] } as unknown as RenderData['jobs'], now };

  const view = pageView('/console/capacity', new URLSearchParams({ rpo: '1m', retention: '2h', bandwidth: '100Mbit' }));
  t.same(view, { page: 'capacity', rpo: '1m', retention: '2h', bandwidth: '100Mbit' }, 'the options come from the query');
  const page = await pageBody(view!, d);
  const plan = planFromDb(db, { rpo: '1m', retention: '2h', bandwidth: '100Mbit' }, now);
  t.equal(plan.disks.length, 1);
  const bits = plan.estate.bandwidthForRpoBytesPerSec! * 8;
  const bw = (bits / 1e6).toFixed(bits < 1e7 ? 2 : 1);
  t.match(page.body, new RegExp(`bandwidth for an RPO of [^:]+: <b>${bw.replace('.', '\\.')} Mbit/s</b>`), `the estate's bandwidth for the RPO is the API's (${bw} Mbit/s)`);
  t.match(page.body, /<td>30<\/td>/, 'the number of samples it rests on');
  t.match(page.body, /<td>0\.50<\/td>/, 'the measured ratio');
  t.match(page.body, /id="capacity-disks"[\s\S]*<a href="\/console\/machine\/m1">m1<\/a><\/td><td>a<\/td>/, 'the disk, linked to its machine');
  const bad = await pageBody({ page: 'capacity', rpo: 'soon', retention: '', bandwidth: '' }, d);
  t.match(bad.body, /class="badge bad">[^<]*rpo/, 'a bad option is shown, not thrown');
  t.match(bad.body, /<form method="get" action="\/console\/capacity"/, 'with the form to correct it');

  t.match((await pageBody({ page: 'plans' }, d)).body, /No recovery plan yet/);
  db.putPlan('shop', { name: 'shop', group: 'g1', steps: [{ machines: ['m1'], pre: '/srv/a.sh', post: null, bootCheck: {} }], networkMap: null, networkMaps: {}, scriptTimeoutMs: 60_000 });
  db.startPlanRun('r1', 'shop', 'test-failover');
  db.endPlanRun('r1', false, { failure: 'step 1: machine m1: did not boot (timeout)', groupPoint: 'gp-1' });
  db.startPlanRun('r2', 'shop', 'cleanup');
  const plans = await pageBody(pageView('/console/plans')!, d);
  t.match(plans.body, /<h3>shop <span class="dim">group g1<\/span><\/h3>/);
  t.match(plans.body, /<td>1<\/td><td><a href="\/console\/machine\/m1">m1<\/a><\/td><td>\/srv\/a\.sh<\/td><td>–<\/td><td>yes<\/td>/, 'the step with its scripts and boot check');
  t.match(plans.body, /<td>r2<\/td><td>cleanup<\/td>.*badge busy">running/, 'a run going on');
  t.match(plans.body, /<td>r1<\/td><td>test-failover<\/td>.*badge bad">failed<\/span><\/td><td>gp-1<\/td><td class="dim">step 1: machine m1: did not boot \(timeout\)/, 'a failed run with why');
});

t.test('a machine page for an id the server does not know loads no catalog', async (t) => {
  const db = ConfigDb.open(path.join(await tmpDir(t), 'data'));
  t.teardown(() => db.close());
  db.upsertAgent({ id: 'm1', machineId: 'cd'.repeat(16), hostname: 'web1', certFingerprint: 'x', registeredWith: 'passphrase' });
  const loaded: string[] = [];
  const server = {
    db,
    catalog: async (a: string) => { loaded.push(a); return { list: () => [] }; },
    backend: { images: async () => [] },
    failoverState: async () => null,
    control: { connected: () => false },
  } as unknown as ConsoleServerView;
  const d: RenderData = { server, status: [], jobs: { list: () => [], scanJobs: () => [] } as unknown as RenderData['jobs'], now: Date.now() };
  for (const id of ['made-up-1', 'made-up-2']) await pageBody(pageView(`/console/machine/${id}`)!, d);
  t.same(loaded, [], 'no catalog loaded (and kept) for ids typed into the address');
  await pageBody(pageView('/console/machine/m1')!, d);
  t.same(loaded, ['m1'], 'a registered machine\'s catalog is read');
});
