/**
 * A recovery plan end to end: one real `mobility server`, two registered `mobility agent`
 * daemons (two machines, each with its own machine id and state) in one consistency group:
 * "db" protects a bootable disk (MBR, extlinux, ext4, a Debian cloud kernel and a busybox init,
 * test/boot-disk.ts), "app" a plain ext4 filesystem.
 *
 * The plan: step 1 brings up db (its own network mapping, a boot check under TCG), then a post
 * script; step 2 runs a pre script, then brings up app (images only). `mobility recovery-plan
 * test-failover` recovers both to the same group point: db's image boots to the marker with the
 * mapped network configuration printed by the guest, app's image is fsck-clean and holds the
 * file written before the group cut, the scripts ran between the steps in that order with the
 * plan's environment. `--cleanup` removes every image. A plan whose first step fails (its pre
 * script exits 1) stops there: its second step never runs, exit 1, the report says why. Then the
 * plan's failover (asks first; --yes) fails both machines over in order to the same group point
 * and boots db's promoted image.
 *
 * Needs root, losetup, mkfs.ext4, e2fsck, fsfreeze, qemu-system-x86_64 and tracefs: a missing one fails the test.
 */
import t from 'tap';
import crypto from 'node:crypto';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { CLI_PATH } from '../../src/server/spawn.js';
import { bootParts, buildBootDisk, MARKER } from '../boot-disk.js';
import { cleanup } from '../cleanup.js';
import { runCli, startServer, stopGently, waitFor } from '../helpers.js';
import { LONG, sh } from '../protect-harness.js';

const MAC = '52:54:00:4d:4f:02';

interface Machine { name: string; agentId: string; loop: string; mnt: string; config: string; child: import('node:child_process').ChildProcess | null; log: string }

t.test('a recovery plan: two machines at one group point, in order, scripts between, mapping and boot check, cleanup; a failing step stops the plan', async (t) => {
  if (process.getuid?.() !== 0) throw new Error('this test needs root (loop devices, tracefs, fsfreeze)');
  for (const tool of ['losetup', 'mkfs.ext4', 'e2fsck', 'fsfreeze', 'mount', 'qemu-system-x86_64']) {
    try { sh('sh', ['-c', `command -v ${tool}`]); } catch { throw new Error(`${tool} is required for this test`); }
  }
  if (!fs.existsSync('/sys/kernel/tracing/instances')) { try { sh('mount', ['-t', 'tracefs', 'tracefs', '/sys/kernel/tracing']); } catch { /* reported below */ } }
  if (!fs.existsSync('/sys/kernel/tracing/instances')) throw new Error('tracefs (/sys/kernel/tracing/instances) is required for this test');
  const parts = bootParts();
  const c = cleanup(t);
  const dir = c.dir('plan-');
  const server = await startServer(t, path.join(dir, 'srv'));
  const dataDir = server.info.dataDir;
  const conn = ['--server', server.info.url, '--data-dir', dataDir];
  const cli = (args: string[]) => runCli(args).done;

  // db: the bootable disk; app: a plain ext4 filesystem
  await fsp.mkdir(path.join(dir, 'db'));
  const boot = await buildBootDisk(c, path.join(dir, 'db'), parts);
  const appImg = path.join(dir, 'app.img');
  await fsp.writeFile(appImg, '');
  await fsp.truncate(appImg, 64 * 1024 * 1024);
  const appLoop = sh('losetup', ['--find', '--show', appImg]).trim();
  c.loop(appLoop);
  const appMnt = path.join(dir, 'mnt-app');
  await fsp.mkdir(appMnt);
  sh('mkfs.ext4', ['-q', '-F', '-E', 'lazy_itable_init=0,lazy_journal_init=0', appLoop]);
  sh('mount', ['-o', 'noatime', appLoop, appMnt]);
  c.mount(appMnt);

  const machines: Machine[] = [];
  for (const [name, loop, mnt] of [['db', boot.loop, boot.mnt], ['app', appLoop, appMnt]] as const) {
    const agentId = `plan-${name}-${process.pid}-${crypto.randomBytes(3).toString('hex')}`;
    c.traceInstances(agentId);
    const stateDir = path.join(dir, `agent-${name}`);
    await fsp.mkdir(stateDir, { recursive: true, mode: 0o700 });
    await fsp.writeFile(path.join(stateDir, 'identity.json'), JSON.stringify({ agentId }));
    const midFile = path.join(dir, `machine-id-${name}`);
    await fsp.writeFile(midFile, crypto.randomBytes(16).toString('hex') + '\n');
    const config = path.join(dir, `agent-${name}.json`);
    await fsp.writeFile(config, JSON.stringify({ server: server.info.url, stateDir, logFile: path.join(dir, `agent-${name}.log`), machineIdFile: midFile, inventoryIntervalMs: 600_000 }));
    const reg = await cli(['register', '--config', config, '--passphrase-file', path.join(dataDir, 'passphrase'), '--json']);
    t.equal(reg.code, 0, `register ${name}: ${reg.stderr}`);
    machines.push({ name, agentId, loop, mnt, config, child: null, log: '' });
  }
  const [DB, APP] = machines as [Machine, Machine];
  t.teardown(async () => {
    for (const m of machines) if (m.child && m.child.exitCode === null && m.child.signalCode === null) await stopGently(m.child, 30_000);
  });
  for (const m of machines) {
    const a = c.spawn(process.execPath, [CLI_PATH, 'agent', '--config', m.config, '--json-logs'], { stdio: ['ignore', 'ignore', 'pipe'] });
    m.child = a;
    a.stderr!.on('data', (d: Buffer) => { m.log = (m.log + d.toString()).slice(-200_000); });
    await waitFor(() => m.log.includes('"control connected"') || a.exitCode !== null, 60_000, `agent ${m.name} control connection`);
    if (a.exitCode !== null) throw new Error(`agent ${m.name} exited with ${a.exitCode}: ${m.log.slice(-3000)}`);
  }
  t.equal((await cli(['policy', 'create', 'drill', ...conn, '--rpo', '1h', '--crash-interval', '1h', '--app-interval', '2h', '--freeze-limit', '120s'])).code, 0);
  const mk = await cli(['group', 'create', 'shop', ...conn, '--machine', DB.agentId, '--machine', APP.agentId, '--bound', '60s']);
  t.equal(mk.code, 0, mk.stderr);
  for (const m of machines) {
    const en = await cli(['enable', ...conn, '--machine', m.agentId, '--disk', m.loop, '--disk-id', 'd0', '--policy', 'drill']);
    t.equal(en.code, 0, `enable ${m.name}: ${en.stderr}`);
  }
  await waitFor(async () => {
    const st = JSON.parse((await cli(['status', ...conn, '--json'])).stdout) as { disks: { agent: string; state: string; points: number }[] };
    return machines.every((m) => st.disks.some((d) => d.agent === m.agentId && d.state === 'continuous' && d.points >= 1));
  }, LONG, 'both disks continuous with a first point');

  // what the group point must hold on app, then the group cut
  await fsp.writeFile(path.join(appMnt, 'orders.db'), crypto.randomBytes(300_000));
  const orders = crypto.createHash('sha256').update(await fsp.readFile(path.join(appMnt, 'orders.db'))).digest('hex');
  const cut = await cli(['group', 'cut', 'shop', ...conn, '--json']);
  t.equal(cut.code, 0, `group cut: ${cut.stderr}`);
  const gp = (JSON.parse(cut.stdout) as { point: string }).point;
  // written after the group point: must not be in the recovered image
  await fsp.writeFile(path.join(appMnt, 'later.txt'), 'after the group point\n');
  sh('sync', []);

  // the plan: db first (own mapping, boot check), then app; scripts between
  const log = path.join(dir, 'scripts.log');
  const script = async (name: string, extra = '') => {
    const f = path.join(dir, name);
    await fsp.writeFile(f, `#!/bin/sh\necho "${name} $MOBILITY_PLAN_PHASE step=$MOBILITY_PLAN_STEP kind=$MOBILITY_PLAN_KIND machines=$MOBILITY_PLAN_MACHINES" >> '${log}'\n${extra}\n`, { mode: 0o755 });
    return f;
  };
  const mapping = { version: 1, networks: [{ source: '10.0.0.0/24', target: { subnet: '192.168.88.0/24', gateway: '192.168.88.1', dns: ['192.168.88.53'], mode: 'static' } }], nics: [{ mac: MAC, name: 'eth0', source: '10.0.0.7/24' }] };
  const plan = {
    name: 'shop-drill', group: 'shop',
    steps: [
      { machines: [DB.agentId], bootCheck: { marker: `^${MARKER}$`, timeoutMs: 9 * 60_000, bus: 'nvme', accel: 'tcg', network: 'isolated' }, post: await script('db-up.sh', 'grep -q "\\"point\\"" "$MOBILITY_PLAN_REPORT" && echo "report seen" >> ' + `'${log}'`) },
      { machines: [APP.agentId], pre: await script('before-app.sh') },
    ],
    networkMaps: { [DB.agentId]: mapping },
  };
  const planFile = path.join(dir, 'plan.json');
  await fsp.writeFile(planFile, JSON.stringify(plan));
  const bad = path.join(dir, 'bad-plan.json');
  await fsp.writeFile(bad, JSON.stringify({ ...plan, steps: [{ machines: [DB.agentId] }, { machines: [DB.agentId] }] }));
  const refused = await cli(['recovery-plan', 'create', '--file', bad, ...conn]);
  t.equal(refused.code, 3, 'a machine in two steps: refused, exit 3');
  t.match(refused.stderr, /MOB_ERR_PLAN: .*in step 1 and in step 2/);
  const created = await cli(['recovery-plan', 'create', '--file', planFile, ...conn]);
  t.equal(created.code, 0, created.stderr);
  t.match(created.stdout, /plan shop-drill: group shop/);

  const run = await cli(['recovery-plan', 'test-failover', 'shop-drill', ...conn, '--json']);
  t.equal(run.code, 0, `the plan's test failover goes through${run.code ? `: ${run.stdout.slice(-4000)}\n${run.stderr.slice(-2000)}` : ''}`);
  const rep = JSON.parse(run.stdout) as {
    ok: boolean; groupPoint: string;
    steps: { step: number; post: { ok: boolean } | null; pre: { ok: boolean } | null; results: { agent: string; point: string; images: { diskId: string; location: string }[]; bootCheck: { ok: boolean; reason: string } | null; networkMapping: { stack: string } | null }[] }[];
  };
  t.ok(rep.ok);
  t.equal(rep.groupPoint, gp, 'the group point the plan recovered to');
  const dbRes = rep.steps[0]!.results[0]!;
  const appRes = rep.steps[1]!.results[0]!;
  t.equal(dbRes.agent, DB.agentId);
  t.match(dbRes.bootCheck, { ok: true, reason: 'marker' }, 'db booted to its marker');
  t.equal(dbRes.networkMapping?.stack, 'systemd-networkd', 'db got its own mapping');
  t.equal(appRes.bootCheck, null, 'app: images only');
  t.equal(appRes.networkMapping, null, 'app: no mapping');
  const points = JSON.parse((await cli(['points', ...conn, '--group', 'shop', '--json'])).stdout) as { points: { id: string; points: Record<string, { id: string }> }[] };
  const g = points.points.find((p) => p.id === gp)!;
  t.equal(dbRes.point, g.points[DB.agentId]!.id, 'db at its part of the group point');
  t.equal(appRes.point, g.points[APP.agentId]!.id, 'app at its part of the group point');
  t.same(fs.readFileSync(log, 'utf8').trim().split('\n'), [
    `db-up.sh post step=1 kind=test-failover machines=${DB.agentId}`, 'report seen',
    `before-app.sh pre step=2 kind=test-failover machines=${APP.agentId}`,
  ], 'the scripts ran in order, between the steps, with the plan\'s environment and the report so far');

  // app's image: fsck-clean, with the file of the group point and not the later one
  const appImage = appRes.images[0]!.location;
  t.ok(fs.existsSync(appImage), `app's image ${appImage}`);
  sh('e2fsck', ['-fn', appImage]);
  const mntImg = path.join(dir, 'mnt-check');
  await fsp.mkdir(mntImg);
  sh('mount', ['-o', 'ro,loop,noload', appImage, mntImg]);
  c.mount(mntImg);
  t.equal(crypto.createHash('sha256').update(await fsp.readFile(path.join(mntImg, 'orders.db'))).digest('hex'), orders, 'the file written before the group point, intact');
  t.notOk(fs.existsSync(path.join(mntImg, 'later.txt')), 'the file written after it is not there');
  sh('umount', [mntImg]);

  // runs are kept; cleanup removes every image the test failover made
  const runs = JSON.parse((await cli(['recovery-plan', 'runs', 'shop-drill', ...conn, '--json'])).stdout) as { runs: { kind: string; ok: boolean }[] };
  t.same(runs.runs.map((r) => [r.kind, r.ok]), [['test-failover', true]]);
  const clean = await cli(['recovery-plan', 'test-failover', 'shop-drill', '--cleanup', ...conn, '--json']);
  t.equal(clean.code, 0, `cleanup: ${clean.stderr}`);
  for (const r of [dbRes, appRes]) for (const im of r.images) t.notOk(fs.existsSync(im.location), `${r.agent}'s image ${im.location} is removed`);

  // while a plan's run recovers a machine, a direct test failover or failover of it is refused
  const started = path.join(path.dirname(planFile), 'hold-started');
  const release = path.join(path.dirname(planFile), 'hold-release');
  const hold = await script('hold.sh', `touch '${started}'; while [ ! -e '${release}' ]; do sleep 0.1; done; exit 1`);
  await fsp.writeFile(planFile, JSON.stringify({ name: 'holds', group: 'shop', steps: [{ machines: [APP.agentId], pre: hold }] }));
  t.equal((await cli(['recovery-plan', 'create', '--file', planFile, ...conn])).code, 0);
  const holding = runCli(['recovery-plan', 'test-failover', 'holds', ...conn]).done;
  try {
    await waitFor(() => fs.existsSync(started), 120_000, 'the plan run to reach its pre script');
    const direct = await cli(['test-failover', '--agent-id', APP.agentId, ...conn]);
    t.equal(direct.code, 3, 'a direct test failover of a machine the plan is recovering is refused');
    t.match(direct.stderr, /MOB_ERR_PLAN.*being recovered by a run of recovery plan holds/);
    const directFo = await cli(['failover', '--agent-id', APP.agentId, '--yes', ...conn]);
    t.equal(directFo.code, 3, 'so is a direct failover');
    t.match(directFo.stderr, /MOB_ERR_PLAN/);
  } finally {
    await fsp.writeFile(release, '');
  }
  t.equal((await holding).code, 1, 'the held plan ends (its pre script failed on purpose)');
  const after = await cli(['test-failover', '--agent-id', APP.agentId, '--cleanup', ...conn]);
  t.not(after.stderr.includes('MOB_ERR_PLAN'), true, `after the run the machine is free again (${after.stderr.slice(-300)})`);
  t.equal((await cli(['recovery-plan', 'delete', 'holds', '--yes', ...conn])).code, 0);

  // a plan whose first step fails stops there
  const failing = await script('refuse.sh', 'exit 1');
  await fsp.writeFile(planFile, JSON.stringify({ name: 'stops', group: 'shop', steps: [{ machines: [APP.agentId], pre: failing }, { machines: [DB.agentId], bootCheck: true }] }));
  t.equal((await cli(['recovery-plan', 'create', '--file', planFile, ...conn])).code, 0);
  const stop = await cli(['recovery-plan', 'test-failover', 'stops', ...conn]);
  t.equal(stop.code, 1, 'a failed plan: exit 1');
  t.match(stop.stdout, /recovery plan stops, test-failover run \S+ at group point \S+: FAILED: step 1: pre script .*refuse\.sh exited with 1/);
  t.match(stop.stdout, /\n2 +\S+ +- +not run \(an earlier step failed\)/, 'step 2 did not run');
  const list = await cli(['recovery-plan', 'list', ...conn]);
  t.match(list.stdout, /shop-drill +shop +2/);
  const del = await cli(['recovery-plan', 'delete', 'stops', ...conn]);
  t.equal(del.code, 2, 'delete asks: not a terminal, no --yes -> usage');
  t.equal((await cli(['recovery-plan', 'delete', 'stops', '--yes', ...conn])).code, 0);
  t.equal((await cli(['recovery-plan', 'show', 'stops', ...conn])).code, 3, 'gone');

  // the real thing: the plan's failover asks first, then fails both machines over in order to
  // one group point, and boot-checks db's promoted image
  const noYes = await cli(['recovery-plan', 'failover', 'shop-drill', ...conn]);
  t.equal(noYes.code, 2, 'failover asks: not a terminal, no --yes -> usage, nothing done');
  const fo = await cli(['recovery-plan', 'failover', 'shop-drill', '--yes', ...conn, '--json']);
  t.equal(fo.code, 0, `the plan's failover goes through${fo.code ? `: ${fo.stdout.slice(-4000)}\n${fo.stderr.slice(-2000)}` : ''}`);
  const frep = JSON.parse(fo.stdout) as typeof rep & { kind: string };
  t.equal(frep.kind, 'failover');
  t.equal(frep.groupPoint, gp, 'to the same group point (the newest complete one)');
  t.match(frep.steps[0]!.results[0]!.bootCheck, { ok: true, reason: 'marker' }, 'db\'s promoted image boots');
  t.same(frep.steps.map((s) => s.results.map((r) => r.point)), [[dbRes.point], [appRes.point]], 'each machine at its part of the group point');
  const st = JSON.parse((await cli(['status', ...conn, '--json'])).stdout) as { disks: { agent: string; state: string; reason: string }[] };
  for (const m of machines) {
    const d = st.disks.find((x) => x.agent === m.agentId)!;
    t.equal(d.state, 'failed-over', `${m.name} is failed over (${d.reason})`);
  }
});
