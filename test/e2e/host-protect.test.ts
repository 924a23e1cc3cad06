/**
 * Host mode end to end (issue 13): `mobility protect --qmp` protects the disks of a running QEMU
 * (a real qemu-storage-daemon with qcow2 or raw images) while "guests" write to them through the
 * daemon's NBD exports with qemu-io, and a real `mobility server` keeps the replicas and points.
 *
 * What a point must be: the disks at one instant. Each guest is one qemu-io process running a
 * long list of 64 KiB writes strictly one after another, each write filling its block with its
 * own pattern byte; QEMU's point transaction drains in-flight I/O, so the disk at the point's
 * instant is the state after the first k writes for some k. The test downloads every point's
 * test-failover image and checks that such a k exists (replaying the writes one by one and
 * counting the blocks that differ: a point is exact only when the count reaches zero).
 *
 * Also: kill -9 of the agent costs no rescan; a clean restart of QEMU with qcow2 images costs no
 * rescan (the bitmaps are stored in the images) and stops the agent with MOB_ERR_QMP; with a raw
 * image a QEMU restart is an explained resync; the last point equals the disks once the guests
 * stopped writing.
 *
 * Needs qemu-storage-daemon, qemu-img, qemu-io, nbdinfo, nbdcopy and /dev/fuse: a missing one fails.
 */
import t, { type Test } from 'tap';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import path from 'node:path';
import crypto from 'node:crypto';
import type { ChildProcess } from 'node:child_process';
import { cleanup, type Cleanup } from '../cleanup.js';
import { prng, runCli, sleep, startServer } from '../helpers.js';
import { Agent, LONG, shAsync, type Ev } from '../protect-harness.js';
import { QemuDaemon, createImage, requireQemuTools } from '../source/qemu/qemu-daemon.js';
import { QmpClient } from '../../src/source/qemu/qmp.js';
import type { SpawnedServer } from '../../src/server/spawn.js';

const KiB = 1024;
const BLOCK = 64 * KiB;
const DISK_BYTES = 32 * 1024 * KiB;
const BLOCKS = DISK_BYTES / BLOCK;

interface Write { block: number; pattern: number }

/** A guest: one qemu-io process writing `writes` in order (with a short pause between) into export guest<disk>. */
class Guest {
  readonly writes: Write[] = [];
  child: ChildProcess | null = null;
  exited: Promise<void> = Promise.resolve();
  constructor(private readonly c: Cleanup, private readonly daemon: QemuDaemon, readonly disk: number, private readonly rng: () => number) {}

  /** Starts n more writes (appended to the model); the previous batch must have ended. */
  start(n: number, pauseMs = 4): void {
    const args = ['-f', 'raw'];
    for (let i = 0; i < n; i++) {
      const w = { block: Math.floor(this.rng() * BLOCKS / 2), pattern: 1 + ((this.writes.length) % 255) };
      this.writes.push(w);
      args.push('-c', `write -q -P ${w.pattern} ${w.block * BLOCK} ${BLOCK}`);
      if (pauseMs) args.push('-c', `sleep ${pauseMs}`);
    }
    args.push(`nbd+unix:///guest${this.disk}?socket=${this.daemon.nbdSocket}`);
    const child = this.c.spawn('qemu-io', args, { stdio: ['ignore', 'ignore', 'pipe'] });
    let err = '';
    child.stderr!.on('data', (d: Buffer) => { err += d.toString(); });
    this.child = child;
    this.exited = new Promise((resolve, reject) => child.once('exit', (code, sig) => (code === 0 || sig === 'SIGKILL' ? resolve() : reject(new Error(`qemu-io on guest${this.disk} exited ${code}: ${err}`)))));
    this.exited.catch(() => undefined);
  }

  get running(): boolean { return this.child !== null && this.child.exitCode === null && this.child.signalCode === null; }

  async finish(): Promise<void> { await this.exited; }
}

/**
 * The block patterns of an image (-1: a block that is not one byte repeated, which no state of
 * the guest ever had), and the number of writes k after which the guest's disk was exactly that
 * (the smallest such k), or null when no prefix of the writes gives it.
 */
function prefixOf(image: Buffer, writes: Write[], upTo = writes.length): number | null {
  const have = new Int16Array(BLOCKS);
  for (let b = 0; b < BLOCKS; b++) {
    const blk = image.subarray(b * BLOCK, (b + 1) * BLOCK);
    const v = blk[0]!;
    have[b] = blk.every((x) => x === v) ? v : -1;
  }
  const model = new Int16Array(BLOCKS); // zeros: fresh images
  let differ = 0;
  for (let b = 0; b < BLOCKS; b++) if (have[b] !== model[b]) differ++;
  if (differ === 0) return 0;
  for (let i = 0; i < upTo; i++) {
    const w = writes[i]!;
    const before = have[w.block] !== model[w.block];
    model[w.block] = w.pattern;
    const after = have[w.block] !== model[w.block];
    differ += Number(after) - Number(before);
    if (differ === 0) return i + 1;
  }
  return null;
}

/** Whether the image is the guest's disk after exactly the first k writes. */
function isStateAfter(image: Buffer, writes: Write[], k: number): boolean {
  const model = new Int16Array(BLOCKS);
  for (let i = 0; i < k; i++) model[writes[i]!.block] = writes[i]!.pattern;
  for (let b = 0; b < BLOCKS; b++) {
    const blk = image.subarray(b * BLOCK, (b + 1) * BLOCK);
    if (!blk.every((x) => x === model[b])) return false;
  }
  return true;
}

interface Rig {
  c: Cleanup; dir: string; daemon: QemuDaemon; server: SpawnedServer; agentId: string; state: string;
  args: (extra?: string[]) => string[];
}

async function rig(tt: Test, formats: ('qcow2' | 'raw')[]): Promise<Rig> {
  requireQemuTools();
  if (!fs.existsSync('/dev/fuse')) throw new Error('/dev/fuse is required (QEMU exports the disks to the agent through FUSE)');
  const c = cleanup(tt);
  const dir = c.dir('host-');
  const disks = formats.map((format, i) => {
    const image = path.join(dir, `vm-disk${i}.${format}`);
    createImage(image, format, String(DISK_BYTES));
    return { image, format };
  });
  const daemon = new QemuDaemon(c, dir, disks);
  await daemon.start();
  const server = await startServer(tt, path.join(dir, 'srv'));
  const agentId = `host-${process.pid}-${crypto.randomBytes(3).toString('hex')}`;
  const state = path.join(dir, 'agent');
  const args = (extra: string[] = []) => ['--server', server.info.url, '--token-file', server.info.tokenFile, '--ca', server.info.caFile!,
    '--qmp', daemon.qmpSocket, '--nbd-socket', daemon.nbdSocket, ...formats.flatMap((_, i) => ['--disk', `disk${i}=d${i}`]),
    '--agent-id', agentId, '--state-dir', state, '--json-logs', '--crash-interval', '15m', '--app-interval', '15m', ...extra];
  return { c, dir, daemon, server, agentId, state, args };
}

/** Downloads a point's test-failover images (one buffer per disk, in disk order) and cleans the test failover up. */
async function pointImages(tt: Test, r: Rig, pointId: string): Promise<Buffer[]> {
  const conn = ['--server', r.server.info.url, '--token-file', r.server.info.tokenFile, '--ca', r.server.info.caFile!, '--agent-id', r.agentId, '--point', pointId];
  const dl = path.join(r.dir, `tf-${pointId}`);
  const res = await runCli(['test-failover', ...conn, '--download', dl, '--json']).done;
  tt.equal(res.code, 0, `test-failover ${pointId}${res.code ? `: ${res.stderr.slice(-500)}` : ""}`);
  const j = JSON.parse(res.stdout) as { downloads: { diskId: string; file: string }[] };
  const out: Buffer[] = [];
  for (const d of [...j.downloads].sort((a, b) => a.diskId.localeCompare(b.diskId))) out.push(await fsp.readFile(d.file));
  const cl = await runCli(['test-failover', ...conn, '--cleanup']).done;
  tt.equal(cl.code, 0, 'test failover cleaned up');
  await fsp.rm(dl, { recursive: true, force: true });
  return out;
}

const continuousAll = (a: Agent, n: number) => (e: Ev) => e.event === 'state' && e.state === 'continuous' && new Set(a.events.filter((x) => x.event === 'state' && x.state === 'continuous').map((x) => x.disk)).size >= n;

t.test('host mode: points of two qcow2 disks are exact while the guests write; kill -9 and a QEMU restart cost no rescan', async (tt) => {
  const r = await rig(tt, ['qcow2', 'qcow2']);
  const rng = prng(1313);
  const guests = [0, 1].map((i) => new Guest(r.c, r.daemon, i, rng));
  let agent = new Agent(r.c, r.args());
  const started = await agent.waitEvent((e) => e.event === 'started', LONG, 'the agent started');
  tt.same(started.scanRequired, { d0: 'no tracking state (first start)', d1: 'no tracking state (first start)' }, 'first start: the disks are copied');
  await agent.waitEvent(continuousAll(agent, 2), LONG, 'both disks continuous');

  // the guests write while points are taken: each must be one instant of both disks
  for (const g of guests) g.start(3000);
  const points: { pointId: string; writesDone: number[] }[] = [];
  for (let i = 0; i < 3; i++) {
    const cut = await agent.cut('crash');
    tt.equal(cut.event, 'cut', `point ${i + 1} recorded while the guests write: ${JSON.stringify(cut)}`);
    tt.equal(cut.frozenMs, 0, 'a crash-consistent host-mode point does not pause or freeze the guest');
    points.push({ pointId: String(cut.pointId), writesDone: guests.map((g) => g.writes.length) });
  }
  // kill -9 while the guests write: the next agent resumes the bitmaps and its journal
  await agent.kill9();
  // as if it had been killed while a point's view existed (QEMU's side is removed by the next open)
  const stale = path.join(r.state, r.agentId, 'qemu', 'mvdead-0.qcow2');
  fs.writeFileSync(stale, 'x');
  agent = new Agent(r.c, r.args());
  const again = await agent.waitEvent((e) => e.event === 'started', LONG, 'the agent restarted');
  tt.notOk(fs.existsSync(stale), 'a view image a killed agent left is removed');
  tt.same(again.scanRequired, { d0: null, d1: null }, 'after kill -9: no rescan');
  tt.equal(again.trackerResumed, true, 'the bitmaps were resumed');
  await agent.waitEvent(continuousAll(agent, 2), LONG, 'continuous after the restart');
  const afterKill = await agent.cut('crash');
  tt.equal(afterKill.event, 'cut', 'a point after the restart');
  points.push({ pointId: String(afterKill.pointId), writesDone: guests.map((g) => g.writes.length) });
  tt.notOk(agent.events.some((e) => e.event === 'pass'), 'no scan pass after kill -9');

  for (const g of guests) await g.finish();
  const last = await agent.cut('crash');
  tt.equal(last.event, 'cut', 'a point after the guests stopped');
  const seen: number[][] = [];
  for (const p of [...points, { pointId: String(last.pointId), writesDone: guests.map((g) => g.writes.length) }]) {
    const imgs = await pointImages(tt, r, p.pointId);
    const ks = imgs.map((img, i) => prefixOf(img, guests[i]!.writes));
    tt.ok(ks.every((k) => k !== null), `point ${p.pointId}: each disk is exactly the state after a prefix of its guest's writes (${ks.join(', ')} of ${guests.map((g) => g.writes.length).join(', ')})`);
    seen.push(ks.map((k) => k ?? -1));
  }
  tt.ok(seen.slice(0, -1).some((ks) => ks.some((k) => k > 0 && k < 3000)), 'some point was taken while a guest was in the middle of its writes');
  const lastImgs = await pointImages(tt, r, String(last.pointId));
  tt.ok(lastImgs.every((img, i) => isStateAfter(img, guests[i]!.writes, guests[i]!.writes.length)), 'the last point holds every write');

  // a clean QEMU restart (qcow2: the bitmaps are stored in the images): the agent stops with MOB_ERR_QMP
  await r.daemon.stop('SIGTERM');
  const code = await agent.exited;
  tt.not(code, 0, 'the agent exits when QEMU goes away');
  tt.match(agent.stderr, /MOB_ERR_QMP/, 'and says why (MOB_ERR_QMP)');
  await r.daemon.start();
  guests[0]!.start(200, 0);
  await guests[0]!.finish();
  agent = new Agent(r.c, r.args());
  const third = await agent.waitEvent((e) => e.event === 'started', LONG, 'the agent started after the QEMU restart');
  tt.same(third.scanRequired, { d0: null, d1: null }, 'qcow2: a clean QEMU restart costs no rescan (writes made meanwhile are in the stored bitmap)');
  await agent.waitEvent(continuousAll(agent, 2), LONG, 'continuous');
  const fin = await agent.cut('crash');
  tt.equal(fin.event, 'cut', 'a point after the QEMU restart');
  const imgs = await pointImages(tt, r, String(fin.pointId));
  tt.ok(isStateAfter(imgs[0]!, guests[0]!.writes, guests[0]!.writes.length), 'it holds the writes made while the agent was down');
  tt.notOk(agent.events.some((e) => e.event === 'pass'), 'no scan pass');
  await agent.stop();
});

t.test('host mode, raw image: a QEMU restart loses the bitmap, and the agent says so and resyncs (no full copy)', async (tt) => {
  const r = await rig(tt, ['raw']);
  const rng = prng(77);
  const guest = new Guest(r.c, r.daemon, 0, rng);
  let agent = new Agent(r.c, r.args());
  await agent.waitEvent(continuousAll(agent, 1), LONG, 'continuous');
  guest.start(300, 0);
  await guest.finish();
  await agent.stop();
  await r.daemon.stop('SIGTERM');
  await r.daemon.start();
  guest.start(300, 0);
  await guest.finish();
  agent = new Agent(r.c, r.args());
  const st = await agent.waitEvent((e) => e.event === 'started', LONG, 'started');
  const why = (st.scanRequired as Record<string, string | null>).d0 ?? '';
  tt.match(why, /QEMU restarted|raw/, `the loss is explained: ${why}`);
  const pass = await agent.waitEvent((e) => e.event === 'pass-done', LONG, 'the resync');
  tt.equal(pass.kind, 'incremental', 'a scan against the digest map, not a full copy');
  tt.ok(Number(pass.bytesSent) < DISK_BYTES / 2, `only what differs was sent (${String(pass.bytesSent)} bytes)`);
  await agent.waitEvent(continuousAll(agent, 1), LONG, 'continuous again');
  const cut = await agent.cut('crash');
  tt.equal(cut.event, 'cut', 'a point after the resync');
  const imgs = await pointImages(tt, r, String(cut.pointId));
  tt.ok(isStateAfter(imgs[0]!, guest.writes, guest.writes.length), 'the point holds every write, those made while nothing tracked them included');
  await agent.stop();
});

t.test('host mode: failover to a final cut, then reprotect writes only the differences back into the VM\'s disk', async (tt) => {
  const r = await rig(tt, ['qcow2']);
  const conn = ['--server', r.server.info.url, '--token-file', r.server.info.tokenFile, '--ca', r.server.info.caFile!];
  const guest = new Guest(r.c, r.daemon, 0, prng(5));
  let agent = new Agent(r.c, r.args());
  await agent.waitEvent(continuousAll(agent, 1), LONG, 'continuous');
  guest.start(300, 0);
  await guest.finish();
  const fo = await runCli(['failover', ...conn, '--agent-id', r.agentId, '--yes', '--json']).done;
  tt.equal(fo.code, 0, `failover ${fo.code ? fo.stderr.slice(-800) : ''}`);
  const res = JSON.parse(fo.stdout) as { point: { id: string }; finalCut: { requested: boolean; pointId: string | null }; disks: { localPath: string | null }[] };
  tt.ok(res.finalCut.requested && res.finalCut.pointId === res.point.id, 'failed over to a final cut');
  tt.not(await agent.exited, 0, 'the protecting agent stopped');
  tt.match(agent.stderr, /MOB_ERR_FAILED_OVER/, 'with MOB_ERR_FAILED_OVER');
  const image = res.disks[0]!.localPath!;
  const promoted = await fsp.readFile(image);
  tt.ok(isStateAfter(promoted, guest.writes, guest.writes.length), 'the promoted image holds every write up to the failover');

  // the recovered VM runs on the promoted image and changes it
  const fd = fs.openSync(image, 'r+');
  fs.writeSync(fd, Buffer.alloc(BLOCK, 0xee), 0, BLOCK, 7 * BLOCK);
  fs.writeSync(fd, Buffer.alloc(BLOCK, 0xef), 0, BLOCK, (BLOCKS - 1) * BLOCK);
  fs.fsyncSync(fd);
  fs.closeSync(fd);
  const want = await fsp.readFile(image);

  const vmImage = r.daemon.disks[0]!.image;
  const running = await runCli(['reprotect', ...conn, '--agent-id', r.agentId, '--vm-images', '--disk', `${vmImage}=d0`, '--yes']).done;
  tt.not(running.code, 0, 'reprotect refuses the images of a VM that still runs');
  tt.match(running.stderr, /MOB_ERR_CONFIG.*in use/, `and says so: ${running.stderr.slice(-300)}`);
  await r.daemon.stop('SIGTERM');
  const rp = await runCli(['reprotect', ...conn, '--agent-id', r.agentId, '--vm-images', '--disk', `${vmImage}=d0`, '--yes', '--json']).done;
  tt.equal(rp.code, 0, `reprotect of the shut-down VM's image ${rp.code ? rp.stderr.slice(-800) : ''}`);
  const rr = JSON.parse(rp.stdout) as { disks: { pagesPulled: number; path: string }[] };
  tt.ok(rr.disks[0]!.pagesPulled >= 32 && rr.disks[0]!.pagesPulled < (4 * BLOCK) / 4096, `only the differing pages came back (${rr.disks[0]!.pagesPulled})`);
  tt.equal(rr.disks[0]!.path, vmImage, 'reported by image');
  // the VM starts again on its disk
  await r.daemon.start();
  const back = path.join(r.dir, 'back.raw');
  const cp = await shAsync('nbdcopy', [`nbd+unix:///guest0?socket=${r.daemon.nbdSocket}`, back]);
  tt.equal(cp.code, 0, `read the VM's disk back ${cp.stderr}`);
  tt.ok((await fsp.readFile(back)).equals(want), 'the VM\'s disk now equals the recovered image');

  agent = new Agent(r.c, r.args());
  const st = await agent.waitEvent((e) => e.event === 'started', LONG, 'started after the failback');
  tt.equal(st.trackerResumed, true, 'the bitmap stored in the image was resumed');
  await agent.waitEvent(continuousAll(agent, 1), LONG, 'protection resumes after the failback');
  const cut = await agent.cut('crash');
  tt.equal(cut.event, 'cut', 'and records points again');
  await agent.stop();
});

t.test('host mode: tracking switched off under the running agent (its bitmap disabled in QEMU) is noticed, re-armed, and answered with a scan', async (tt) => {
  const r = await rig(tt, ['qcow2']);
  const guest = new Guest(r.c, r.daemon, 0, prng(9));
  const agent = new Agent(r.c, r.args());
  await agent.waitEvent(continuousAll(agent, 1), LONG, 'continuous');
  const q = await QmpClient.connect(r.daemon.testQmpSocket);
  tt.teardown(() => q.close());
  const bitmaps = async () => (await q.execute<{ 'node-name': string; 'dirty-bitmaps'?: { name: string; recording: boolean }[] }[]>('query-named-block-nodes', { flat: true }))
    .find((n) => n['node-name'] === 'disk0')!['dirty-bitmaps'] ?? [];
  // the agent rotates its bitmap at every drain: a rotation between this query and the disable
  // replaces the bitmap the test disables (before any guest write: nothing is lost, and nothing
  // would be noticed). Disabled for real only when no bitmap records afterwards; else again.
  for (let i = 0; ; i++) {
    const active = (await bitmaps()).find((b) => b.recording)?.name;
    if (active) {
      await q.execute('block-dirty-bitmap-disable', { node: 'disk0', name: active }).catch(() => undefined);
      // (the agent may already have noticed and re-armed a new one)
      if (!(await bitmaps()).some((b) => b.recording) || agent.events.some((e) => e.event === 'tracking-lost')) break;
    }
    if (i > 50) throw new Error('could not disable the agent\'s recording bitmap (a rotation replaced it every time)');
    await sleep(50);
  }
  guest.start(200, 0);
  await guest.finish();
  const lost = await agent.waitEvent((e) => e.event === 'tracking-lost', LONG, 'the loss is noticed');
  tt.match(String(lost.reason), /disabled/, `named: ${String(lost.reason)}`);
  tt.equal(lost.repaired, true, 're-armed');
  const pass = await agent.waitEvent((e) => e.event === 'pass-done' && agent.events.indexOf(e) > agent.events.indexOf(lost), LONG, 'the scan');
  tt.equal(pass.kind, 'incremental', 'a scan against the digest map');
  await agent.waitEvent((e) => e.event === 'state' && e.state === 'continuous' && agent.events.indexOf(e) > agent.events.indexOf(pass), LONG, 'continuous again');
  const cut = await agent.cut('crash');
  tt.equal(cut.event, 'cut', 'a point after the scan');
  const imgs = await pointImages(tt, r, String(cut.pointId));
  tt.ok(isStateAfter(imgs[0]!, guest.writes, guest.writes.length), 'it holds the writes made while tracking was off');
  await agent.stop();
});

t.test('host mode: QEMU killed (-9) under the running agent: the agent stops, its dead exports are lifted at the next start, and the loss is explained', async (tt) => {
  const r = await rig(tt, ['qcow2']);
  const guest = new Guest(r.c, r.daemon, 0, prng(21));
  let agent = new Agent(r.c, r.args());
  await agent.waitEvent(continuousAll(agent, 1), LONG, 'continuous');
  const viewDir = path.join(r.state, r.agentId, 'qemu');
  const mounted = () => fs.readFileSync('/proc/self/mountinfo', 'utf8').split('\n').filter((l) => l.split(' ')[4]?.startsWith(`${viewDir}/`)).length;
  tt.ok(mounted() > 0, 'the agent reads the disk through a FUSE export in its state directory');
  await r.daemon.stop('SIGKILL');
  tt.not(await agent.exited, 0, 'the agent stops when QEMU is killed');
  tt.match(agent.stderr, /MOB_ERR_QMP/, 'and says why');
  await r.daemon.start();
  guest.start(100, 0);
  await guest.finish();
  agent = new Agent(r.c, r.args());
  const st = await agent.waitEvent((e) => e.event === 'started', LONG, 'the agent started after QEMU was killed');
  tt.match(String((st.scanRequired as Record<string, string | null>).d0), /inconsistent|killed|never stored/, `the loss is explained: ${String((st.scanRequired as Record<string, string | null>).d0)}`);
  await agent.waitEvent((e) => e.event === 'pass-done', LONG, 'the scan');
  await agent.waitEvent((e) => e.event === 'state' && e.state === 'continuous' && agent.events.some((x) => x.event === 'pass-done'), LONG, 'continuous again');
  const cut = await agent.cut('crash');
  tt.equal(cut.event, 'cut', 'points again');
  const imgs = await pointImages(tt, r, String(cut.pointId));
  tt.ok(isStateAfter(imgs[0]!, guest.writes, guest.writes.length), 'holding the writes made while nothing tracked them');
  await agent.stop();
  tt.equal(mounted(), 0, 'no export left mounted after a clean stop');
});
