/**
 * The agent as a managed daemon, with real processes: `mobility server`,
 * `mobility register` (passphrase), `mobility agent` with a config file, a loop
 * device. Assignments and policies reach the agent over its control connection
 * (pushed, no restart of the agent), SIGHUP reloads, SIGTERM drains and exits 0,
 * the JSON log file is written, disable cleans up on both sides.
 *
 * Needs root, losetup and tracefs: a missing one fails the test.
 */
import t from 'tap';
import { execFileSync, spawn } from 'node:child_process';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { EXIT } from '../../src/cli/args.js';
import { api, serverConn } from '../../src/cli/api-client.js';
import { CLI_PATH } from '../../src/server/spawn.js';
import { cleanup, runCli, startServer, stopGently, tmpDir, traceInstancesOf, waitFor } from '../helpers.js';

/** Waits are safety nets against a hang, not speed requirements (the file's limit is 300 s). */
const LONG = 120_000;

const sh = (cmd: string, args: string[]) => execFileSync(cmd, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });

t.test('agent daemon: enable, policy push, reload, disable, stop', async (t) => {
  const work = await tmpDir(t, 'daemon-');
  const c = cleanup(t);
  const server = await startServer(t, path.join(work, 'srv'));
  const conn = ['--server', server.info.url, '--data-dir', server.info.dataDir];
  const cli = (args: string[]) => runCli(args).done;

  const pass = path.join(server.info.dataDir, 'passphrase');
  t.equal(fs.statSync(pass).mode & 0o777, 0o600, 'passphrase file is 0600');
  const show = await cli(['passphrase', 'show', '--data-dir', server.info.dataDir]);
  t.equal(show.stdout.trim(), fs.readFileSync(pass, 'utf8').trim());

  const midFile = path.join(work, 'machine-id');
  await fsp.writeFile(midFile, 'ab'.repeat(16) + '\n');
  const stateDir = path.join(work, 'agent-state');
  const config = path.join(work, 'agent.json');
  const logFile = path.join(work, 'agent.log');
  await fsp.writeFile(config, JSON.stringify({ server: server.info.url, stateDir, logFile, machineIdFile: midFile, inventoryIntervalMs: 60_000 }));
  const reg = await cli(['register', '--config', config, '--passphrase-file', pass, '--json']);
  t.equal(reg.code, 0, reg.stderr);
  const agentId = (JSON.parse(reg.stdout) as { agentId: string }).agentId;
  c.traceInstances(agentId);

  // enable while the agent is not running: its preflight cannot run
  const img = path.join(work, 'disk.img');
  sh('truncate', ['-s', '64M', img]);
  sh('dd', ['if=/dev/urandom', `of=${img}`, 'bs=1M', 'count=8', 'conv=notrunc', 'status=none']);
  const loop = sh('losetup', ['--find', '--show', img]).trim();
  c.loop(loop);
  const offline = await cli(['enable', ...conn, '--machine', agentId, '--disk', loop]);
  t.equal(offline.code, 5, 'agent offline -> exit 5');
  t.match(offline.stderr, /MOB_ERR_AGENT_OFFLINE/);

  const pidFile = path.join(work, 'agent.pid');
  const agent = spawn(process.execPath, [CLI_PATH, 'agent', '--config', config, '--pid-file', pidFile, '--json-logs'], { stdio: ['ignore', 'ignore', 'pipe'] });
  let err = '';
  agent.stderr!.on('data', (d: Buffer) => { err = (err + d.toString()).slice(-400_000); });
  c.process(agent);
  const exited = new Promise<number | null>((r) => agent.once('exit', (code) => r(code)));
  t.teardown(() => stopGently(agent));
  await waitFor(() => err.includes('"control connected"'), LONG, 'control connection');
  t.equal(Number(fs.readFileSync(pidFile, 'utf8')), agent.pid, 'pid file');

  const fast = await cli(['policy', 'create', 'fast', ...conn, '--rpo', '1m', '--retention', '2h', '--crash-interval', '15s', '--app-interval', '0',
    '--freeze-limit', '5s', '--spool-budget', '64M', '--compress', 'always', '--json']);
  t.equal(fast.code, 0, fast.stderr);
  t.match(JSON.parse(fast.stdout).policy, { freezeLimitMs: 5000, spoolBudgetBytes: 64 * 1024 * 1024, compressMode: 'always', compress: true }, 'the freeze bound, the spool budget and the compress mode are policy settings');
  const badMode = await cli(['policy', 'create', 'fast', ...conn, '--compress', 'lz4']);
  t.equal(badMode.code, EXIT.USAGE, 'an unknown compress mode is a usage error');
  // the API: compressMode wins, a boolean compress is what older clients send, both must agree
  const apiConn = await serverConn({ server: server.info.url, 'data-dir': server.info.dataDir });
  const viaMode = await api(apiConn, 'POST', '/v1/policies', { name: 'modes', compressMode: 'never' });
  t.match(viaMode.policy, { compressMode: 'never', compress: false }, 'compressMode alone sets the mode');
  const viaBool = await api(apiConn, 'POST', '/v1/policies', { name: 'modes', compress: true });
  t.match(viaBool.policy, { compressMode: 'auto', compress: true }, 'an older client\'s compress true means auto');
  const postedBack = await api(apiConn, 'POST', '/v1/policies', { name: 'modes', compress: true, compressMode: 'always' });
  t.match(postedBack.policy, { compressMode: 'always' }, 'a GET body posted back (compress true, compressMode always) keeps always');
  await t.rejects(api(apiConn, 'POST', '/v1/policies', { name: 'modes', compress: false, compressMode: 'auto' }), { code: 'MOB_ERR_USAGE' }, 'a contradiction is refused');
  const en = await cli(['enable', ...conn, '--machine', agentId, '--disk', loop, '--disk-id', 'd1', '--policy', 'fast']);
  t.equal(en.code, 0, en.stderr);
  await waitFor(() => /"message":"protecting".*"policy":"fast"/.test(err), LONG, 'protection under policy fast');
  const protecting = err.split('\n').find((l) => l.includes('"message":"protecting"')) ?? '';
  t.ok(protecting.includes('"freezeLimitMs":5000') && protecting.includes('"spoolBudgetBytes":67108864') && protecting.includes('"compress":"always"'),
    `the agent protects with the policy's freeze bound, spool budget and compress mode: ${protecting}`);
  await waitFor(() => fs.existsSync(path.join(server.info.dataDir, 'replicas', agentId, 'points.json')), LONG, 'a recovery point');
  const size = fs.statSync(img).size;
  t.equal(sh('sh', ['-c', `head -c ${size} ${path.join(server.info.dataDir, 'replicas', agentId, 'd1', 'replica.img')} | sha256sum`]),
    sh('sh', ['-c', `head -c ${size} ${loop} | sha256sum`]), 'replica == disk');

  // a policy change is pushed: the agent restarts protection with it, without a restart of the process
  const slower = await cli(['policy', 'create', 'fast', ...conn, '--crash-interval', '30s']);
  t.equal(slower.code, 0, slower.stderr);
  await waitFor(() => (err.match(/"message":"protecting"/g) ?? []).length >= 2, LONG, 'protection restarted with the changed policy');
  type Status = { rpoAlertMs: number; disks: { agent: string; disk: string; rpoAlert: boolean; rpoAlertMs: number; rpoMs: number | null; progressPermille?: unknown }[] };
  const status = async () => JSON.parse((await cli(['status', '--server', server.info.url, '--token-file', server.info.tokenFile, '--ca', server.info.caFile!, '--json'])).stdout) as Status;
  const st = await status();
  const mine = st.disks.find((d) => d.agent === agentId && d.disk === 'd1');
  t.ok(mine, 'status lists the disk');
  t.ok(mine && 'progressPermille' in mine, 'status carries the scan progress');
  t.equal(st.rpoAlertMs, 15 * 60_000, 'the server-wide default threshold is still reported');
  t.equal(mine?.rpoAlertMs, 60_000, 'the disk carries the threshold that applies to it: its policy\'s');
  t.equal(mine?.rpoAlert, mine ? mine.rpoMs === null || mine.rpoMs > 60_000 : undefined, `the alert follows the policy threshold (1 min) for an RPO of ${mine?.rpoMs} ms`);
  // a loaded machine may fall behind for a while: the alert clears once a point is recent again
  await waitFor(async () => (await status()).disks.find((d) => d.agent === agentId && d.disk === 'd1')?.rpoAlert === false, LONG, 'an RPO within the policy threshold');
  t.pass('RPO within the policy threshold (1 min): no alert');

  // the alert threshold is the machine's policy, not the server-wide default
  const strict = await cli(['policy', 'create', 'fast', ...conn, '--rpo', '1s']);
  t.equal(strict.code, 0, strict.stderr);
  await waitFor(async () => {
    const s2 = JSON.parse((await cli(['status', '--server', server.info.url, '--token-file', server.info.tokenFile, '--ca', server.info.caFile!, '--json'])).stdout) as Status;
    const d1 = s2.disks.find((d) => d.agent === agentId && d.disk === 'd1');
    return d1?.rpoAlert === true && d1.rpoAlertMs === 1000;
  }, LONG, 'an RPO alert under a 1 s threshold');
  t.pass('RPO alert follows the policy threshold');

  const machines = JSON.parse((await cli(['machines', ...conn, '--json'])).stdout) as { machines: { agentId: string; policy: string; disks: { diskId: string }[]; connected: boolean }[] };
  const me = machines.machines.find((m) => m.agentId === agentId)!;
  t.equal(me.policy, 'fast');
  t.same(me.disks.map((d) => d.diskId), ['d1']);
  t.ok(me.connected);

  agent.kill('SIGHUP');
  await waitFor(() => err.includes('"configuration reloaded"'), LONG, 'reload on SIGHUP');
  t.equal(agent.exitCode, null, 'SIGHUP does not stop the agent');

  const dis = await cli(['disable', ...conn, '--machine', agentId, '--disk', 'd1', '--yes']);
  t.equal(dis.code, 0, dis.stderr);
  t.notOk(fs.existsSync(path.join(server.info.dataDir, 'replicas', agentId)), 'replica removed on the server');
  await waitFor(() => traceInstancesOf(agentId).length === 0, LONG, 'trace instance removed');
  await waitFor(() => !fs.existsSync(path.join(stateDir, 'protect', agentId)), LONG, 'agent tracking state removed');

  agent.kill('SIGTERM');
  t.equal(await exited, 0, 'SIGTERM: clean exit');
  t.notOk(fs.existsSync(pidFile), 'pid file removed');
  const lines = fs.readFileSync(logFile, 'utf8').trim().split('\n');
  t.ok(lines.length > 5, 'log file written');
  t.ok(lines.every((l) => { try { JSON.parse(l); return true; } catch { return false; } }), 'log file is JSON lines');
  t.notOk(fs.readFileSync(logFile, 'utf8').includes(fs.readFileSync(pass, 'utf8').trim()), 'no passphrase in the log');
  t.notOk(fs.readFileSync(logFile, 'utf8').includes('PRIVATE KEY'), 'no key in the log');
});
