/**
 * The operator console in a real headless Chromium (Debian's chromium, driven by playwright-core;
 * no browser is downloaded), against a real `mobility server` and a real `mobility protect`
 * agent protecting an ext4 filesystem on a loop device (test/protect-harness.ts):
 *
 *  - a wrong password is refused; the right one logs in (session cookie Secure, HttpOnly, SameSite=Strict);
 *  - the overview shows the disk go from initial sync (progress shown, updated live) to protected;
 *  - the disk page draws RPO, data lag, churn and backlog charts whose points are the API's (/v1/history);
 *  - a test failover run from the machine page makes an fsck-clean image, and its cleanup from
 *    the page removes it; both are audited and listed as jobs;
 *  - an action without the CSRF token (a plain HTTPS request with the session cookie) is refused
 *    and changes nothing; so is one with the token from another origin;
 *  - after a server restart the charts still show the samples of the last hour.
 *
 * Screenshots go to .tap/artifacts/console-browser/<run>/ (named in the test log).
 * Needs root, chromium, losetup, mkfs.ext4, e2fsck, fsfreeze, fio and tracefs: a missing one fails the test.
 */
import t, { type Test } from 'tap';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import path from 'node:path';
import type { Page } from 'playwright-core';
import { apiGet, clearFlash, consoleUrl, launchBrowser, LONG, outcome, request, screenshots } from '../console-harness.js';
import { runCli, startServer, stopGently } from '../helpers.js';
import { Agent, setup, sh, shAsync } from '../protect-harness.js';

const PASSWORD = 'console test password 1';

// samples every second (the history's test knob), so the charts fill without waiting 10 s per point
process.env.MOBILITY_HISTORY_WINDOW_MS = '1000';

interface HistorySample { at: string; rpoMs: number | null; dataLagMs: number | null; backlogBytes: number | null; churnBytesPerSec: number | null; state: string }
interface ChartState { range: string; fetchedAt: number; samples: HistorySample[]; xs: number[]; ys: Record<string, (number | null)[]>; canvases: { key: string; inked: number }[] }

/** What the disk page's charts hold now: the samples they were given, each uPlot's data, and how much of each canvas is drawn. */
async function chartState(page: Page): Promise<ChartState> {
  return page.evaluate(() => {
    type Plot = { data: (number | null)[][]; root: HTMLElement };
    const w = window as unknown as { mobilityCharts?: { range: string; fetchedAt: number; samples: HistorySample[]; plots: Record<string, Plot> } };
    const c = w.mobilityCharts;
    if (!c) return { range: '', fetchedAt: 0, samples: [], xs: [], ys: {}, canvases: [] };
    const ys: Record<string, (number | null)[]> = {};
    const canvases: { key: string; inked: number }[] = [];
    for (const [k, p] of Object.entries(c.plots)) {
      ys[k] = p.data[1];
      const cv = p.root.querySelector('canvas');
      let inked = 0;
      if (cv) {
        const px = cv.getContext('2d')!.getImageData(0, 0, cv.width, cv.height).data;
        for (let i = 3; i < px.length; i += 4) if (px[i] !== 0) inked++;
      }
      canvases.push({ key: k, inked });
    }
    return { range: c.range, fetchedAt: c.fetchedAt, samples: c.samples, xs: (Object.values(c.plots)[0]?.data[0] ?? []) as number[], ys, canvases };
  });
}

const FIELDS: [string, keyof HistorySample, number][] = [['rpo', 'rpoMs', 1 / 1000], ['lag', 'dataLagMs', 1 / 1000], ['churn', 'churnBytesPerSec', 1 / 1048576], ['backlog', 'backlogBytes', 1 / 1048576]];

/** Every point of every chart is the API's sample at that time (the newest, still aggregating window aside). */
function checkChartsMatch(t: Test, chart: ChartState, api: HistorySample[], what: string): void {
  const byAt = new Map(api.map((s) => [Date.parse(s.at) / 1000, s]));
  t.ok(chart.xs.length >= 5, `${what}: the charts have ${chart.xs.length} points`);
  t.same(chart.xs, chart.samples.map((s) => Date.parse(s.at) / 1000), `${what}: the x values are the samples' times`);
  let compared = 0;
  const mismatches: string[] = [];
  for (let i = 0; i < chart.xs.length - 1; i++) {
    const s = byAt.get(chart.xs[i]);
    if (!s) { mismatches.push(`no API sample at ${new Date(chart.xs[i] * 1000).toISOString()}`); continue; }
    for (const [key, field, scale] of FIELDS) {
      const want = s[field] === null ? null : (s[field] as number) * scale;
      const got = chart.ys[key][i];
      if (want === null ? got !== null : got === null || Math.abs(got - want) > 1e-9 * Math.max(1, Math.abs(want))) mismatches.push(`${key} at ${s.at}: chart ${got}, API ${want}`);
      compared++;
    }
  }
  t.same(mismatches.slice(0, 10), [], `${what}: all ${compared} chart values equal the API's samples`);
  for (const c of chart.canvases) t.ok(c.inked > 500, `${what}: the ${c.key} chart is drawn (${c.inked} pixels inked)`);
}

t.test('operator console in headless Chromium: login, live sync progress, charts, test failover, CSRF, restart', async (t) => {
  const s = await setup(t, 256);
  const screenshot = await screenshots(t, 'console-browser');

  // an operator, created with the CLI as an administrator would
  const pwFile = path.join(s.dir, 'operator-password');
  await fsp.writeFile(pwFile, PASSWORD + '\n', { mode: 0o600 });
  const add = await runCli(['operator', 'add', 'alice', '--data-dir', s.server.info.dataDir, '--password-file', pwFile]).done;
  t.equal(add.code, 0, `operator add succeeds ${add.stderr}`);

  // enough data that the initial sync takes a while at the agent's rate limit (progress is visible)
  sh('dd', ['if=/dev/urandom', `of=${s.mnt}/bulk`, 'bs=1M', 'count=96', 'status=none']);
  sh('sync', []);

  let server = s.server;
  const base = () => consoleUrl(server);
  const { ctx, page } = await launchBrowser(t, s.c);

  // --- a wrong password is refused
  await page.goto(`${base()}/console/`);
  t.match(page.url(), /\/console\/login$/, 'the console sends a visitor without a session to the login page');
  await page.fill('input[name=name]', 'alice');
  await page.fill('input[name=password]', 'not the password');
  const refused = await Promise.all([page.waitForNavigation(), page.click('button[type=submit]')]).then(([r]) => r);
  t.equal(refused?.status(), 401, 'a wrong password answers 401');
  t.equal((await page.textContent('#login-error'))?.trim(), 'Wrong operator name or password.', 'and says so');
  t.same((await ctx.cookies()).filter((c) => c.name.includes('mobility')), [], 'no session cookie was set');
  await screenshot(page, 'login-refused');

  // --- the right one logs in
  await page.fill('input[name=password]', PASSWORD);
  await Promise.all([page.waitForNavigation(), page.click('button[type=submit]')]);
  t.match(page.url(), /\/console\/$/, 'logged in: the overview');
  const cookie = (await ctx.cookies()).find((c) => c.name === '__Host-mobility-session');
  t.ok(cookie, 'the session cookie is set');
  t.ok(cookie?.secure && cookie.httpOnly && cookie.sameSite === 'Strict', 'Secure, HttpOnly, SameSite=Strict');
  t.equal(await page.evaluate(() => document.cookie), '', 'scripts cannot read the session cookie');

  // --- protection starts while the overview is open: watch it live
  await page.waitForFunction(() => document.querySelector('#live-state.on') !== null, undefined, { timeout: LONG });
  const seen: { state: string; label: string; progress: number | null; at: number }[] = [];
  let watching = true;
  const watcher = (async () => {
    while (watching) {
      const row = await page.evaluate((id) => {
        const tr = document.querySelector(`tr[data-disk="${id}/d0"]`) as HTMLElement | null;
        if (!tr) return null;
        const p = tr.querySelector('progress') as HTMLProgressElement | null;
        return { state: tr.dataset.state ?? '', label: tr.querySelector('.badge')?.textContent ?? '', progress: p ? p.value : null };
      }, s.agentId).catch(() => null);
      if (row) seen.push({ ...row, at: Date.now() });
      await new Promise((r) => setTimeout(r, 150));
    }
  })();
  const agent = new Agent(s.c, s.args(['--max-rate', '6M', '--crash-interval', '15s']));
  t.teardown(() => agent.stop());
  await agent.waitEvent((e) => e.event === 'cut', LONG, 'the first recovery point');
  await page.waitForFunction((id) => document.querySelector(`tr[data-disk="${id}/d0"] .badge`)?.textContent === 'protected', s.agentId, { timeout: LONG });
  // the watcher's own observation of it too (it polls every 150 ms)
  const until = Date.now() + 30_000;
  while (!seen.some((r) => r.label === 'protected') && Date.now() < until) await new Promise((r) => setTimeout(r, 100));
  watching = false;
  await watcher;
  const syncing = seen.filter((r) => r.state === 'initial-sync');
  t.ok(syncing.length > 0, `the overview showed the disk in initial sync (${syncing.length} observations)`);
  const progressed = syncing.filter((r) => r.progress !== null && r.progress > 0 && r.progress < 1000);
  t.ok(progressed.length > 0, `with its progress (${[...new Set(progressed.map((r) => r.progress))].slice(0, 8).join(', ')} ‰)`);
  t.ok(new Set(progressed.map((r) => r.progress)).size >= 2, 'the progress moved without a reload (live updates)');
  const firstProtected = seen.findIndex((r) => r.label === 'protected');
  t.ok(firstProtected > seen.findIndex((r) => r.state === 'initial-sync'), 'then protected, on the same page');
  t.equal(await page.evaluate(() => performance.getEntriesByType('navigation').length), 1, 'the page was never reloaded');
  await screenshot(page, 'overview-protected');

  // a little churn for the charts
  sh('dd', ['if=/dev/urandom', `of=${s.mnt}/churn`, 'bs=1M', 'count=24', 'status=none']);
  sh('sync', []);
  await agent.cut('crash');

  // --- charts on the disk page: the API's points
  await page.goto(`${base()}/console/disk/${s.agentId}/d0`);
  await page.waitForFunction(() => Number((document.getElementById('charts') as HTMLElement).dataset.samples ?? 0) >= 15, undefined, { timeout: LONG });
  const chart = await chartState(page);
  const hist = await apiGet<{ series: { agent: string; disk: string; samples: HistorySample[] }[] }>(server, `/v1/history?agent=${s.agentId}&disk=d0&range=1h`);
  t.equal(chart.range, '1h');
  checkChartsMatch(t, chart, hist.series[0].samples, 'disk page, 1 h');
  t.ok(chart.ys.rpo.some((v) => v !== null && v > 0), 'the RPO chart has values');
  t.ok(chart.ys.churn.some((v) => v !== null && v > 0), 'the churn chart has values');
  await screenshot(page, 'disk-charts-1h');
  await page.click('#ranges button[data-range="24h"]');
  await page.waitForFunction(() => (window as unknown as { mobilityCharts?: { range: string } }).mobilityCharts?.range === '24h', undefined, { timeout: LONG });
  t.ok((await chartState(page)).xs.length >= chart.xs.length - 1, 'the 24 h range shows the same samples (the server is younger than an hour)');

  // --- test failover from the machine page, then its cleanup
  await page.goto(`${base()}/console/machine/${s.agentId}`);
  await page.waitForFunction(() => (document.querySelector('svg.timeline') !== null), undefined, { timeout: LONG });
  const pts = await apiGet<{ points: { id: string; kind: string }[] }>(server, `/v1/points?agent=${s.agentId}`);
  const timelineTicks = await page.locator('svg.timeline line.crash, svg.timeline line.app').count();
  t.equal(timelineTicks, pts.points.length, `the recovery point timeline shows all ${pts.points.length} points`);
  await clearFlash(page);
  await page.click('#test-failover');
  const flash = await outcome(page);
  t.match(flash, /^Test failover of \S+ ready/, 'the page reports the images ready');
  const pointId = /Test failover of (\S+) ready/.exec(flash)?.[1] ?? '?';
  t.equal(pointId, pts.points[pts.points.length - 1].id, `the latest point (${pointId}) was materialised`);
  await page.waitForSelector(`tr[data-image="${pointId}/d0"]`, { timeout: LONG });
  const imgPath = (await page.textContent(`tr[data-image="${pointId}/d0"] td.mono`))!.trim();
  t.ok(fs.existsSync(imgPath), `the image exists on the server: ${imgPath}`);
  const fsck = await shAsync('e2fsck', ['-fn', imgPath]);
  t.equal(fsck.code, 0, `the test-failover image is fsck-clean ${fsck.code ? fsck.stdout.slice(-800) : ''}`);
  await page.waitForSelector('tr[data-kind="test-failover"][data-state="succeeded"]', { timeout: LONG });
  await screenshot(page, 'machine-test-failover');
  await clearFlash(page);
  await page.click(`tr[data-image="${pointId}/d0"] button`);
  t.match(await outcome(page), /cleaned up/, 'the page reports the cleanup');
  await page.waitForFunction((p) => document.querySelector(`tr[data-image="${p}/d0"]`) === null, pointId, { timeout: LONG });
  t.notOk(fs.existsSync(imgPath), 'the cleanup removed the image');
  await page.waitForSelector('tr[data-kind="test-failover-cleanup"][data-state="succeeded"]', { timeout: LONG });
  await screenshot(page, 'machine-cleaned-up');

  // --- a policy changed from the Policies page, as the API sees it
  await page.goto(`${base()}/console/policies`);
  await page.fill('form[data-action="/v1/policies"] input[name=name]', 'gold');
  await page.fill('form[data-action="/v1/policies"] input[name=rpoThresholdMs]', '120');
  await page.selectOption('form[data-action="/v1/policies"] select[name=compressMode]', 'always');
  await clearFlash(page);
  await page.click('form[data-action="/v1/policies"] button[type=submit]');
  t.equal(await outcome(page), 'Policy gold saved.', 'the page reports the policy saved');
  const gold = (await apiGet<{ policies: { name: string; rpoThresholdMs: number; compressMode: string }[] }>(server, '/v1/policies')).policies.find((p) => p.name === 'gold');
  t.same(gold && [gold.rpoThresholdMs, gold.compressMode], [120_000, 'always'], 'the API has it, with the values given on the page');

  // --- CSRF: the session cookie alone does not make an action
  const sessionCookie = `__Host-mobility-session=${cookie!.value}`;
  const csrf = await page.getAttribute('meta[name="csrf-token"]', 'content');
  t.ok(csrf && csrf.length >= 32, 'the page carries the session\'s CSRF token');
  const body = JSON.stringify({ name: 'csrf-probe', rpoThresholdMs: 60_000 });
  const noToken = await request(server, 'POST', '/console/api/v1/policies', { headers: { cookie: sessionCookie, 'content-type': 'application/json' }, body });
  t.equal(noToken.status, 403, 'an action without the CSRF token is refused (403)');
  t.equal((JSON.parse(noToken.body) as { code: string }).code, 'MOB_ERR_CSRF');
  const wrongToken = await request(server, 'POST', '/console/api/v1/policies', { headers: { cookie: sessionCookie, 'x-csrf-token': 'x'.repeat(43), 'content-type': 'application/json' }, body });
  t.equal(wrongToken.status, 403, 'a wrong token too');
  const foreign = await request(server, 'POST', '/console/api/v1/policies', { headers: { cookie: sessionCookie, 'x-csrf-token': csrf!, origin: 'https://evil.example', 'content-type': 'application/json' }, body });
  t.equal(foreign.status, 403, 'the right token from another origin too');
  const noSession = await request(server, 'POST', '/console/api/v1/policies', { headers: { 'x-csrf-token': csrf!, 'content-type': 'application/json' }, body });
  t.equal(noSession.status, 401, 'and the token without the session');
  t.equal((JSON.parse(noSession.body) as { code: string }).code, 'MOB_ERR_SESSION');
  const policies = await apiGet<{ policies: { name: string }[] }>(server, '/v1/policies');
  t.notOk(policies.policies.some((p) => p.name === 'csrf-probe'), 'none of them changed anything');
  const withToken = await request(server, 'POST', '/console/api/v1/policies', { headers: { cookie: sessionCookie, 'x-csrf-token': csrf!, 'content-type': 'application/json' }, body });
  t.equal(withToken.status, 200, `with the session and its token the same action is done ${withToken.body.slice(0, 200)}`);

  // an action the API refuses is answered with its code, shown as a failed job and audited
  const unknown = await request(server, 'POST', '/console/api/v1/enable', { headers: { cookie: sessionCookie, 'x-csrf-token': csrf!, 'content-type': 'application/json' }, body: JSON.stringify({ machine: 'no-such-machine', disk: '/dev/sdz' }) });
  t.equal(unknown.status, 404, 'enable of an unknown machine: 404');
  t.equal((JSON.parse(unknown.body) as { code: string }).code, 'MOB_ERR_UNKNOWN_MACHINE');
  // bad input to the console itself: coded, never internal
  const bearer = `Bearer ${(await fsp.readFile(server.info.tokenFile, 'utf8')).trim()}`;
  for (const [method, p, headers, b, status, code] of [
    ['GET', '/console/api/v1/status', { authorization: bearer }, undefined, 401, 'MOB_ERR_SESSION'],
    ['POST', '/console/api/v1/tokens', { cookie: sessionCookie, 'x-csrf-token': csrf! }, '{}', 400, 'MOB_ERR_USAGE'],
    ['POST', '/console/api/v1/policies', { cookie: sessionCookie, 'x-csrf-token': csrf! }, '{not json', 400, 'MOB_ERR_USAGE'],
    ['POST', '/console/api/v1/policies', { cookie: sessionCookie, 'x-csrf-token': csrf! }, 'x'.repeat(70_000), 400, 'MOB_ERR_USAGE'],
    ['GET', '/console/live?page=nothing', { cookie: sessionCookie }, undefined, 400, 'MOB_ERR_USAGE'],
    ['GET', '/console/assets/nothing.js', {}, undefined, 400, 'MOB_ERR_USAGE'],
    ['POST', '/console/login', {}, 'name=' + 'x'.repeat(9000), 400, 'MOB_ERR_USAGE'],
  ] as [string, string, Record<string, string>, string | undefined, number, string][]) {
    const r = await request(server, method, p, { headers, body: b });
    t.equal(r.status, status, `${method} ${p.slice(0, 40)}: ${status}`);
    t.equal((JSON.parse(r.body) as { code: string }).code, code, `with ${code}`);
  }
  const legacyApi = await request(server, 'GET', '/v1/status', { headers: { authorization: bearer } });
  t.equal(legacyApi.status, 200, 'the JSON API with the bearer token works as before');

  // --- the audit page lists who did what
  await page.goto(`${base()}/console/audit`);
  const audit = await page.$$eval('#audit tr[data-action]', (rows) => rows.map((r) => `${(r as HTMLElement).dataset.action} ${(r as HTMLElement).dataset.result} ${r.children[1].textContent}`));
  for (const want of ['login MOB_ERR_AUTH alice', 'login ok alice', 'test-failover ok alice', 'test-failover-cleanup ok alice', 'policy-save MOB_ERR_CSRF alice', 'policy-save ok alice',
    'enable MOB_ERR_UNKNOWN_MACHINE alice', 'policy-save ok alice']) {
    t.ok(audit.includes(want), `audited: ${want}`);
  }
  await screenshot(page, 'audit');

  // --- restart the server: the charts still show the last hour
  await page.goto(`${base()}/console/disk/${s.agentId}/d0`);
  await page.waitForFunction(() => Number((document.getElementById('charts') as HTMLElement).dataset.samples ?? 0) >= 15, undefined, { timeout: LONG });
  const before = await chartState(page);
  const port = server.info.port;
  const restartAt = Date.now();
  await stopGently(server.child);
  server = await startServer(t, server.info.dataDir, { port });
  await page.goto(`${base()}/console/disk/${s.agentId}/d0`);
  t.match(page.url(), /\/console\/disk\//, 'the session survived the restart (kept server-side in the database)');
  await page.waitForFunction(() => Number((document.getElementById('charts') as HTMLElement).dataset.loads ?? 0) >= 1, undefined, { timeout: LONG });
  const after = await chartState(page);
  const kept = before.xs.slice(0, -1);
  t.ok(kept.length >= 15, `${kept.length} samples were drawn before the restart`);
  t.same(after.xs.slice(0, kept.length), kept, 'after the restart the charts show every sample of before it');
  t.ok(after.xs.filter((x) => x * 1000 < restartAt).length >= kept.length, 'all from before the restart');
  const histAfter = await apiGet<{ series: { samples: HistorySample[] }[] }>(server, `/v1/history?agent=${s.agentId}&disk=d0&range=1h`);
  checkChartsMatch(t, after, histAfter.series[0].samples, 'after the restart');
  await screenshot(page, 'disk-charts-after-restart');

  // --- logout ends the session
  await Promise.all([page.waitForNavigation(), page.click('form.logout button')]);
  t.match(page.url(), /\/console\/login$/, 'logged out');
  const stale = await request(server, 'GET', '/console/api/v1/status', { headers: { cookie: sessionCookie } });
  t.equal(stale.status, 401, 'the old session cookie no longer works');
  await agent.stop();
});
