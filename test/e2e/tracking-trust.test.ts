/**
 * A recovery point is never silently wrong (issue 10), with real things: ext4 on a loop device,
 * a real `mobility protect` process and its tracefs instance, a real server.
 *  - The incident: something else switches tracking off under a running agent (the event's
 *    enable, the filter, tracing_on). The agent notices within its check interval, the disk goes
 *    resync-required with the reason (status shows it), no point is recorded until a scan ran,
 *    and the next point holds every write made while tracking was off.
 *  - The instance cannot be removed under the agent (rmdir is refused and changes nothing).
 *  - A replica page damaged behind the server's back is caught by the next cut's sampled
 *    verification (MOB_ERR_POINT_UNVERIFIED naming the page), repaired by a checksum resync,
 *    and the next point is exact.
 *
 * Needs root, losetup, mkfs.ext4, e2fsck, fsfreeze and tracefs: a missing one fails the test.
 */
import t, { type Test } from 'tap';
import { execFileSync, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import readline from 'node:readline';
import { CLI_PATH } from '../../src/server/spawn.js';
import { type Cleanup } from '../cleanup.js';
import { runCli, sleep, waitFor } from '../helpers.js';
import { materializeAndCheck, setup as protectSetup } from '../protect-harness.js';

const TRACEFS = '/sys/kernel/tracing';
const sh = (cmd: string, args: string[]) => execFileSync(cmd, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });

interface Ev { event: string; at: number; [k: string]: unknown }

class Agent {
  events: Ev[] = [];
  child: ChildProcess;
  stderr = '';
  exited: Promise<number | null>;
  constructor(c: Cleanup, args: string[], env: NodeJS.ProcessEnv = {}) {
    // its own process group, killed by the cleanup scope whatever ends the test (a tap timeout too)
    this.child = c.spawn(process.execPath, [CLI_PATH, 'protect', ...args], { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, ...env } });
    readline.createInterface({ input: this.child.stdout! }).on('line', (l) => {
      try { this.events.push({ ...(JSON.parse(l) as Ev), at: Date.now() }); } catch { /* not an event */ }
    });
    this.child.stderr!.on('data', (d: Buffer) => { this.stderr = (this.stderr + d.toString()).slice(-200_000); });
    this.exited = new Promise((r) => this.child.once('exit', (code) => r(code)));
  }
  async waitEvent(pred: (e: Ev) => boolean, ms: number, what: string, from = 0): Promise<Ev> {
    const match = (e: Ev) => this.events.indexOf(e) >= from && pred(e);
    await waitFor(() => this.events.some(match) || this.child.exitCode !== null, ms, what).catch((err: Error) => {
      throw new Error(`${err.message}\nevents: ${JSON.stringify(this.events.slice(-20))}\nstderr: ${this.stderr.slice(-3000)}`);
    });
    const e = this.events.find(match);
    if (!e) throw new Error(`agent exited (${this.child.exitCode}) before ${what}: ${this.stderr.slice(-3000)}`);
    return e;
  }
  async cut(kind: 'app' | 'crash', ms = 90_000): Promise<Ev> {
    const from = this.events.length;
    this.child.kill(kind === 'app' ? 'SIGUSR1' : 'SIGUSR2');
    return this.waitEvent((e) => e.event === 'cut' || e.event === 'cut-failed', ms, `a ${kind} cut`, from);
  }
  async stop(): Promise<void> {
    if (this.child.exitCode !== null || this.child.signalCode !== null) return;
    this.child.kill('SIGTERM');
    await this.exited;
  }
}

/** The protect harness's ext4-on-loop setup (cleanup registry, checksum hook), cuts only on request. */
async function setup(t: Test, sizeMb = 128) {
  const h = await protectSetup(t, sizeMb);
  const conn = ['--server', h.server.info.url, '--token-file', h.server.info.tokenFile, '--ca', h.server.info.caFile!];
  // the agent's instance (not its shadow, NAME.shadow)
  const instances = () => fs.readdirSync(path.join(TRACEFS, 'instances')).filter((n) => n.startsWith(`mobility-${h.agentId}-`) && !n.endsWith('.shadow'));
  const args = (extra: string[] = []) => h.args(['--crash-interval', '60m', '--app-interval', '60m', ...extra]);
  return { ...h, conn, instances, args };
}

type Setup = Awaited<ReturnType<typeof setup>>;

async function statusOf(s: Setup): Promise<{ state: string; reason: string; points: number }> {
  const st = await runCli(['status', ...s.conn, '--json']).done;
  const d = (JSON.parse(st.stdout) as { disks: { agent: string; state: string; reason: string; points: number }[] }).disks.find((x) => x.agent === s.agentId);
  return { state: d?.state ?? '?', reason: d?.reason ?? '', points: d?.points ?? 0 };
}


t.test('tracking switched off under a running agent is noticed, rescanned, and no point misses a write', async (t) => {
  const s = await setup(t);
  const agent = new Agent(s.c, s.args());
  t.teardown(() => agent.stop());
  await agent.waitEvent((e) => e.event === 'cut', 120_000, 'the first point');
  const [inst] = s.instances();
  t.ok(inst, `the agent's instance is named for its installation (${inst})`);
  const dir = path.join(TRACEFS, 'instances', inst!);

  // the instance cannot be removed under the agent, and a refused rmdir changes nothing
  t.throws(() => fs.rmdirSync(dir), /EBUSY/, 'rmdir of the instance in use is refused');

  const sabotage: [string, string, RegExp][] = [
    ['events/block/block_rq_complete/enable', '0', /tracking was disabled: events\/block\/block_rq_complete\/enable is 0/],
    ['events/block/block_rq_complete/filter', 'dev == 1', /tracking was disabled: events\/block\/block_rq_complete\/filter is dev == 1 \(set: dev == \d+\)/],
    ['tracing_on', '0', /tracking was disabled: tracing_on is 0/],
  ];
  let n = 0;
  for (const [file, value, want] of sabotage) {
    n++;
    const from = agent.events.length;
    const pointsBefore = (await statusOf(s)).points;
    fs.writeFileSync(path.join(dir, file), `${value}\n`);
    const offAt = Date.now();
    // written while tracking is off (direct I/O: the blocks reach the disk during dd, not at a later
    // flush): only a scan can find it
    sh('dd', ['if=/dev/urandom', `of=${s.mnt}/untracked-${n}`, 'bs=64k', 'count=48', 'oflag=direct', 'conv=fsync', 'status=none']);
    const writtenAt = Date.now();
    const req = await agent.waitEvent((e) => e.event === 'state' && e.state === 'resync-required', 60_000, `resync-required after ${file} = ${value}`, from);
    t.match(String(req.reason), want, `noticed with the reason: ${String(req.reason)}`);
    t.comment(`${file} = ${value}: noticed ${req.at - offAt} ms after it was switched off (self-check every second)`);
    // status shows it at once (the state change is reported immediately, not at the next periodic report)
    await waitFor(async () => (await statusOf(s)).state !== 'continuous' || agent.events.some((e, i) => i > from && e.event === 'pass-done'), 30_000, 'status shows the loss');
    const st = await statusOf(s);
    if (st.state !== 'continuous') t.match(st.reason, /tracking was disabled/, `status: ${st.state}, ${st.reason}`);
    const now = fs.readFileSync(path.join(dir, file), 'utf8').trim();
    t.ok(file.endsWith('filter') ? now !== value && now.startsWith('dev == ') : now === '1', `${file} was re-armed by the agent (${now})`);
    const scan = await agent.waitEvent((e) => e.event === 'pass-done', 120_000, 'the rescan', from);
    t.equal(scan.kind, 'incremental', 'an incremental scan against the digest map, not a full copy');
    if (req.at >= writtenAt) {
      t.ok(Number(scan.bytesSent) >= 48 * 65536 * 0.9, `the scan shipped the untracked write (${String(scan.bytesSent)} bytes)`);
    } else {
      // the agent re-armed tracking before dd was done: part of the write was tracked and shipped
      // as usual, so the scan need not find it; the point below still must hold the file
      t.comment(`the agent noticed the loss ${writtenAt - Number(req.at)} ms before the write ended: the scan shipped ${String(scan.bytesSent)} bytes`);
    }
    const cutsBetween = agent.events.slice(from, agent.events.indexOf(scan)).filter((e) => e.event === 'cut');
    t.equal(cutsBetween.length, 0, 'no point was recorded between the loss and the end of the rescan');
    t.ok((await statusOf(s)).points >= pointsBefore, 'points before the loss are kept');
    const c = await agent.cut('app');
    t.equal(c.event, 'cut', `a point after the rescan ${JSON.stringify(c)}`);
    t.ok(Number(c.samplePages) > 0, `the point carries sampled evidence (${String(c.samplePages)} pages, ${String(c.sampleWaitMs)} ms waited for them inside the freeze)`);
    await materializeAndCheck(t, s, String(c.pointId), String(c.cutId));
  }
  await agent.stop();

  // while the agent is down (upgrade, restart) someone removes the instance and recreates a
  // look-alike with the same settings: what happened in between is not in it
  const settings = ['buffer_size_kb', 'events/block/block_rq_complete/filter'].map((f) => fs.readFileSync(path.join(dir, f), 'utf8').trim());
  fs.rmdirSync(dir);
  sh('dd', ['if=/dev/urandom', `of=${s.mnt}/while-down`, 'bs=64k', 'count=32', 'conv=fsync', 'status=none']);
  fs.mkdirSync(dir);
  fs.writeFileSync(path.join(dir, 'buffer_size_kb'), `${/^\d+/.exec(settings[0]!)![0]}\n`);
  fs.writeFileSync(path.join(dir, 'options/overwrite'), '0\n');
  fs.writeFileSync(path.join(dir, 'events/block/block_rq_complete/filter'), `${settings[1]}\n`);
  fs.writeFileSync(path.join(dir, 'events/block/block_rq_complete/enable'), '1\n');
  fs.writeFileSync(path.join(dir, 'tracing_on'), '1\n');
  const again = new Agent(s.c, s.args());
  t.teardown(() => again.stop());
  const st = await again.waitEvent((e) => e.event === 'started', 60_000, 'restart');
  t.match(String((st.scanRequired as Record<string, string>).d0), /removed and recreated while the agent was down/, `a look-alike instance is not trusted: ${JSON.stringify(st.scanRequired)}`);
  const rescan = await again.waitEvent((e) => e.event === 'pass-done', 120_000, 'the rescan');
  t.equal(rescan.kind, 'incremental', 'an incremental scan against the digest map');
  t.ok(Number(rescan.bytesSent) >= 32 * 65536 * 0.9, `which ships the write made in between (${String(rescan.bytesSent)} bytes)`);
  const c = await again.cut('app');
  t.equal(c.event, 'cut', 'then a point');
  await materializeAndCheck(t, s, String(c.pointId), String(c.cutId));
  await again.stop();
});

t.test('a replica page damaged behind the server is caught by the next cut, resynced, and the next point is exact', async (t) => {
  const s = await setup(t, 64);
  // the seed file's first page on disk: found via the filesystem, so the test damages real data
  const fiemap = sh('filefrag', ['-e', '-b4096', `${s.mnt}/seed`]);
  const firstBlock = Number(/^\s*0:\s+0\.\.\s*\d+:\s+(\d+)\.\./m.exec(fiemap)?.[1]);
  t.ok(Number.isInteger(firstBlock) && firstBlock > 0, `seed starts at 4 KiB block ${firstBlock}`);
  const page = firstBlock + 3;
  const agent = new Agent(s.c, s.args(), { MOBILITY_CUT_SAMPLE_INCLUDE: `d0:${page}` });
  t.teardown(() => agent.stop());
  const first = await agent.waitEvent((e) => e.event === 'cut', 120_000, 'the first point');
  const replica = path.join(s.server.info.dataDir, 'replicas', s.agentId, 'd0', 'replica.img');
  const pointsBefore = (await statusOf(s)).points;

  // damage one page of the replica where the source is not being written
  const fd = fs.openSync(replica, 'r+');
  fs.writeSync(fd, Buffer.alloc(4096, 0x5a), 0, 4096, page * 4096);
  fs.fsyncSync(fd);
  fs.closeSync(fd);
  const from = agent.events.length;
  const bad = await agent.cut('crash');
  t.equal(bad.event, 'cut-failed', 'the cut is not recorded');
  t.equal(bad.code, 'MOB_ERR_POINT_UNVERIFIED', 'MOB_ERR_POINT_UNVERIFIED');
  t.match(String(bad.message), new RegExp(`page ${page} \\(byte ${page * 4096}\\): replica [0-9a-f]{16}, source [0-9a-f]{16}`), `the message names the page and both digests: ${String(bad.message)}`);
  const req = await agent.waitEvent((e) => e.event === 'state' && e.state === 'resync-required', 30_000, 'resync-required', from);
  t.match(String(req.reason), /sampled verification of cut \d+ failed/, `state reason: ${String(req.reason)}`);
  t.equal((await statusOf(s)).points, pointsBefore, 'no point was added');
  const scan = await agent.waitEvent((e) => e.event === 'pass-done', 120_000, 'the repair', from);
  t.equal(scan.kind, 'resync', 'a checksum resync against the replica (the digest map cannot see the damage)');
  t.ok(Number(scan.blocksSent) >= 1 && Number(scan.blocksSent) <= 16, `which ships only the damaged block (${String(scan.blocksSent)} blocks)`);
  const src = Buffer.alloc(4096);
  const sfd = fs.openSync(s.loop, 'r');
  fs.readSync(sfd, src, 0, 4096, page * 4096);
  fs.closeSync(sfd);
  await waitFor(() => {
    const r = Buffer.alloc(4096);
    const rfd = fs.openSync(replica, 'r');
    fs.readSync(rfd, r, 0, 4096, page * 4096);
    fs.closeSync(rfd);
    return r.equals(src);
  }, 30_000, 'the replica page equals the source again');
  t.pass('the damaged replica page equals the source again');
  const good = await agent.cut('app');
  t.equal(good.event, 'cut', `the next cut is recorded ${JSON.stringify(good)}`);
  t.not(good.pointId, first.pointId);
  await materializeAndCheck(t, s, String(good.pointId), String(good.cutId));
  const pts = await runCli(['points', ...s.conn, '--agent-id', s.agentId, '--json']).done;
  const all = (JSON.parse(pts.stdout) as { points: { id: string; verification?: Record<string, { pages: number }>; suspect?: { disks: string[] } }[] }).points;
  const rec = all.find((p) => p.id === good.pointId);
  t.ok(rec?.verification?.d0 && rec.verification.d0.pages > 0, `the catalog records the point's evidence (${JSON.stringify(rec?.verification)})`);
  t.notOk(rec?.suspect, 'the point recorded after the repair is not suspect');
  t.same(all.find((p) => p.id === first.pointId)?.suspect?.disks, ['d0'], 'the point recorded before the damage was found is marked suspect (it may hold the damage)');
  await agent.stop();
  await sleep(100);
});
