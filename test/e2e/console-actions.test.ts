/**
 * The console's actions on a registered machine, in a real headless Chromium: a real
 * `mobility server`, `mobility register` (passphrase) and `mobility agent` (the daemon) with a
 * loop device. From the machine page: enable protection of the disk (it reaches the agent over
 * its control connection and syncs), assign a policy, take a recovery point now, and disable
 * the disk (after the page's confirmation); each checked through the JSON API and the server's
 * files, and each in the audit log.
 *
 * Needs root, chromium, losetup and tracefs: a missing one fails the test.
 */
import t from 'tap';
import { execFileSync, spawn } from 'node:child_process';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { CLI_PATH } from '../../src/server/spawn.js';
import { apiGet, clearFlash, consoleUrl, launchBrowser, LONG, login, outcome, screenshots } from '../console-harness.js';
import { cleanup, runCli, startServer, stopGently, tmpDir, traceInstancesOf, waitFor } from '../helpers.js';

const sh = (cmd: string, args: string[]) => execFileSync(cmd, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });

interface StatusDisk { agent: string; disk: string; state: string; points: number }

t.test('console actions on a registered machine: enable, policy, cut, disable', async (t) => {
  const work = await tmpDir(t, 'console-actions-');
  const c = cleanup(t);
  const server = await startServer(t, path.join(work, 'srv'));
  const cli = (args: string[]) => runCli(args).done;
  const screenshot = await screenshots(t, 'console-actions');

  // a registered agent daemon
  const midFile = path.join(work, 'machine-id');
  await fsp.writeFile(midFile, 'cd'.repeat(16) + '\n');
  const stateDir = path.join(work, 'agent-state');
  const config = path.join(work, 'agent.json');
  await fsp.writeFile(config, JSON.stringify({ server: server.info.url, stateDir, logFile: path.join(work, 'agent.log'), machineIdFile: midFile, inventoryIntervalMs: 60_000 }));
  const reg = await cli(['register', '--config', config, '--passphrase-file', path.join(server.info.dataDir, 'passphrase'), '--json']);
  t.equal(reg.code, 0, reg.stderr);
  const agentId = (JSON.parse(reg.stdout) as { agentId: string }).agentId;
  c.traceInstances(agentId);
  const img = path.join(work, 'disk.img');
  sh('truncate', ['-s', '64M', img]);
  sh('dd', ['if=/dev/urandom', `of=${img}`, 'bs=1M', 'count=8', 'conv=notrunc', 'status=none']);
  const loop = sh('losetup', ['--find', '--show', img]).trim();
  c.loop(loop);
  const agent = spawn(process.execPath, [CLI_PATH, 'agent', '--config', config, '--json-logs'], { stdio: ['ignore', 'ignore', 'pipe'] });
  let err = '';
  agent.stderr!.on('data', (d: Buffer) => { err = (err + d.toString()).slice(-400_000); });
  c.process(agent);
  t.teardown(() => stopGently(agent));
  await waitFor(() => err.includes('"control connected"'), LONG, 'the agent\'s control connection');

  const pw = path.join(work, 'pw');
  await fsp.writeFile(pw, 'operator password 9\n', { mode: 0o600 });
  t.equal((await cli(['operator', 'add', 'bob', '--data-dir', server.info.dataDir, '--password-file', pw])).code, 0, 'operator bob added');
  const fast = await cli(['policy', 'create', 'fast', '--data-dir', server.info.dataDir, '--server', server.info.url, '--rpo', '1m', '--crash-interval', '15s', '--app-interval', '0']);
  t.equal(fast.code, 0, fast.stderr);

  const { page } = await launchBrowser(t, c);
  await login(page, server, 'bob', 'operator password 9');
  await page.goto(`${consoleUrl(server)}/console/machine/${agentId}`);
  t.match((await page.textContent('p.facts-line')) ?? '', /connected/, 'the machine page shows the registered machine connected');

  // enable from the page
  await page.fill('form[data-action="/v1/enable"] input[name=disk]', loop);
  await page.fill('form[data-action="/v1/enable"] input[name=diskId]', 'd1');
  await clearFlash(page);
  await page.click('form[data-action="/v1/enable"] button[type=submit]');
  t.equal(await outcome(page), `Protection enabled: ${agentId}/d1 (policy default)`, 'the page reports the disk enabled');
  const machines = await apiGet<{ machines: { agentId: string; policy: string; disks: { diskId: string; device: string }[] }[] }>(server, '/v1/machines');
  t.same(machines.machines.find((m) => m.agentId === agentId)?.disks.map((d) => [d.diskId, d.device]), [['d1', loop]], 'the API lists the enabled disk');
  await page.waitForSelector('tr[data-disk$="/d1"][data-state="continuous"]', { timeout: LONG });
  t.pass('the disk reached continuous protection, shown live on the page');

  // assign a policy from the page
  await page.selectOption('form[data-action="/v1/policies/assign"] select[name=policy]', 'fast');
  await clearFlash(page);
  await page.click('form[data-action="/v1/policies/assign"] button[type=submit]');
  t.equal(await outcome(page), `Policy fast assigned to ${agentId}.`);
  t.equal((await apiGet<{ machines: { agentId: string; policy: string }[] }>(server, '/v1/machines')).machines.find((m) => m.agentId === agentId)?.policy, 'fast', 'the API has the machine under fast');
  await waitFor(() => /"message":"protecting".*"policy":"fast"/.test(err), LONG, 'the agent protecting under policy fast');
  t.pass('the agent got the policy over its control connection');

  // a recovery point now
  await page.goto(`${consoleUrl(server)}/console/machine/${agentId}`);
  await page.waitForSelector('tr[data-disk$="/d1"][data-state="continuous"]', { timeout: LONG });
  await clearFlash(page);
  await page.click('form[data-action="/v1/cut"] button[type=submit]');
  const cutMsg = await outcome(page);
  t.match(cutMsg, /^Recovery point \S+ \(crash\) recorded\.$/, `the page reports the point: ${cutMsg}`);
  const pointId = /Recovery point (\S+)/.exec(cutMsg)?.[1];
  const pts = await apiGet<{ points: { id: string }[] }>(server, `/v1/points?agent=${agentId}`);
  t.ok(pts.points.some((p) => p.id === pointId), `the API lists ${pointId}`);
  await page.waitForSelector('svg.timeline line.crash', { state: 'attached', timeout: LONG }); // a vertical line has no width: never "visible"
  await screenshot(page, 'machine-protected');

  // disable from the disks table (the page asks; the test accepts)
  await clearFlash(page);
  await page.click('tr[data-disk$="/d1"] button[data-action="/v1/disable"]');
  t.equal(await outcome(page), `Protection disabled: ${agentId}/d1, replica removed`, 'the page reports the disk disabled');
  t.notOk(fs.existsSync(path.join(server.info.dataDir, 'replicas', agentId, 'd1')), 'the replica is gone from the server');
  const st = await apiGet<{ disks: StatusDisk[] }>(server, '/v1/status');
  t.notOk(st.disks.some((d) => d.agent === agentId), 'status no longer lists the disk');
  await waitFor(() => traceInstancesOf(agentId).length === 0, LONG, 'the agent dropped its tracking');
  await page.waitForFunction(() => document.querySelector('tr[data-disk$="/d1"]') === null, undefined, { timeout: LONG });
  await screenshot(page, 'machine-disabled');

  await page.goto(`${consoleUrl(server)}/console/audit`);
  const audit = await page.$$eval('#audit tr[data-action]', (rows) => rows.map((r) => `${(r as HTMLElement).dataset.action} ${(r as HTMLElement).dataset.result} ${r.children[1].textContent}`));
  for (const want of ['login ok bob', 'enable ok bob', 'policy-assign ok bob', 'cut ok bob', 'disable ok bob']) t.ok(audit.includes(want), `audited: ${want}`);
  await page.goto(`${consoleUrl(server)}/console/jobs`);
  t.equal(await page.locator('tr[data-state="succeeded"]').count(), 4, 'the Jobs page lists the four actions, succeeded');
  await screenshot(page, 'jobs');
});
