/**
 * On-demand cuts of a managed agent and the confirmation of destructive commands, with
 * real processes: `mobility server`, a registered `mobility agent` protecting ext4 on a
 * loop device, and the CLI.
 *
 * - SIGUSR2 to the daemon gives a crash-consistent point; the daemon keeps running
 * - `mobility cut --kind app` prints a point id that `mobility points` lists; the default
 *   (crash) prints the bare id; coded failures: unknown machine, nothing protected, a
 *   pre-freeze hook failure (MOB_ERR_HOOK), a freeze past its bound (MOB_ERR_FREEZE),
 *   agent offline
 * - `mobility disable` without --yes and without a terminal refuses and deletes nothing; on
 *   a terminal (a pty from `script`) it shows the plan and a "no" deletes nothing; with --yes
 *   it deletes the replica, the points and the test-failover image
 *
 * Needs root, losetup, mkfs.ext4, mount, fsfreeze, script and tracefs: a missing one fails the test.
 */
import t from 'tap';
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { CLI_PATH, spawnServer, stopServer } from '../../src/server/spawn.js';
import { runCli, tmpDir, waitFor } from '../helpers.js';

const sh = (cmd: string, args: string[]) => execFileSync(cmd, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
const TRACEFS = '/sys/kernel/tracing';

interface Point { id: string; kind: string; takenAt: string; note: string }

t.test('managed agent: SIGUSR2 and mobility cut make points; disable asks before deleting', async (t) => {
  if (process.getuid?.() !== 0) throw new Error('this test needs root (loop devices, tracefs, fsfreeze)');
  for (const tool of ['losetup', 'mkfs.ext4', 'mount', 'umount', 'fsfreeze', 'script']) {
    try { sh('sh', ['-c', `command -v ${tool}`]); } catch { throw new Error(`${tool} is required for this test`); }
  }
  if (!fs.existsSync(path.join(TRACEFS, 'instances'))) throw new Error(`tracefs is required (${TRACEFS}/instances)`);

  const work = await tmpDir(t, 'mobility-cut-');
  const server = await spawnServer(path.join(work, 'srv'));
  t.teardown(() => stopServer(server));
  const dataDir = server.info.dataDir;
  const conn = ['--server', server.info.url, '--data-dir', dataDir];
  const ops = ['--server', server.info.url, '--token-file', server.info.tokenFile, '--ca', server.info.caFile!];
  const cli = (args: string[]) => runCli(args).done;

  // a unique agent id (claimed at registration): its trace instance cannot collide with another test's
  const agentId = `cut-${process.pid}-${crypto.randomBytes(3).toString('hex')}`;
  const stateDir = path.join(work, 'agent-state');
  await fsp.mkdir(stateDir, { recursive: true, mode: 0o700 });
  await fsp.writeFile(path.join(stateDir, 'identity.json'), JSON.stringify({ agentId }));
  const midFile = path.join(work, 'machine-id');
  await fsp.writeFile(midFile, crypto.randomBytes(16).toString('hex') + '\n');
  // hooks that fail on demand: a pre-freeze failure downgrades an app cut, a frozen hook that
  // outlives the 10 s freeze bound fails the cut (exec: the timeout's SIGKILL ends it at once)
  const hooks = path.join(work, 'hooks');
  await fsp.mkdir(path.join(hooks, 'pre-freeze'), { recursive: true });
  await fsp.mkdir(path.join(hooks, 'frozen'), { recursive: true });
  await fsp.writeFile(path.join(hooks, 'pre-freeze', '10-maybe-fail'), `#!/bin/sh\n[ -e '${work}/fail-pre' ] && { echo refusing; exit 1; }\nexit 0\n`, { mode: 0o755 });
  await fsp.writeFile(path.join(hooks, 'frozen', '10-maybe-stall'), `#!/bin/sh\n[ -e '${work}/stall' ] && exec sleep 30\nexit 0\n`, { mode: 0o755 });
  const config = path.join(work, 'agent.json');
  const logFile = path.join(work, 'agent.log');
  await fsp.writeFile(config, JSON.stringify({ server: server.info.url, stateDir, logFile, machineIdFile: midFile, hooksDir: hooks, inventoryIntervalMs: 60_000 }));
  const reg = await cli(['register', '--config', config, '--passphrase-file', path.join(dataDir, 'passphrase'), '--json']);
  t.equal(reg.code, 0, reg.stderr);
  t.equal((JSON.parse(reg.stdout) as { agentId: string }).agentId, agentId, 'registered under the claimed id');

  // coded failures before anything is protected
  const unknown = await cli(['cut', ...conn, '--machine', 'no-such-machine']);
  t.equal(unknown.code, 3, 'unknown machine -> exit 3');
  t.match(unknown.stderr, /MOB_ERR_UNKNOWN_MACHINE/);
  const nothing = await cli(['cut', ...conn, '--machine', agentId]);
  t.equal(nothing.code, 3, 'no disk enabled -> exit 3');
  t.match(nothing.stderr, /MOB_ERR_NOT_PROTECTING/);
  const badKind = await cli(['cut', ...conn, '--machine', agentId, '--kind', 'full']);
  t.equal(badKind.code, 2, 'bad --kind -> usage');

  // ext4 on a loop device, mounted (cuts freeze it)
  const img = path.join(work, 'disk.img');
  sh('truncate', ['-s', '64M', img]);
  const loop = sh('losetup', ['--find', '--show', img]).trim();
  const mnt = path.join(work, 'mnt');
  await fsp.mkdir(mnt);
  sh('mkfs.ext4', ['-q', '-F', loop]);
  sh('mount', [loop, mnt]);
  sh('dd', ['if=/dev/urandom', `of=${mnt}/seed`, 'bs=64k', 'count=32', 'status=none']);
  sh('sync', []);

  // the agent's trace instance: mobility-<agent id>, or mobility-<agent id>-<digest> (per installation)
  const instances = () => fs.readdirSync(path.join(TRACEFS, 'instances')).filter((n) => n === `mobility-${agentId}` || n.startsWith(`mobility-${agentId}-`));
  let agent: ChildProcess | null = null;
  let err = '';
  const startAgent = async () => {
    const a = spawn(process.execPath, [CLI_PATH, 'agent', '--config', config, '--json-logs'], { stdio: ['ignore', 'ignore', 'pipe'] });
    agent = a;
    err = '';
    a.stderr!.on('data', (d: Buffer) => { err = (err + d.toString()).slice(-400_000); });
    await waitFor(() => err.includes('"control connected"') || a.exitCode !== null, 20_000, 'control connection');
    if (a.exitCode !== null) throw new Error(`agent exited with ${a.exitCode}: ${err.slice(-3000)}`);
    return a;
  };
  const stopAgent = async (): Promise<number | null> => {
    const a = agent;
    if (!a || a.exitCode !== null || a.signalCode !== null) return a?.exitCode ?? null;
    const exited = new Promise<number | null>((r) => a.once('exit', (c) => r(c)));
    a.kill('SIGTERM');
    return exited;
  };
  t.teardown(async () => {
    const a = agent;
    if (a && a.exitCode === null && a.signalCode === null) {
      const exited = new Promise((r) => a.once('exit', r));
      a.kill('SIGKILL');
      await exited;
    }
    try { sh('fsfreeze', ['-u', mnt]); } catch { /* not frozen */ }
    try { sh('umount', ['-l', mnt]); } catch { /* gone */ }
    try { sh('losetup', ['-d', loop]); } catch { /* gone */ }
    for (const n of instances()) {
      const inst = path.join(TRACEFS, 'instances', n);
      try { fs.writeFileSync(path.join(inst, 'events/block/block_rq_complete/enable'), '0'); } catch { /* gone */ }
      try { fs.rmdirSync(inst); } catch { /* gone */ }
    }
  });

  const points = async (): Promise<Point[]> => {
    const r = await cli(['points', ...ops, '--agent-id', agentId, '--json']);
    if (r.code !== 0) throw new Error(`points failed: ${r.stderr}`);
    return (JSON.parse(r.stdout) as { points: Point[] }).points;
  };
  /** The catalog as written (cheap to poll; mobility points is what the assertions use). */
  const catalog = (): Point[] => {
    try { return (JSON.parse(fs.readFileSync(path.join(dataDir, 'replicas', agentId, 'points.json'), 'utf8')) as { points: Point[] }).points; } catch { return []; }
  };
  const diskEnabled = async () => {
    const m = JSON.parse((await cli(['machines', ...conn, '--json'])).stdout) as { machines: { agentId: string; disks: { diskId: string }[] }[] };
    return m.machines.find((x) => x.agentId === agentId)?.disks.map((d) => d.diskId) ?? [];
  };

  const a1 = await startAgent();
  const p = await cli(['policy', 'create', 'ondemand', ...conn, '--rpo', '1h', '--crash-interval', '1h', '--app-interval', '2h']);
  t.equal(p.code, 0, p.stderr);
  // enabled, but the agent's assignments are not applied yet: the agent may say "not protecting" at once
  const en = await cli(['enable', ...conn, '--machine', agentId, '--disk', loop, '--disk-id', 'd1', '--policy', 'ondemand']);
  t.equal(en.code, 0, en.stderr);
  // the first point after the initial sync is app-consistent (scheduled)
  await waitFor(() => catalog().length >= 1, 60_000, 'the first recovery point');
  const first = await points();
  t.same(instances().map((n) => (n.endsWith('.shadow') ? 'shadow' : 'instance')).sort(), ['instance', 'shadow'], 'the agent traces the disk in its own instance (and its shadow)');

  // SIGUSR2: a crash-consistent point now, and the daemon lives on (it used to die of it)
  a1.kill('SIGUSR2');
  await waitFor(() => catalog().some((x) => !first.some((f) => f.id === x.id) && x.kind === 'crash'), 30_000, 'a crash point after SIGUSR2');
  t.ok((await points()).some((x) => !first.some((f) => f.id === x.id) && x.kind === 'crash'), 'mobility points lists the SIGUSR2 point');
  t.equal(a1.exitCode, null, 'the daemon is still running after SIGUSR2');
  t.equal(a1.signalCode, null);
  t.match(err, /"message":"cut requested".*"source":"SIGUSR2"|"source":"SIGUSR2".*"message":"cut requested"/, 'the daemon logged the signal cut');

  // mobility cut --kind app: the id of a new app-consistent point, listed by mobility points
  const before = await points();
  const app = await cli(['cut', ...conn, '--machine', agentId, '--kind', 'app', '--json']);
  t.equal(app.code, 0, app.stderr);
  const appJ = JSON.parse(app.stdout) as { agentId: string; kind: string; point: Point; requestedAt: string };
  t.equal(appJ.agentId, agentId);
  t.equal(appJ.point.kind, 'app', 'an app-consistent point');
  t.notOk(before.some((x) => x.id === appJ.point.id), 'a new point');
  t.ok(Date.parse(appJ.point.takenAt) >= Date.parse(appJ.requestedAt), 'frozen after the request');
  t.ok((await points()).some((x) => x.id === appJ.point.id && x.kind === 'app'), 'mobility points lists it');

  // the default kind is crash; stdout is the bare id
  const crash = await cli(['cut', ...conn, '--machine', agentId, '--timeout', '60s']);
  t.equal(crash.code, 0, crash.stderr);
  t.match(crash.stdout, /^rp-\d+\n$/, 'prints the point id alone');
  const crashId = crash.stdout.trim();
  t.ok((await points()).some((x) => x.id === crashId), 'mobility points lists the crash point');
  t.match(crash.stderr, /crash-consistent|app-consistent/);

  // a failing pre-freeze hook downgrades an app cut: reported, not passed off as app-consistent
  await fsp.writeFile(path.join(work, 'fail-pre'), '');
  const downgraded = await cli(['cut', ...conn, '--machine', agentId, '--kind', 'app']);
  await fsp.rm(path.join(work, 'fail-pre'));
  t.equal(downgraded.code, 1, 'downgraded app cut -> exit 1');
  t.match(downgraded.stderr, /MOB_ERR_HOOK: .*crash-consistent point rp-\d+/);
  t.equal(downgraded.stdout, '', 'no point id on stdout');

  // a frozen hook outlives the freeze bound: the cut fails with its code
  await fsp.writeFile(path.join(work, 'stall'), '');
  const t0 = Date.now();
  const stalled = await cli(['cut', ...conn, '--machine', agentId, '--timeout', '60s']);
  await fsp.rm(path.join(work, 'stall'));
  t.equal(stalled.code, 1, `failed cut -> exit 1 (${stalled.stderr.trim()})`);
  t.match(stalled.stderr, /MOB_ERR_FREEZE|MOB_ERR_CUT/, 'the cut failure is coded');
  t.ok(Date.now() - t0 < 40_000, 'answered when the cut failed, not at the timeout');
  t.equal(a1.exitCode, null, 'the daemon survived the failed cut');

  // offline
  t.equal(await stopAgent(), 0, 'SIGTERM: clean exit');
  const offline = await cli(['cut', ...conn, '--machine', agentId]);
  t.equal(offline.code, 5, 'agent offline -> exit 5');
  t.match(offline.stderr, /MOB_ERR_AGENT_OFFLINE/);

  // disable asks: a test-failover image first, so there is one to list
  const a2 = await startAgent();
  const tf = await cli(['test-failover', ...ops, '--agent-id', agentId, '--point', appJ.point.id]);
  t.equal(tf.code, 0, tf.stderr);
  const image = path.join(dataDir, 'test-failover', agentId, appJ.point.id, 'd1.img');
  t.ok(fs.existsSync(image), 'test-failover image made');
  const replicaDir = path.join(dataDir, 'replicas', agentId);
  const nPoints = (await points()).length;

  const refused = await cli(['disable', ...conn, '--machine', agentId, '--disk', 'd1']);
  t.equal(refused.code, 2, 'no terminal, no --yes -> usage error');
  t.match(refused.stderr, /MOB_ERR_USAGE: .*--yes/);
  t.match(refused.stderr, /replica of disk d1: 64\.0 MiB/, 'the plan names the replica and its size');
  t.match(refused.stderr, new RegExp(`${nPoints} recovery point\\(s\\)`), 'the plan counts the points');
  t.match(refused.stderr, new RegExp(`test-failover image of ${appJ.point.id}, disk d1: ${image.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}`), 'the plan lists the image');
  t.ok(fs.existsSync(path.join(replicaDir, 'd1', 'replica.img')), 'replica kept');
  t.equal((await points()).length, nPoints, 'points kept');
  t.ok(fs.existsSync(image), 'image kept');
  t.same(await diskEnabled(), ['d1'], 'still enabled');

  // on a terminal it asks; anything but "yes" changes nothing
  const q = (s: string) => `'${s.replace(/'/g, `'\\''`)}'`;
  const tty = await new Promise<{ code: number | null; out: string }>((resolve) => {
    const c = spawn('script', ['-qec', [process.execPath, CLI_PATH, 'disable', ...conn, '--machine', agentId, '--disk', 'd1'].map(q).join(' '), '/dev/null'], { stdio: ['pipe', 'pipe', 'pipe'] });
    let out = '';
    c.stdout.on('data', (d: Buffer) => { out += d.toString(); });
    c.stderr.on('data', (d: Buffer) => { out += d.toString(); });
    c.once('close', (code) => resolve({ code, out }));
    c.stdin.end('no\n');
  });
  t.equal(tty.code, 2, `declined on a terminal -> exit 2: ${tty.out}`);
  t.match(tty.out, /type "yes" to go ahead/, 'it asked');
  t.match(tty.out, /replica of disk d1/, 'after showing the plan');
  t.match(tty.out, /not confirmed \(nothing was changed\)/);
  t.ok(fs.existsSync(path.join(replicaDir, 'd1', 'replica.img')), 'replica kept');
  t.ok(fs.existsSync(image), 'image kept');
  t.same(await diskEnabled(), ['d1'], 'still enabled');

  const yes = await cli(['disable', ...conn, '--machine', agentId, '--disk', 'd1', '--yes', '--json']);
  t.equal(yes.code, 0, yes.stderr);
  const removed = (JSON.parse(yes.stdout) as { removed: { lastDisk: boolean; points: number; testFailoverImages: { path: string }[] } }).removed;
  t.equal(removed.lastDisk, true);
  t.ok(removed.points >= nPoints, 'every point deleted');
  t.same(removed.testFailoverImages.map((i) => i.path), [image], 'the image deleted with it');
  t.notOk(fs.existsSync(replicaDir), 'replicas and points deleted');
  t.notOk(fs.existsSync(path.join(dataDir, 'test-failover', agentId)), 'test-failover images deleted');
  t.same(await diskEnabled(), [], 'disabled');
  await waitFor(() => instances().length === 0, 20_000, 'trace instance removed by the agent');
  const none = await cli(['cut', ...conn, '--machine', agentId]);
  t.match(none.stderr, /MOB_ERR_NOT_PROTECTING/, 'nothing left to cut');
  // SIGUSR1 with nothing protected: logged, the daemon lives on
  a2.kill('SIGUSR1');
  await waitFor(() => err.includes('"cut requested, but no protection is running"'), 10_000, 'the ignored-cut log line');
  t.equal(await stopAgent(), 0, 'SIGTERM: clean exit');
});
