/**
 * Multi-machine consistency groups, end to end: one real `mobility server`, two real
 * `mobility agent` processes (registered as two machines, each with its own machine id and
 * state), each protecting its own ext4 filesystem on its own loop device under a fio/dd write
 * load, both in one consistency group.
 *
 * - 20 group cuts (`mobility group cut`): every one gives each machine a recovery point
 *   labelled with the same group point id (`mobility points`, `points --group`); for every
 *   group point, `mobility test-failover --group` restores both machines to it, and each image
 *   is fsck-clean and holds exactly the files, with the checksums, that a frozen-phase hook
 *   recorded on that machine inside the same group cut (the hooks see MOBILITY_GROUP_POINT).
 * - One agent stopped with SIGSTOP inside its freeze (by its own frozen hook, so the stop lands
 *   in the freeze step every time): the group cut aborts at the group's bound naming that
 *   machine, the other machine's filesystem is thawed (a write to it completes while the
 *   stopped one is still frozen), the failure is an event naming the machine; after SIGCONT
 *   the stopped agent thaws by itself and the next group cut succeeds.
 *
 * Needs root, losetup, mkfs.ext4, e2fsck, fsfreeze, fio, sha256sum and tracefs: a missing one fails the test.
 */
import t from 'tap';
import { execFile } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { api, type ApiConn } from '../../src/cli/api-client.js';
import { CLI_PATH } from '../../src/server/spawn.js';
import { cleanup } from '../cleanup.js';
import { runCli, startServer, stopGently, waitFor } from '../helpers.js';
import type { Cleanup } from '../cleanup.js';
import { LONG, sh, shAsync } from '../protect-harness.js';

/**
 * A steady write load on one filesystem until stop(): fio random 4 KiB writes (rate-limited to
 * 1 MiB/s, fsync every 16) into an 8 MiB file, and a loop that rewrites 16 files of 16-128 KiB
 * in turn (new sizes, new contents). Lighter than protect-harness's Workload, which two
 * machines on a busy 2-core machine could not converge under quickly enough for 21 group cuts
 * in one test file; its size stays bounded, so the filesystem never fills.
 */
class SteadyLoad {
  private readonly child: import('node:child_process').ChildProcess;
  private readonly stopFile: string;
  private readonly progressFile: string;
  private readonly exited: Promise<void>;
  constructor(c: Cleanup, dir: string, mnt: string, tag: string) {
    this.stopFile = path.join(dir, `load-${tag}.stop`);
    this.progressFile = path.join(dir, `load-${tag}.progress`);
    const script = `
      fio --name=steady --directory='${mnt}' --rw=randwrite --bs=4k --size=8M --numjobs=1 --time_based --runtime=3600 \
          --rate=1m --ioengine=psync --fsync=16 >/dev/null 2>&1 &
      fio=$!
      i=0
      while [ ! -e '${this.stopFile}' ]; do
        i=$((i+1)); dd if=/dev/urandom of='${mnt}'/f.$((i % 16)) bs=16k count=$(( (i % 8) + 1 )) conv=fsync status=none
        echo $i > '${this.progressFile}.tmp' && mv '${this.progressFile}.tmp' '${this.progressFile}'
        sleep 0.2
      done
      kill $fio 2>/dev/null; wait`;
    this.child = c.spawn('sh', ['-c', script], { stdio: 'ignore' });
    this.exited = new Promise((r) => this.child.once('exit', () => r()));
  }
  get running(): boolean { return this.child.exitCode === null && this.child.signalCode === null; }
  progress(): number {
    try { return Number(fs.readFileSync(this.progressFile, 'utf8').trim()) || 0; } catch { return 0; }
  }
  async advance(rounds: number): Promise<void> {
    const target = this.progress() + rounds;
    await waitFor(() => this.progress() >= target || !this.running, LONG, `${rounds} load rounds`);
  }
  async stop(): Promise<void> {
    if (!this.running) return;
    fs.writeFileSync(this.stopFile, '');
    const k = setTimeout(() => { try { process.kill(-this.child.pid!, 'SIGKILL'); } catch { /* gone */ } }, 60_000);
    await this.exited;
    clearTimeout(k);
  }
}

const GROUP_POINTS = 20;
/** The group's bound while it is cut under load (generous: a busy machine must not fail a cut that works). */
const BOUND_S = 60;
/** The bound while one agent is stopped: the abort is awaited for this long. */
const STOP_BOUND_S = 8;

interface Machine {
  agentId: string; loop: string; mnt: string; sums: string; hooks: string; config: string; stateDir: string;
  child: import('node:child_process').ChildProcess | null; log: string;
}

// two agents, their initial syncs, 21 group cuts and 42 images checked: more than tap's default on a busy machine
t.setTimeout(10 * 60 * 1000);

t.test('a consistency group of two machines: 20 group points restored together, a stopped agent aborts the cut and everyone thaws', async (t) => {
  if (process.getuid?.() !== 0) throw new Error('this test needs root (loop devices, tracefs, fsfreeze)');
  for (const tool of ['losetup', 'mkfs.ext4', 'e2fsck', 'fsfreeze', 'fio', 'mount', 'sha256sum']) {
    try { sh('sh', ['-c', `command -v ${tool}`]); } catch { throw new Error(`${tool} is required for this test`); }
  }
  if (!fs.existsSync('/sys/kernel/tracing/instances')) { try { sh('mount', ['-t', 'tracefs', 'tracefs', '/sys/kernel/tracing']); } catch { /* reported below */ } }
  if (!fs.existsSync('/sys/kernel/tracing/instances')) throw new Error('tracefs (/sys/kernel/tracing/instances) is required for this test');
  const c = cleanup(t);
  const dir = c.dir('group-');
  const server = await startServer(t, path.join(dir, 'srv'));
  const dataDir = server.info.dataDir;
  const conn = ['--server', server.info.url, '--data-dir', dataDir];
  const ops = ['--server', server.info.url, '--token-file', server.info.tokenFile, '--ca', server.info.caFile!];
  const cli = (args: string[]) => runCli(args).done;
  // the many repeated requests go to the same API in-process (a CLI process each costs seconds on a busy machine)
  const apiConn: ApiConn = { url: new URL(server.info.url), token: (await fsp.readFile(server.info.tokenFile, 'utf8')).trim(), ca: await fsp.readFile(server.info.caFile!, 'utf8') };

  const machines: Machine[] = [];
  for (const name of ['a', 'b']) {
    const agentId = `grp-${name}-${process.pid}-${crypto.randomBytes(3).toString('hex')}`;
    c.traceInstances(agentId);
    const img = path.join(dir, `${name}.img`);
    await fsp.writeFile(img, '');
    await fsp.truncate(img, 64 * 1024 * 1024);
    const loop = sh('losetup', ['--find', '--show', img]).trim();
    c.loop(loop);
    const mnt = path.join(dir, `mnt-${name}`);
    await fsp.mkdir(mnt);
    sh('mkfs.ext4', ['-q', '-F', '-E', 'lazy_itable_init=0,lazy_journal_init=0', loop]);
    sh('mount', ['-o', 'noatime', loop, mnt]);
    c.mount(mnt);
    sh('dd', ['if=/dev/urandom', `of=${mnt}/seed`, 'bs=64k', 'count=32', 'status=none']);
    sh('sync', []);
    const stateDir = path.join(dir, `agent-${name}`);
    await fsp.mkdir(stateDir, { recursive: true, mode: 0o700 });
    await fsp.writeFile(path.join(stateDir, 'identity.json'), JSON.stringify({ agentId }));
    const midFile = path.join(dir, `machine-id-${name}`);
    await fsp.writeFile(midFile, crypto.randomBytes(16).toString('hex') + '\n');
    const sums = path.join(dir, `sums-${name}`);
    const hooks = path.join(dir, `hooks-${name}`);
    await fsp.mkdir(sums);
    await fsp.mkdir(path.join(hooks, 'frozen'), { recursive: true });
    // on demand (a file naming a pid): stop that process (the agent) from inside its own freeze
    await fsp.writeFile(path.join(hooks, 'frozen', '05-stop'), `#!/bin/sh\nf='${dir}/stop-${name}'\n[ -e "$f" ] || exit 0\npid=$(cat "$f"); rm -f "$f"\nkill -STOP "$pid"\n`, { mode: 0o755 });
    // inside the frozen window of a group cut: checksums of every file, named by the group point
    await fsp.writeFile(path.join(hooks, 'frozen', '10-sums'), `#!/bin/sh\nset -e\n[ -n "$MOBILITY_GROUP_POINT" ] || exit 0\ncd '${mnt}'\n`
      + `find . -type f ! -name lost+found | sort | xargs -r sha256sum > '${sums}'/$MOBILITY_GROUP_POINT.tmp\nmv '${sums}'/$MOBILITY_GROUP_POINT.tmp '${sums}'/$MOBILITY_GROUP_POINT\n`, { mode: 0o755 });
    const config = path.join(dir, `agent-${name}.json`);
    await fsp.writeFile(config, JSON.stringify({ server: server.info.url, stateDir, logFile: path.join(dir, `agent-${name}.log`), machineIdFile: midFile, hooksDir: hooks, inventoryIntervalMs: 600_000 }));
    const reg = await cli(['register', '--config', config, '--passphrase-file', path.join(dataDir, 'passphrase'), '--json']);
    t.equal(reg.code, 0, `register ${name}: ${reg.stderr}`);
    machines.push({ agentId, loop, mnt, sums, hooks, config, stateDir, child: null, log: '' });
  }
  const [A, B] = machines as [Machine, Machine];

  const start = async (m: Machine) => {
    const a = c.spawn(process.execPath, [CLI_PATH, 'agent', '--config', m.config, '--json-logs'], { stdio: ['ignore', 'ignore', 'pipe'] });
    m.child = a;
    // kept in a file too: an agent that dies says why there
    const errFile = fs.createWriteStream(path.join(dir, `${m.agentId}.stderr`));
    a.stderr!.on('data', (d: Buffer) => { m.log = (m.log + d.toString()).slice(-400_000); errFile.write(d); });
    a.once('exit', (code, sig) => { errFile.end(`\nexited: ${code} ${sig}\n`); });
    await waitFor(() => m.log.includes('"control connected"') || a.exitCode !== null, 60_000, `agent ${m.agentId} control connection`);
    if (a.exitCode !== null) throw new Error(`agent exited with ${a.exitCode}: ${m.log.slice(-3000)}`);
  };
  t.teardown(async () => {
    for (const m of machines) {
      if (m.child && m.child.exitCode === null && m.child.signalCode === null) {
        try { process.kill(m.child.pid!, 'SIGCONT'); } catch { /* gone */ }
        await stopGently(m.child, 30_000);
      }
    }
  });
  for (const m of machines) await start(m);

  // one policy for both (own points rarely: the group cuts are what this test is about)
  const pol = await cli(['policy', 'create', 'grp', ...conn, '--rpo', '1h', '--crash-interval', '1h', '--app-interval', '2h', '--freeze-limit', '120s']);
  t.equal(pol.code, 0, pol.stderr);

  // a group is checked before anything runs: too many machines, an unknown machine
  const tooMany = await cli(['group', 'create', 'big', ...conn, ...Array.from({ length: 17 }, () => ['--machine', A.agentId]).flat()]);
  t.equal(tooMany.code, 0, 'the same machine 17 times is one member');
  const unknown = await cli(['group', 'create', 'g2', ...conn, '--machine', A.agentId, '--machine', 'no-such-machine']);
  t.equal(unknown.code, 3, 'an unknown machine -> exit 3');
  t.match(unknown.stderr, /MOB_ERR_UNKNOWN_MACHINE/);
  const inTwo = await cli(['group', 'create', 'g', ...conn, '--machine', A.agentId, '--machine', B.agentId]);
  t.equal(inTwo.code, 3, 'a machine is in at most one group');
  t.match(inTwo.stderr, /MOB_ERR_CONFIG: .*machine .* is already in group big/);
  t.equal((await cli(['group', 'delete', 'big', ...conn])).code, 0);
  const nothing = await cli(['group', 'cut', 'nope', ...conn]);
  t.equal(nothing.code, 3, 'unknown group -> exit 3');
  t.match(nothing.stderr, /MOB_ERR_UNKNOWN_GROUP/);

  const mk = await cli(['group', 'create', 'g', ...conn, '--machine', A.agentId, '--machine', B.agentId, '--bound', `${BOUND_S}s`, '--json']);
  t.equal(mk.code, 0, mk.stderr);
  t.same((JSON.parse(mk.stdout) as { group: { members: string[] } }).group.members, [A.agentId, B.agentId]);
  const notYet = await cli(['group', 'cut', 'g', ...conn]);
  t.equal(notYet.code, 3, 'no disk enabled yet -> exit 3');
  t.match(notYet.stderr, /MOB_ERR_NOT_PROTECTING: .*machine .* of group g protects no disk/);

  for (const m of machines) {
    const en = await cli(['enable', ...conn, '--machine', m.agentId, '--disk', m.loop, '--disk-id', 'd0', '--policy', 'grp']);
    t.equal(en.code, 0, en.stderr);
  }
  const continuous = async () => {
    const st = JSON.parse((await cli(['status', ...ops, '--json'])).stdout) as { disks: { agent: string; state: string; points: number }[] };
    return machines.every((m) => st.disks.some((d) => d.agent === m.agentId && d.state === 'continuous' && d.points >= 1));
  };
  // the first own point of each machine comes after its initial sync
  await waitFor(continuous, LONG, 'both disks continuous with a first point');

  const loads = machines.map((m, i) => new SteadyLoad(c, dir, m.mnt, String(i)));
  t.teardown(() => Promise.all(loads.map((l) => l.stop())));
  await Promise.all(loads.map((l) => l.advance(3)));

  type Outcome = { point: string; complete: boolean; members: { agentId: string; pointId: string; frozenMs: number }[]; convergeMs: number; freezeStepMs: number };
  const groupCut = async () => {
    const r = await cli(['group', 'cut', 'g', ...conn, '--json']);
    return { ...r, j: r.code === 0 ? JSON.parse(r.stdout) as Outcome : null };
  };
  const gps: string[] = [];
  const progress0 = loads.map((l) => l.progress());
  for (let i = 0; i < GROUP_POINTS; i++) {
    // the first through the CLI (its output), the rest through the same API in-process
    let j: Outcome;
    try {
      if (i === 0) {
        const r = await groupCut();
        if (r.code !== 0) throw new Error(r.stderr);
        t.match(r.stderr, /^$/, 'group cut --json: the answer alone');
        j = r.j!;
      } else {
        j = await api(apiConn, 'POST', '/v1/groups/cut', { group: 'g' }) as unknown as Outcome;
      }
    } catch (err) {
      t.fail(`group cut ${i + 1} failed: ${(err as Error).message}\nA: ${A.log.slice(-2000)}\nB: ${B.log.slice(-2000)}`);
      break;
    }
    t.ok(j.complete && j.members.every((m) => /^rp-\d+$/.test(m.pointId)), `group cut ${i + 1}: ${j.point}, ${j.members.map((m) => `${m.pointId} frozen ${m.frozenMs} ms`).join(', ')}; converged in ${j.convergeMs} ms, freeze step ${j.freezeStepMs} ms`);
    gps.push(j.point);
    // every group point of a machine holds something the previous one did not
    await Promise.all(loads.map((l) => l.advance(2)));
  }
  t.equal(gps.length, GROUP_POINTS, `${GROUP_POINTS} group points`);
  for (const m of machines) {
    const sums = await Promise.all(gps.map((gp) => fsp.readFile(path.join(m.sums, gp), 'utf8').catch(() => '')));
    t.ok(sums.every((s, i) => s !== '' && (i === 0 || s !== sums[i - 1])), `${m.agentId}: every group point's frozen hook recorded checksums, each different from the previous point's`);
  }
  t.ok(loads.every((l, i) => l.running && l.progress() > progress0[i]!), `taken under write load (load rounds meanwhile: ${loads.map((l, i) => l.progress() - progress0[i]!).join(', ')})`);

  // --- one agent stopped inside its freeze: the cut aborts at the bound, naming it; the other thaws
  const rebound = await cli(['group', 'create', 'g', ...conn, '--machine', A.agentId, '--machine', B.agentId, '--bound', `${STOP_BOUND_S}s`]);
  t.equal(rebound.code, 0, rebound.stderr);
  await fsp.writeFile(path.join(dir, 'stop-b'), String(B.child!.pid));
  const t0 = Date.now();
  const stopped = await groupCut();
  const tookMs = Date.now() - t0;
  t.equal(stopped.code, 1, `the group cut fails (${stopped.stderr.trim()})`);
  t.notOk(fs.existsSync(path.join(dir, 'stop-b')), 'the stop hook ran: the agent was stopped inside its freeze');
  t.match(stopped.stderr, new RegExp(`MOB_ERR_GROUP_CUT: .*aborted at the freeze step: machine ${B.agentId} (did not answer the freeze step within ${STOP_BOUND_S} s|disconnected)`), 'the stopped machine is named');
  t.match(stopped.stderr, /every machine was told to thaw/);
  t.ok(tookMs >= STOP_BOUND_S * 1000 || /disconnected/.test(stopped.stderr), `aborted at the bound (${tookMs} ms), not before`);
  // thawed: a write to A's filesystem completes (on a frozen one it would block until the time
  // limit). Into blocks the seed file already has: the workload may have filled the filesystem
  const w = await shAsync('dd', ['if=/dev/zero', `of=${A.mnt}/seed`, 'bs=4k', 'count=1', 'conv=notrunc,fsync', 'status=none'], LONG);
  t.equal(w.code, 0, `the other machine's filesystem was thawed: a write completes ${w.stderr}`);
  t.equal(B.child!.exitCode, null, 'the stopped agent is still there (stopped)');
  // the failure is an event naming the machine
  await waitFor(async () => {
    const ev = JSON.parse((await cli(['events', ...ops, '--json'])).stdout) as { events: { agent: string; kind: string; code: string | null; reason: string }[] };
    return ev.events.some((e) => e.kind === 'group-cut-failed' && e.agent === B.agentId && /aborted/.test(e.reason));
  }, LONG, 'the group-cut-failed event');
  t.pass('the failure is recorded as an event naming the stopped machine');

  process.kill(B.child!.pid!, 'SIGCONT');
  // B reports the failed group cut once it has thawed (the abort, or its own bound); a B that died
  // instead would leave its filesystem frozen and the write below blocked for good
  await waitFor(() => B.log.includes('"group cut failed"') || B.child!.exitCode !== null || B.child!.signalCode !== null, LONG, 'the stopped agent to give up its group cut');
  t.equal(B.child!.exitCode ?? B.child!.signalCode, null, `the stopped agent lives on after SIGCONT${B.child!.exitCode !== null || B.child!.signalCode !== null ? `: ${B.log.slice(-4000)}` : ''}`);
  if (B.child!.exitCode !== null || B.child!.signalCode !== null) return;
  // B thaws on its own (the abort, or its own bound): a write to its filesystem completes
  const wb = await shAsync('dd', ['if=/dev/zero', `of=${B.mnt}/seed`, 'bs=4k', 'count=1', 'conv=notrunc,fsync', 'status=none'], LONG);
  t.equal(wb.code, 0, `the stopped machine thawed after SIGCONT ${wb.stderr}`);
  await waitFor(async () => JSON.parse((await cli(['group', 'list', ...conn, '--json'])).stdout).groups[0].machines.every((m: { connected: boolean }) => m.connected) && continuous(), LONG, 'both machines connected and continuous again');
  const back = await cli(['group', 'create', 'g', ...conn, '--machine', A.agentId, '--machine', B.agentId, '--bound', `${BOUND_S}s`]);
  t.equal(back.code, 0, back.stderr);
  const after = await groupCut();
  t.equal(after.code, 0, `the next group cut succeeds${after.code ? `: ${after.stderr}\nB: ${B.log.slice(-3000)}` : ''}`);
  if (after.j) gps.push(after.j.point);

  await Promise.all(loads.map((l) => l.stop()));

  // --- what the catalogs say: one id on every member, listed by points and points --group
  const listed = JSON.parse((await cli(['points', ...ops, '--group', 'g', '--json'])).stdout) as { points: { id: string; complete: boolean; members: string[]; points: Record<string, { id: string }> }[] };
  for (const gp of gps) {
    const p = listed.points.find((x) => x.id === gp);
    t.ok(p?.complete && machines.every((m) => p.points[m.agentId]), `points --group lists ${gp} as complete on both machines`);
  }
  t.notOk(listed.points.some((p) => p.id !== undefined && !gps.includes(p.id) && p.complete), 'no other complete group point (the aborted cut recorded none)');
  for (const m of machines) {
    const pts = JSON.parse((await cli(['points', ...ops, '--agent-id', m.agentId, '--json'])).stdout) as { points: { id: string; group?: { id: string; name: string } }[] };
    t.same(pts.points.filter((p) => p.group).map((p) => p.group!.id), gps, `${m.agentId}: its labelled points are exactly the group points, in order`);
    t.ok(pts.points.some((p) => !p.group), `${m.agentId}: its own points carry no group label`);
  }
  const table = await cli(['points', ...ops, '--agent-id', A.agentId]);
  t.match(table.stdout, new RegExp(`GROUP POINT[\\s\\S]*${gps[0]} \\(g\\)`), 'mobility points shows the group point');

  // --- test failover of the group at every group point: both images at the same group cut
  // the images as the file store keeps them (local files); the last one is downloaded as well
  // (the CLI for the last one, with --download; the API in-process for the others)
  for (const [k, gp] of gps.entries()) {
    const out = path.join(dir, `tf-${gp}`);
    const download = k === gps.length - 1;
    type M = { agentId: string; point: { id: string; group: { id: string } }; disks: { localPath: string | null }[]; downloads: { file: string }[] };
    let j: { point: string; machines: M[] };
    if (download) {
      const r = await cli(['test-failover', ...ops, '--group', 'g', '--point', gp, '--download', out, '--json']);
      t.equal(r.code, 0, `test-failover --group g --point ${gp} --download: ${r.stderr}`);
      if (r.code !== 0) continue;
      j = JSON.parse(r.stdout) as typeof j;
    } else {
      try {
        j = await api(apiConn, 'POST', '/v1/test-failover', { group: 'g', point: gp }) as unknown as typeof j;
      } catch (err) {
        t.fail(`test failover of the group at ${gp}: ${(err as Error).message}`);
        continue;
      }
    }
    t.equal(j.point, gp);
    t.same(j.machines.map((m) => [m.agentId, m.point.group.id]), machines.map((m) => [m.agentId, gp]), 'every machine at the group point');
    if (download) t.same(j.machines.map((m) => m.downloads.map((d) => d.file)), machines.map((m) => [path.join(out, m.agentId, 'd0.img')]), '--download writes DIR/<agent>/<disk>.img');
    for (const m of j.machines) {
      const mach = machines.find((x) => x.agentId === m.agentId)!;
      const image = download ? m.downloads[0]!.file : m.disks[0]!.localPath!;
      const fsck = await shAsync('e2fsck', ['-fn', image]);
      t.equal(fsck.code, 0, `${gp} ${m.agentId}: e2fsck -fn is clean ${fsck.code ? fsck.stdout.slice(-1000) : ''}`);
      const mp = path.join(dir, `check-${gp}-${m.agentId}`);
      await fsp.mkdir(mp);
      sh('mount', ['-o', 'ro,loop,noload', image, mp]);
      try {
        const sumsFile = path.join(mach.sums, gp);
        const want = await fsp.readFile(sumsFile, 'utf8');
        const nfiles = want.split('\n').filter(Boolean).length;
        const check = await new Promise<{ ok: boolean; out: string }>((resolve) => {
          execFile('sha256sum', ['-c', '--quiet', sumsFile], { cwd: mp, encoding: 'utf8', timeout: LONG }, (err, stdout) => resolve({ ok: !err, out: stdout }));
        });
        t.ok(check.ok, `${gp} ${m.agentId}: all ${nfiles} files match the checksums its frozen hook took in this group cut ${check.out.slice(0, 500)}`);
        const have = sh('sh', ['-c', `cd '${mp}' && find . -type f ! -name lost+found | sort`]).split('\n').filter(Boolean).length;
        t.equal(have, nfiles, `${gp} ${m.agentId}: the image holds exactly the files present at the cut`);
      } finally {
        sh('umount', [mp]);
      }
    }
    const cl = await api(apiConn, 'POST', '/v1/test-failover', { group: 'g', point: gp, cleanup: true }) as { removed: boolean; machines: { disks: unknown[] }[] };
    t.ok(cl.removed && cl.machines.every((m) => m.disks.length === 1), `cleanup ${gp} removed both images`);
    await fsp.rm(out, { recursive: true, force: true });
  }
  const latest = await cli(['test-failover', ...ops, '--group', 'g', '--json']);
  t.equal(latest.code, 0, latest.stderr);
  t.equal((JSON.parse(latest.stdout) as { point: string }).point, gps[gps.length - 1], '--point latest is the newest complete group point');
  await cli(['test-failover', ...ops, '--group', 'g', '--cleanup']);
  const bad = await cli(['test-failover', ...ops, '--group', 'g', '--point', 'gp-nope']);
  t.equal(bad.code, 3, 'an unknown group point -> exit 3');
  t.match(bad.stderr, /MOB_ERR_UNKNOWN_POINT/);
});
