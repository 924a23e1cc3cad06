/**
 * Continuous protection with real things: an ext4 filesystem on a loop device,
 * written by fio and dd while `mobility protect` (a real process, real tracefs
 * instance) replicates it to a real server; cuts during the load; a frozen-phase
 * hook records file checksums inside each frozen window. Every point's
 * test-failover image passes `e2fsck -fn` and its files match that cut's checksums.
 * kill -9 of the agent under load costs no rescan; a forced trace-buffer overrun
 * goes resync-required -> resyncing -> continuous and the next point is exact.
 *
 * Needs root, losetup, mkfs.ext4, e2fsck, fsfreeze, fio and tracefs: a missing one fails the test.
 */
import t, { type Test } from 'tap';
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import path from 'node:path';
import readline from 'node:readline';
import { CLI_PATH, spawnServer, stopServer } from '../../src/server/spawn.js';
import { runCli, sleep, tmpDir, waitFor } from '../helpers.js';

/** The reason the protector gives when it was killed inside a read of trace_pipe (events handed over, not yet journaled). */
const TORN_READ = 'the agent stopped while taking events out of the tracker';

const sh = (cmd: string, args: string[]) => execFileSync(cmd, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });

interface Ev { event: string; [k: string]: unknown }

class Agent {
  events: Ev[] = [];
  child: ChildProcess;
  stderr = '';
  exited: Promise<number | null>;
  constructor(args: string[]) {
    this.child = spawn(process.execPath, [CLI_PATH, 'protect', ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
    readline.createInterface({ input: this.child.stdout! }).on('line', (l) => {
      try { this.events.push(JSON.parse(l) as Ev); } catch { /* not an event */ }
    });
    this.child.stderr!.on('data', (d: Buffer) => { this.stderr = (this.stderr + d.toString()).slice(-200_000); });
    this.exited = new Promise((r) => this.child.once('exit', (code) => r(code)));
  }
  find(pred: (e: Ev) => boolean): Ev | undefined { return this.events.find(pred); }
  async waitEvent(pred: (e: Ev) => boolean, ms: number, what: string): Promise<Ev> {
    await waitFor(() => this.events.some(pred) || this.child.exitCode !== null, ms, what).catch((err: Error) => {
      throw new Error(`${err.message}\nevents: ${JSON.stringify(this.events.slice(-20))}\nstderr: ${this.stderr.slice(-3000)}`);
    });
    const e = this.events.find(pred);
    if (!e) throw new Error(`agent exited (${this.child.exitCode}) before ${what}: ${this.stderr.slice(-3000)}`);
    return e;
  }
  /** Asks for a cut and waits for its point (or its failure). */
  async cut(kind: 'app' | 'crash', ms = 60_000): Promise<Ev> {
    const before = this.events.length;
    this.child.kill(kind === 'app' ? 'SIGUSR1' : 'SIGUSR2');
    return this.waitEvent((e) => this.events.indexOf(e) >= before && (e.event === 'cut' || e.event === 'cut-failed'), ms, `a ${kind} cut`);
  }
  async kill9(): Promise<void> {
    this.child.kill('SIGKILL');
    await this.exited;
  }
  async stop(): Promise<void> {
    if (this.child.exitCode !== null || this.child.signalCode !== null) return;
    this.child.kill('SIGTERM');
    await this.exited;
  }
}

async function setup(t: Test, sizeMb = 256) {
  for (const tool of ['losetup', 'mkfs.ext4', 'e2fsck', 'fsfreeze', 'fio', 'mount']) {
    try { sh('sh', ['-c', `command -v ${tool}`]); } catch { throw new Error(`${tool} is required for this test`); }
  }
  const dir = await tmpDir(t);
  const img = path.join(dir, 'disk.img');
  await fsp.writeFile(img, '');
  await fsp.truncate(img, sizeMb * 1024 * 1024);
  const loop = sh('losetup', ['--find', '--show', img]).trim();
  const mnt = path.join(dir, 'mnt');
  await fsp.mkdir(mnt);
  sh('mkfs.ext4', ['-q', '-F', loop]);
  // noatime: the checksum hook reads files while the filesystem is frozen
  sh('mount', ['-o', 'noatime', loop, mnt]);
  sh('dd', ['if=/dev/urandom', `of=${mnt}/seed`, 'bs=64k', 'count=64', 'status=none']);
  sh('sync', []);
  const agentId = `e2e-${process.pid}-${Math.floor(Math.random() * 1e6)}`;
  t.teardown(() => {
    try { sh('fsfreeze', ['-u', mnt]); } catch { /* not frozen */ }
    try { sh('umount', ['-l', mnt]); } catch { /* gone */ }
    try { sh('losetup', ['-d', loop]); } catch { /* gone */ }
    const inst = `/sys/kernel/tracing/instances/mobility-${agentId}`;
    try {
      fs.writeFileSync(`${inst}/events/block/block_rq_complete/enable`, '0');
      fs.rmdirSync(inst);
    } catch { /* gone */ }
  });
  const server = await spawnServer(path.join(dir, 'srv'));
  t.teardown(() => stopServer(server));
  const sums = path.join(dir, 'sums');
  const hooks = path.join(dir, 'hooks');
  await fsp.mkdir(sums);
  for (const phase of ['pre-freeze', 'frozen', 'post-thaw']) await fsp.mkdir(path.join(hooks, phase), { recursive: true });
  // inside the frozen window: checksums of every file, named by cut id
  await fsp.writeFile(path.join(hooks, 'frozen', '10-sums'), `#!/bin/sh\nset -e\ncd '${mnt}'\nfind . -type f ! -name lost+found | sort | xargs -r sha256sum > '${sums}'/$MOBILITY_CUT_ID.tmp\nmv '${sums}'/$MOBILITY_CUT_ID.tmp '${sums}'/$MOBILITY_CUT_ID\n`, { mode: 0o755 });
  for (const phase of ['pre-freeze', 'post-thaw']) {
    await fsp.writeFile(path.join(hooks, phase, '10-mark'), `#!/bin/sh\necho "$MOBILITY_PHASE $MOBILITY_CUT_ID $MOBILITY_CUT_KIND" >> '${dir}'/hooks.log\n`, { mode: 0o755 });
  }
  const args = (extra: string[] = []) => ['--server', server.info.url, '--token-file', server.info.tokenFile, '--ca', server.info.caFile!, '--disk', `${loop}=d0`,
    '--agent-id', agentId, '--state-dir', path.join(dir, 'agent'), '--hooks-dir', hooks, '--json-logs', ...extra];
  return { dir, img, loop, mnt, server, sums, hooks, agentId, args };
}

/** A background workload: fio random writes into files plus dd file copies and deletions. */
function workload(mnt: string, seconds: number, direct = false): ChildProcess {
  const script = `
    fio --name=churn --directory='${mnt}' --rw=randwrite --bs=4k --size=16M --numjobs=2 --time_based --runtime=${seconds} \
        --ioengine=psync ${direct ? '--direct=1' : '--fsync=64'} --group_reporting >/dev/null 2>&1 &
    end=$(( $(date +%s) + ${seconds} )); i=0
    while [ $(date +%s) -lt $end ]; do
      i=$((i+1)); dd if=/dev/urandom of='${mnt}'/copy.$i bs=64k count=$(( (i % 32) + 1 )) status=none
      [ $((i % 4)) -eq 0 ] && rm -f '${mnt}'/copy.$((i-2))
      sleep 0.05
    done
    wait`;
  return spawn('sh', ['-c', script], { stdio: 'ignore' });
}

function exited(p: ChildProcess): Promise<void> {
  if (p.exitCode !== null || p.signalCode !== null) return Promise.resolve();
  return new Promise((r) => p.once('exit', () => r()));
}

async function materializeAndCheck(t: Test, s: Awaited<ReturnType<typeof setup>>, pointId: string, cutId: string): Promise<void> {
  const r = await runCli(['test-failover', '--server', s.server.info.url, '--token-file', s.server.info.tokenFile, '--ca', s.server.info.caFile!,
    '--agent-id', s.agentId, '--point', pointId, '--json']).done;
  t.equal(r.code, 0, `test-failover ${pointId} succeeds: ${r.stderr}`);
  const j = JSON.parse(r.stdout) as { disks: { diskId: string; image: string }[] };
  const image = j.disks[0].image;
  let fsck = 0;
  try { sh('e2fsck', ['-fn', image]); } catch (err) { fsck = (err as { status: number }).status; }
  t.equal(fsck, 0, `e2fsck -fn of ${pointId} is clean`);
  const m = path.join(s.dir, `check-${pointId}`);
  await fsp.mkdir(m);
  sh('mount', ['-o', 'ro,loop,noload', image, m]);
  try {
    const want = await fsp.readFile(path.join(s.sums, cutId), 'utf8');
    const nfiles = want.split('\n').filter(Boolean).length;
    let ok = true;
    let out = '';
    try { out = execFileSync('sha256sum', ['-c', '--quiet', path.join(s.sums, cutId)], { cwd: m, encoding: 'utf8' }); } catch (err) { ok = false; out = String((err as { stdout: string }).stdout); }
    t.ok(ok, `${pointId}: all ${nfiles} files match the checksums taken inside its frozen window ${out.slice(0, 500)}`);
    const have = sh('sh', ['-c', `cd '${m}' && find . -type f ! -name lost+found | sort`]).split('\n').filter(Boolean).length;
    t.equal(have, nfiles, `${pointId}: the image holds exactly the files present at the cut`);
  } finally {
    sh('umount', [m]);
  }
  const c = await runCli(['test-failover', '--server', s.server.info.url, '--token-file', s.server.info.tokenFile, '--ca', s.server.info.caFile!,
    '--agent-id', s.agentId, '--point', pointId, '--cleanup']).done;
  t.equal(c.code, 0, 'cleanup succeeds');
  t.notOk(fs.existsSync(path.dirname(image)), 'cleanup removed the images');
}

t.test('ext4 under fio/dd load: cuts, kill -9 without rescan, every point fsck-clean with matching files', async (t) => {
  const s = await setup(t);
  let agent = new Agent(s.args(['--crash-interval', '15s', '--app-interval', '60m']));
  t.teardown(() => agent.stop());
  const started = await agent.waitEvent((e) => e.event === 'started', 30_000, 'start');
  t.equal(started.trackerResumed, false, 'first start creates the trace instance');
  await agent.waitEvent((e) => e.event === 'pass-done' && e.kind === 'initial', 120_000, 'initial sync');
  const points: { pointId: string; cutId: string; kind: string }[] = [];
  const first = await agent.waitEvent((e) => e.event === 'cut', 60_000, 'the first cut');
  t.equal(first.kind, 'app', 'the first point after the initial sync is app-consistent');
  points.push({ pointId: String(first.pointId), cutId: String(first.cutId), kind: 'app' });

  const load = workload(s.mnt, 40);
  t.teardown(() => { load.kill('SIGKILL'); });
  await sleep(2000);
  for (const kind of ['crash', 'app', 'crash'] as const) {
    const c = await agent.cut(kind);
    t.equal(c.event, 'cut', `${kind} cut under load succeeds ${JSON.stringify(c)}`);
    if (c.event === 'cut') points.push({ pointId: String(c.pointId), cutId: String(c.cutId), kind });
    t.equal(load.exitCode, null, `the load was still running when the ${kind} cut was recorded`);
    await sleep(1500);
  }
  // the load really ran through the cuts: the states they captured differ
  const underLoad = await Promise.all(points.slice(1).map((p) => fsp.readFile(path.join(s.sums, p.cutId), 'utf8')));
  t.equal(new Set(underLoad).size, underLoad.length, `the cuts under load captured different states (${underLoad.map((x) => x.split('\n').length - 1).join(', ')} files)`);
  const hooksLog = await fsp.readFile(path.join(s.dir, 'hooks.log'), 'utf8');
  const appCuts = points.filter((p) => p.kind === 'app').map((p) => p.cutId);
  for (const id of appCuts) {
    t.match(hooksLog, new RegExp(`pre-freeze ${id} app\\npost-thaw ${id} app`), `pre-freeze then post-thaw hooks ran around app cut ${id}`);
  }
  t.notMatch(hooksLog, new RegExp(`pre-freeze (${points.filter((p) => p.kind === 'crash').map((p) => p.cutId).join('|')}) `), 'crash cuts run no pre-freeze hooks');

  // kill -9 under load; the trace instance keeps recording; restart: no rescan
  await agent.kill9();
  await sleep(1500);
  agent = new Agent(s.args(['--crash-interval', '15s', '--app-interval', '60m']));
  const again = await agent.waitEvent((e) => e.event === 'started', 30_000, 'restart');
  t.equal(again.trackerResumed, true, 'the trace instance survived the agent');
  // The one window that costs a scan: killed inside a read of trace_pipe (the kernel has handed
  // the events over, the journal has not recorded them). It is reported with this reason and
  // answered with a checksum scan against the digest map, never a full copy.
  const reason = (again.scanRequired as Record<string, string | null>).d0;
  t.ok(reason === null || reason === TORN_READ, `no scan required after kill -9, or only for the documented read window (${String(reason)})`);
  if (reason !== null) t.comment(`kill -9 landed inside a trace read: ${reason}`);
  await agent.waitEvent((e) => e.event === 'state' && e.state === 'continuous', 30_000, 'continuous after restart');
  const c2 = await agent.cut('crash');
  t.equal(c2.event, 'cut', 'a cut after the restart succeeds');
  if (c2.event === 'cut') points.push({ pointId: String(c2.pointId), cutId: String(c2.cutId), kind: 'crash' });
  await exited(load);
  const c3 = await agent.cut('app');
  t.equal(c3.event, 'cut', 'a cut after the load succeeds');
  if (c3.event === 'cut') points.push({ pointId: String(c3.pointId), cutId: String(c3.cutId), kind: 'app' });
  if (reason === null) {
    t.notOk(agent.find((e) => e.event === 'pass'), 'the restarted agent ran no scan pass at all');
    t.notOk(agent.find((e) => e.event === 'state' && (e.state === 'resync-required' || e.state === 'resyncing')), 'and never left the continuous state');
  } else {
    t.ok(agent.events.filter((e) => e.event === 'pass').every((e) => e.kind !== 'initial'), 'the scan was a checksum scan, not a new initial copy');
  }

  // status shows the disk continuous with an RPO
  const st = await runCli(['status', '--server', s.server.info.url, '--token-file', s.server.info.tokenFile, '--ca', s.server.info.caFile!, '--json']).done;
  t.equal(st.code, 0, 'status works');
  const disk = (JSON.parse(st.stdout) as { disks: { agent: string; disk: string; state: string; rpoMs: number; points: number }[] }).disks.find((d) => d.agent === s.agentId);
  t.equal(disk?.state, 'continuous', 'status: continuous');
  t.ok(disk && disk.rpoMs >= 0 && disk.rpoMs < 60_000, `status: RPO ${disk?.rpoMs} ms`);
  // the 15 s schedule adds crash-consistent points of its own
  t.ok(disk && disk.points >= points.length, `status: every point is in the catalog (${disk?.points} >= ${points.length})`);

  for (const p of points) await materializeAndCheck(t, s, p.pointId, p.cutId);
  await agent.stop();
});

t.test('a trace buffer overrun goes resync-required, then resyncing, then continuous, and the next point is exact', async (t) => {
  const s = await setup(t, 128);
  // 1 KiB asks for the smallest buffer the kernel allows (a few pages per CPU)
  const agent = new Agent(s.args(['--crash-interval', '15s', '--trace-buffer-kb', '1']));
  t.teardown(() => agent.stop());
  await agent.waitEvent((e) => e.event === 'cut', 120_000, 'the first cut');
  const load = workload(s.mnt, 4, true);
  await exited(load);
  const req = await agent.waitEvent((e) => e.event === 'state' && e.state === 'resync-required', 30_000, 'resync-required');
  t.match(String(req.reason), /overran|lost/, `the reason names the loss: ${String(req.reason)}`);
  await agent.waitEvent((e) => e.event === 'state' && e.state === 'resyncing', 30_000, 'resyncing');
  const scan = await agent.waitEvent((e) => e.event === 'pass-done' && e.kind === 'incremental', 60_000, 'the resync scan');
  t.ok(Number(scan.bytesSent) < 128 * 1024 * 1024, `the resync scan sends only differences (${String(scan.bytesSent)} bytes on the wire)`);
  await agent.waitEvent((e) => e.event === 'state' && e.state === 'continuous' && agent.events.indexOf(e) > agent.events.indexOf(scan), 30_000, 'continuous again');
  let c = await agent.cut('app');
  if (c.event !== 'cut') c = await agent.cut('app'); // a loss during the first attempt is retried once
  t.equal(c.event, 'cut', `a cut after the resync succeeds ${JSON.stringify(c)}`);
  await materializeAndCheck(t, s, String(c.pointId), String(c.cutId));
  await agent.stop();

  // a lost trace instance (as after a reboot): a scan against the digest map, never a full copy
  const inst = `/sys/kernel/tracing/instances/mobility-${s.agentId}`;
  fs.writeFileSync(`${inst}/events/block/block_rq_complete/enable`, '0');
  fs.rmdirSync(inst);
  sh('dd', ['if=/dev/urandom', `of=${s.mnt}/while-untracked`, 'bs=64k', 'count=40', 'status=none']);
  sh('sync', []);
  const again = new Agent(s.args(['--crash-interval', '15s']));
  t.teardown(() => again.stop());
  const st = await again.waitEvent((e) => e.event === 'started', 30_000, 'restart');
  t.equal(st.trackerResumed, false, 'the instance was gone');
  t.match(String((st.scanRequired as Record<string, string>).d0), /not running/, 'so the disk needs a scan, with the reason');
  const rescan = await again.waitEvent((e) => e.event === 'pass-done', 60_000, 'the scan');
  t.equal(rescan.kind, 'incremental', 'an incremental scan against the digest map');
  t.ok(Number(rescan.bytesSent) < 16 * 1024 * 1024, `that ships only what changed (${String(rescan.bytesSent)} bytes on the wire for a 128 MiB disk)`);
  const c2 = await again.cut('app');
  t.equal(c2.event, 'cut', 'then cuts work again');
  await materializeAndCheck(t, s, String(c2.pointId), String(c2.cutId));
  await again.stop();
});

t.test('failover (final cut, promoted image, replication stopped), then reprotect pulls only the differences and protection resumes', async (t) => {
  const s = await setup(t, 128);
  const conn = ['--server', s.server.info.url, '--token-file', s.server.info.tokenFile, '--ca', s.server.info.caFile!];
  let agent = new Agent(s.args(['--crash-interval', '15s']));
  t.teardown(() => agent.stop());
  await agent.waitEvent((e) => e.event === 'cut', 120_000, 'the first cut');
  // written after the last cut: only a final cut brings it into the promoted image
  sh('dd', ['if=/dev/urandom', `of=${s.mnt}/late`, 'bs=64k', 'count=32', 'status=none']);
  sh('sync', []);
  const lateSum = sh('sha256sum', [`${s.mnt}/late`]).split(' ')[0];
  const fo = await runCli(['failover', ...conn, '--agent-id', s.agentId, '--json']).done;
  t.equal(fo.code, 0, `failover succeeds ${fo.stderr}`);
  const r = JSON.parse(fo.stdout) as { point: { id: string }; finalCut: { requested: boolean; pointId: string | null }; disks: { image: string }[] };
  t.ok(r.finalCut.requested && r.finalCut.pointId === r.point.id, `failed over to the final cut ${r.point.id}`);
  const code = await agent.exited;
  t.not(code, 0, 'the protecting agent stopped');
  t.match(agent.stderr, /MOB_ERR_FAILED_OVER/, 'with MOB_ERR_FAILED_OVER');
  const st = await runCli(['status', ...conn, '--json']).done;
  t.equal((JSON.parse(st.stdout) as { disks: { agent: string; state: string }[] }).disks.find((d) => d.agent === s.agentId)?.state, 'failed-over', 'status: failed-over');
  const again = new Agent(s.args());
  t.not(await again.exited, 0, 'a new protect session is refused while failed over');
  t.match(again.stderr, /MOB_ERR_FAILED_OVER/);

  // the recovered machine runs on the promoted image: check it, then change it
  const image = r.disks[0].image;
  let fsck = 0;
  try { sh('e2fsck', ['-fn', image]); } catch (err) { fsck = (err as { status: number }).status; }
  t.equal(fsck, 0, 'the promoted image is fsck-clean');
  const rm = path.join(s.dir, 'recovered');
  await fsp.mkdir(rm);
  sh('mount', ['-o', 'loop', image, rm]);
  t.equal(sh('sha256sum', [`${rm}/late`]).split(' ')[0], lateSum, 'the final cut carried the last write');
  sh('dd', ['if=/dev/urandom', `of=${rm}/written-after-failover`, 'bs=64k', 'count=16', 'status=none']);
  const newSum = sh('sha256sum', [`${rm}/written-after-failover`]).split(' ')[0];
  await fsp.rm(path.join(rm, 'seed'));
  sh('umount', [rm]);
  const imageSum = sh('sha256sum', [image]).split(' ')[0];

  // fail back: the original disk must be unmounted
  const mounted = await runCli(['reprotect', ...conn, '--agent-id', s.agentId, '--disk', `${s.loop}=d0`]).done;
  t.not(mounted.code, 0, 'reprotect refuses a mounted disk');
  t.match(mounted.stderr, /MOB_ERR_CONFIG.*mounted/);
  sh('umount', [s.mnt]);
  const rp = await runCli(['reprotect', ...conn, '--agent-id', s.agentId, '--disk', `${s.loop}=d0`, '--json']).done;
  t.equal(rp.code, 0, `reprotect succeeds ${rp.stderr}`);
  const res = JSON.parse(rp.stdout) as { disks: { pagesPulled: number; bytesPulled: number; sizeBytes: number }[] };
  t.ok(res.disks[0].pagesPulled > 0, `pulled ${res.disks[0].pagesPulled} differing pages`);
  t.ok(res.disks[0].bytesPulled < res.disks[0].sizeBytes / 8, `only the differences travelled (${res.disks[0].bytesPulled} of ${res.disks[0].sizeBytes} bytes)`);
  t.equal(sh('sha256sum', [s.loop]).split(' ')[0], imageSum, 'the original disk now equals the promoted image');
  const replica = path.join(s.server.info.dataDir, 'replicas', s.agentId, 'd0', 'replica.img');
  t.equal(sh('sha256sum', [replica]).split(' ')[0], imageSum, 'and the promoted image is the replica now');
  sh('mount', ['-o', 'noatime', s.loop, s.mnt]);
  t.equal(sh('sha256sum', [`${s.mnt}/written-after-failover`]).split(' ')[0], newSum, 'the recovered machine\'s writes are on the original disk');
  t.notOk(fs.existsSync(path.join(s.mnt, 'seed')), 'and its deletions too');

  // protection resumes: a checksum resync finds nothing to send, then cuts work again
  agent = new Agent(s.args(['--crash-interval', '15s']));
  const pass = await agent.waitEvent((e) => e.event === 'pass-done', 120_000, 'the first pass after failback');
  t.equal(pass.kind, 'resync', 'the first pass after failback is a checksum resync');
  t.ok(Number(pass.blocksSent) <= 64, `and ships almost nothing (${String(pass.blocksSent)} blocks)`);
  const c = await agent.waitEvent((e) => e.event === 'cut', 60_000, 'a cut after failback');
  t.equal(c.pointId, 'rp-000001', 'a new timeline of recovery points starts');
  await agent.stop();
});

t.test('the server killed at any instant of cuts under load leaves every recovery point complete or absent', async (t) => {
  const s = await setup(t, 128);
  const port = s.server.info.port;
  let server = s.server;
  t.teardown(() => stopServer(server));
  const agent = new Agent(s.args(['--crash-interval', '15s']));
  t.teardown(() => agent.stop());
  await agent.waitEvent((e) => e.event === 'cut', 120_000, 'the first cut');
  const load = workload(s.mnt, 30);
  t.teardown(() => { load.kill('SIGKILL'); });
  for (let k = 0; k < 4; k++) {
    const before = agent.events.length;
    agent.child.kill(k % 2 ? 'SIGUSR1' : 'SIGUSR2');
    await sleep(200 + k * 400); // a different moment of the cut each time
    server.child.kill('SIGKILL');
    await new Promise((r) => server.child.once('exit', r));
    server = await spawnServer(path.join(s.dir, 'srv'), { port });
    await agent.waitEvent((e) => agent.events.indexOf(e) >= before && e.event === 'connected', 60_000, `reconnect after server kill ${k + 1}`);
  }
  await exited(load);
  const last = await agent.cut('app');
  t.equal(last.event, 'cut', 'cuts work after the kills');
  const conn = ['--server', server.info.url, '--token-file', server.info.tokenFile, '--ca', server.info.caFile!];
  const pts = await runCli(['points', ...conn, '--agent-id', s.agentId, '--json']).done;
  const points = (JSON.parse(pts.stdout) as { points: { id: string; cutId?: number }[] }).points;
  t.ok(points.length >= 2, `${points.length} recovery points survived`);
  let checked = 0;
  for (const p of points) {
    if (!p.cutId || !fs.existsSync(path.join(s.sums, String(p.cutId)))) continue;
    await materializeAndCheck(t, { ...s, server }, p.id, String(p.cutId));
    checked++;
  }
  t.equal(checked, points.length, 'every point in the catalog is complete: fsck-clean with the files of its cut');
  await agent.stop();
});

t.test('failures are explained: a failing pre-freeze hook downgrades the cut, a freeze past its bound is thawed and reported', async (t) => {
  const s = await setup(t, 64);
  const agent = new Agent(s.args(['--crash-interval', '15s', '--freeze-limit', '1s']));
  t.teardown(() => agent.stop());
  await agent.waitEvent((e) => e.event === 'cut', 120_000, 'the first cut');
  await fsp.writeFile(path.join(s.hooks, 'pre-freeze', '20-fail'), '#!/bin/sh\necho "database refused to quiesce" >&2\nexit 3\n', { mode: 0o755 });
  const c = await agent.cut('app');
  t.equal(c.event, 'cut', 'the cut is still made');
  t.equal(c.kind, 'crash', 'but recorded as crash-consistent');
  t.match(String(c.note), /pre-freeze hook failed/, `with a note: ${String(c.note)}`);
  t.ok(agent.find((e) => e.event === 'hook' && e.ok === false && /quiesce/.test(String(e.output))), 'the hook failure and its output are reported');
  const hooksLog = await fsp.readFile(path.join(s.dir, 'hooks.log'), 'utf8');
  t.match(hooksLog, new RegExp(`post-thaw ${String(c.cutId)} app`), 'post-thaw hooks still ran');
  await fsp.rm(path.join(s.hooks, 'pre-freeze', '20-fail'));

  // a frozen-phase hook that takes longer than the 1 s freeze bound
  await fsp.writeFile(path.join(s.hooks, 'frozen', '20-slow'), '#!/bin/sh\nsleep 5\n', { mode: 0o755 });
  const f = await agent.cut('crash');
  t.equal(f.event, 'cut-failed', 'the cut fails');
  t.equal(f.code, 'MOB_ERR_FREEZE', `with MOB_ERR_FREEZE: ${String(f.message)}`);
  // thawed: a write completes at once
  const t0 = Date.now();
  sh('dd', ['if=/dev/zero', `of=${s.mnt}/after-thaw`, 'bs=4k', 'count=1', 'conv=fsync', 'status=none']);
  t.ok(Date.now() - t0 < 3000, 'the filesystem was thawed');
  await sleep(3500); // let a health report carry the failure
  const st = await runCli(['status', '--server', s.server.info.url, '--token-file', s.server.info.tokenFile, '--ca', s.server.info.caFile!, '--json']).done;
  const d = (JSON.parse(st.stdout) as { disks: { agent: string; freezeFailures: number }[] }).disks.find((x) => x.agent === s.agentId);
  t.ok(d && d.freezeFailures >= 1, `status reports the freeze failure (${d?.freezeFailures})`);
  await fsp.rm(path.join(s.hooks, 'frozen', '20-slow'));
  const ok = await agent.cut('crash');
  t.equal(ok.event, 'cut', 'the next cut succeeds once the hook is gone');
  await agent.stop();
});

t.test('repeated kill -9 of the agent under heavy churn never costs a rescan, and the next point is exact', async (t) => {
  const s = await setup(t, 128);
  let agent = new Agent(s.args(['--crash-interval', '15s']));
  t.teardown(() => agent.stop());
  await agent.waitEvent((e) => e.event === 'cut', 120_000, 'the first cut');
  const load = workload(s.mnt, 40);
  t.teardown(() => { load.kill('SIGKILL'); });
  let rescans = 0;
  let readWindow = 0;
  const why: string[] = [];
  for (let k = 0; k < 6; k++) {
    await sleep(700 + Math.floor(Math.random() * 900)); // a random moment of the 100 ms drain cycle
    await agent.kill9();
    agent = new Agent(s.args(['--crash-interval', '15s']));
    const st = await agent.waitEvent((e) => e.event === 'started', 30_000, `restart ${k + 1}`);
    const r = (st.scanRequired as Record<string, string | null>).d0;
    if (r === TORN_READ && st.trackerResumed === true) readWindow++;
    else if (r !== null || st.trackerResumed !== true) {
      rescans++;
      why.push(`restart ${k + 1}: trackerResumed ${String(st.trackerResumed)}, ${String(r)}`);
    }
    await agent.waitEvent((e) => e.event === 'state', 30_000, `state after restart ${k + 1}`);
  }
  t.equal(rescans, 0, `six kills -9 at random moments under load, no rescan other than the documented trace-read window${why.length ? ` (${why.join('; ')})` : ''}`);
  t.comment(`${readWindow} of 6 kills landed inside a trace read and cost a checksum scan`);
  await exited(load);
  const c = await agent.cut('app');
  t.equal(c.event, 'cut', 'a cut after the kills');
  await materializeAndCheck(t, s, String(c.pointId), String(c.cutId));
  await agent.stop();
});
