/**
 * QemuTracker (src/source/tracker/qemu.ts) against a real qemu-storage-daemon: guest writes
 * made with qemu-io through the daemon's NBD exports, dirty extents drained over QMP + NBD.
 * Missing tools (qemu-storage-daemon, qemu-img, qemu-io, nbdinfo) make it fail, never skip.
 */
import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { QemuTracker } from '../../../src/source/tracker/qemu.js';
import { QmpClient } from '../../../src/source/qemu/qmp.js';
import type { DirtyExtent } from '../../../src/source/tracker/change-tracker.js';
import { cleanup } from '../../cleanup.js';
import { QemuDaemon, createImage, qmpProxy, requireQemuTools } from './qemu-daemon.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const NAME = 'mobtest';

/** The extents a bitmap of granularity g reports for these writes: whole granules, merged. */
function expected(writes: { disk: number; offset: number; length: number }[], g: number): DirtyExtent[] {
  const list = writes.map((w) => {
    const a = Math.floor(w.offset / g) * g;
    const b = Math.ceil((w.offset + w.length) / g) * g;
    return { disk: w.disk, offset: a, length: b - a };
  }).sort((x, y) => x.disk - y.disk || x.offset - y.offset);
  const out: DirtyExtent[] = [];
  for (const e of list) {
    const last = out[out.length - 1];
    if (last && last.disk === e.disk && e.offset <= last.offset + last.length) last.length = Math.max(last.length, e.offset + e.length - last.offset);
    else out.push({ ...e });
  }
  return out;
}

function daemonWith(tt: Parameters<typeof cleanup>[0], formats: ('qcow2' | 'raw')[], nbd = true): QemuDaemon {
  requireQemuTools();
  const c = cleanup(tt);
  const dir = c.dir('qemu-');
  const disks = formats.map((format, i) => {
    const image = path.join(dir, `disk${i}.${format}`);
    createImage(image, format, '64M');
    return { image, format };
  });
  return new QemuDaemon(c, dir, disks, nbd);
}

t.test('the tools are installed (a missing one fails the tests, naming its package)', async (t) => {
  t.doesNotThrow(() => requireQemuTools());
  t.throws(() => requireQemuTools({ PATH: '/nonexistent' }), { message: /missing tools: qemu-storage-daemon \(package qemu-system-common\), .*nbdinfo \(package libnbd-bin\)/ });
});

t.test('two qcow2 disks: drained extents are exactly the written granules, rotated in one transaction', async (t) => {
  const d = daemonWith(t, ['qcow2', 'qcow2']);
  await d.start();
  const tr = await QemuTracker.open({ name: NAME, qmpSocket: d.qmpSocket, disks: [{ node: 'disk0' }, { node: 'disk1' }], nbdSocket: d.nbdSocket });
  t.teardown(() => tr.close().catch(() => undefined));
  t.equal(tr.resumed, false, 'first protection: nothing to resume');
  t.match(tr.openLoss[0], { lost: true, reason: /no dirty bitmap of this tracker on node disk0: first protection/ });
  t.same(tr.disks.map((x) => x.persistent), [true, true], 'persistent bitmaps on qcow2');
  const g = tr.granularity(0);
  t.ok(g >= 512 && (g & (g - 1)) === 0, `granularity ${g} queried from QEMU`);
  t.equal(await tr.selfCheck(), null, 'tracking is live');

  t.same(await tr.drain(), [], 'nothing written yet');
  const writes = [
    { disk: 0, offset: 64 * KiB + 100, length: 4 * KiB },
    { disk: 0, offset: 1 * MiB, length: 200 * KiB },
    { disk: 0, offset: 64 * MiB - 512, length: 512 },
    { disk: 1, offset: 3 * MiB + 4 * KiB, length: 1 },
  ];
  for (const w of writes) d.write(w.disk, w.offset, w.length);
  const raw: Buffer[] = [];
  const journal = { beforeRead: () => raw.push(Buffer.from('R')), afterRead: (b: Buffer) => raw.push(Buffer.from(b)) };
  const got = await tr.drain(journal);
  t.same(got, expected(writes, g), 'extents cover exactly the written ranges, rounded to the granularity');
  t.same(tr.parseText(raw[1]!.toString()), got, 'the journal record replays to the same extents');
  t.same(await tr.drain(), [], 'no extents on a second rotation without writes');

  d.write(1, 10 * MiB, 64 * KiB);
  t.same(await tr.drain(), expected([{ disk: 1, offset: 10 * MiB, length: 64 * KiB }], g), 'only the newer write');

  // exactly one recording bitmap of ours per disk, no frozen ones and no exports left behind
  const q = await QmpClient.connect(d.testQmpSocket);
  const nodes = await q.execute<{ 'node-name': string; 'dirty-bitmaps'?: { name: string; recording: boolean }[] }[]>('query-named-block-nodes', { flat: true });
  for (const n of nodes.filter((x) => /^disk\d$/.test(x['node-name']))) {
    t.same(n['dirty-bitmaps']!.map((b) => [b.name, b.recording]), [[tr.activeBitmap, true]], `${n['node-name']}: one active bitmap`);
  }
  const exports = await q.execute<{ id: string }[]>('query-block-exports');
  t.same(exports.map((e) => e.id).sort(), ['guest0', 'guest1'], 'the tracker removed its read exports');
  q.close();
  await tr.close();
  await d.stop();
});

t.test('a round that failed leaves its frozen bitmap, and the next round delivers it', async (t) => {
  const d = daemonWith(t, ['qcow2']);
  await d.start();
  const tr = await QemuTracker.open({ name: NAME, qmpSocket: d.qmpSocket, disks: [{ node: 'disk0' }], nbdSocket: path.join(d.dir, 'no-such.sock') });
  t.teardown(() => tr.close().catch(() => undefined));
  const g = tr.granularity(0);
  d.write(0, 5 * MiB, 8 * KiB);
  await t.rejects(tr.drain(), { code: 'MOB_ERR_NBD' }, 'nbdinfo cannot reach the export');
  d.write(0, 7 * MiB, 8 * KiB);
  // the same tracker pointed at the right NBD server (a restarted agent would be), and a read
  // export a killed agent left behind, which open() removes
  await tr.close({ keep: true });
  const q = await QmpClient.connect(d.testQmpSocket);
  await q.execute('block-export-add', { type: 'nbd', id: `${NAME}-map-0`, 'node-name': 'disk0', name: `${NAME}-map-0`, writable: false });
  const tr2 = await QemuTracker.open({ name: NAME, qmpSocket: d.qmpSocket, disks: [{ node: 'disk0' }], nbdSocket: d.nbdSocket });
  t.teardown(() => tr2.close().catch(() => undefined));
  t.equal(tr2.resumed, true, 'an agent restart resumes');
  t.same((await q.execute<{ id: string }[]>('query-block-exports')).map((e) => e.id).sort(), ['guest0'], 'the left-over read export is gone');
  q.close();
  t.same(await tr2.drain(), expected([{ disk: 0, offset: 5 * MiB, length: 8 * KiB }, { disk: 0, offset: 7 * MiB, length: 8 * KiB }], g), 'the failed round\'s writes and the later ones');
  t.same(await tr2.drain(), []);
  await tr2.close();
  await d.stop();
});

t.test('without an NBD server in QEMU the tracker starts and stops its own', async (t) => {
  const d = daemonWith(t, ['qcow2'], false);
  await d.start();
  const tr = await QemuTracker.open({ name: NAME, qmpSocket: d.qmpSocket, disks: [{ node: 'disk0' }] });
  t.teardown(() => tr.close().catch(() => undefined));
  t.same(await tr.drain(), []);
  const own = path.join(d.dir, `${NAME}.nbd`);
  // a guest export on the same server, so qemu-io can write as a guest
  const q = await QmpClient.connect(d.testQmpSocket);
  await q.execute('block-export-add', { type: 'nbd', id: 'guest0', 'node-name': 'disk0', name: 'guest0', writable: true });
  d.write(0, 2 * MiB, 4 * KiB, 0x33, 'guest0', own);
  t.same(await tr.drain(), expected([{ disk: 0, offset: 2 * MiB, length: 4 * KiB }], tr.granularity(0)));
  await q.execute('block-export-del', { id: 'guest0' });
  await tr.close();
  await t.rejects(q.execute('nbd-server-stop'), { code: 'MOB_ERR_QMP', qmpClass: 'GenericError' }, 'close() stopped the tracker\'s NBD server');
  q.close();
  await d.stop();
});

t.test('qcow2: a daemon restart loses nothing (persistent bitmap), whether the agent ran or not', async (t) => {
  const d = daemonWith(t, ['qcow2']);
  await d.start();
  let tr = await QemuTracker.open({ name: NAME, qmpSocket: d.qmpSocket, disks: [{ node: 'disk0' }], nbdSocket: d.nbdSocket });
  t.teardown(() => tr.close().catch(() => undefined));
  const g = tr.granularity(0);
  // 1. agent stopped (keep), QEMU restarted, agent started again
  d.write(0, 1 * MiB, 4 * KiB);
  await tr.close({ keep: true });
  await d.stop('SIGTERM');
  await d.start();
  d.write(0, 9 * MiB, 4 * KiB);
  tr = await QemuTracker.open({ name: NAME, qmpSocket: d.qmpSocket, disks: [{ node: 'disk0' }], nbdSocket: d.nbdSocket });
  t.equal(tr.resumed, true, 'the bitmap survived the restart: no rescan');
  t.same(tr.openLoss, [{ lost: false, reason: null }]);
  t.same(await tr.drain(), expected([{ disk: 0, offset: 1 * MiB, length: 4 * KiB }, { disk: 0, offset: 9 * MiB, length: 4 * KiB }], g), 'writes before and after the restart');
  // 2. QEMU restarted under a running tracker: it reconnects, and finds its bitmap
  d.write(0, 20 * MiB, 4 * KiB);
  await d.stop('SIGTERM');
  await d.start();
  d.write(0, 30 * MiB, 4 * KiB);
  t.equal(await tr.selfCheck(), null, 'self-check after the restart: tracking is intact');
  t.same(await tr.drain(), expected([{ disk: 0, offset: 20 * MiB, length: 4 * KiB }, { disk: 0, offset: 30 * MiB, length: 4 * KiB }], g));
  await tr.close();
  await d.stop();
});

t.test('qcow2: QEMU killed is a loss with its reason (bitmap never stored, or stored and then inconsistent)', async (t) => {
  const d = daemonWith(t, ['qcow2']);
  await d.start();
  const open = () => QemuTracker.open({ name: NAME, qmpSocket: d.qmpSocket, disks: [{ node: 'disk0' }], nbdSocket: d.nbdSocket });
  let tr = await open();
  t.teardown(() => tr.close().catch(() => undefined));
  // killed before QEMU ever stored the new bitmap in the image (it does so at a clean stop)
  d.write(0, 1 * MiB, 4 * KiB);
  await tr.close({ keep: true });
  await d.stop('SIGKILL');
  await d.start();
  tr = await open();
  t.equal(tr.resumed, false);
  t.match(tr.openLoss[0], { lost: true, reason: /QEMU was killed or crashed before it ever stored the bitmap/ });
  // stored by a clean stop, loaded (marked in use in the image), then killed
  await tr.close({ keep: true });
  await d.stop('SIGTERM');
  await d.start();
  tr = await open();
  t.equal(tr.resumed, true, 'stored at the clean stop');
  d.write(0, 3 * MiB, 4 * KiB);
  await tr.close({ keep: true });
  await d.stop('SIGKILL');
  await d.start();
  tr = await open();
  t.equal(tr.resumed, false);
  t.match(tr.openLoss[0], { lost: true, reason: /inconsistent \(QEMU stopped without saving it/ });
  t.equal(await tr.selfCheck(), null, 'a fresh bitmap tracks from now on');
  d.write(0, 2 * MiB, 4 * KiB);
  t.same(await tr.drain(), expected([{ disk: 0, offset: 2 * MiB, length: 4 * KiB }], tr.granularity(0)));
  await tr.close();
  await d.stop();
});

t.test('raw: a daemon restart is a loss with its reason; repair re-arms tracking', async (t) => {
  const d = daemonWith(t, ['raw']);
  await d.start();
  const tr = await QemuTracker.open({ name: NAME, qmpSocket: d.qmpSocket, disks: [{ node: 'disk0' }], nbdSocket: d.nbdSocket });
  t.teardown(() => tr.close().catch(() => undefined));
  t.same(tr.disks.map((x) => x.persistent), [false], 'raw: the bitmap lives in QEMU\'s memory only');
  const g = tr.granularity(0);
  d.write(0, 4 * MiB, 4 * KiB);
  t.same(await tr.drain(), expected([{ disk: 0, offset: 4 * MiB, length: 4 * KiB }], g));
  // restart under a running tracker
  await d.stop('SIGTERM');
  await d.start();
  const problem = await tr.selfCheck();
  t.match(problem, /dirty bitmap mobtest\.\d+ is missing on node disk0 \(QEMU restarted: on a raw image the bitmap lives only in QEMU's memory/, 'explained loss');
  t.match(await tr.loss(), { lost: true, reason: /raw image/ });
  await tr.repair();
  t.equal(await tr.selfCheck(), null, 'repaired');
  d.write(0, 6 * MiB, 4 * KiB);
  t.same(await tr.drain(), expected([{ disk: 0, offset: 6 * MiB, length: 4 * KiB }], g), 'tracking from the repair on');
  // restart while the agent is stopped
  await tr.close({ keep: true });
  await d.stop('SIGTERM');
  await d.start();
  const tr2 = await QemuTracker.open({ name: NAME, qmpSocket: d.qmpSocket, disks: [{ node: 'disk0' }], nbdSocket: d.nbdSocket });
  t.teardown(() => tr2.close().catch(() => undefined));
  t.equal(tr2.resumed, false, 'not resumed: the caller resyncs by checksum');
  t.match(tr2.openLoss[0], { lost: true, reason: /QEMU restarted \(on a raw image the bitmap lives only in QEMU's memory\)/ });
  await tr2.close();
  await d.stop();
});

t.test('qcow2 and raw disks of one QEMU: a restart loses only the raw disk\'s changes, and both disks stay on one generation', async (t) => {
  const d = daemonWith(t, ['qcow2', 'raw']);
  await d.start();
  const open = () => QemuTracker.open({ name: NAME, qmpSocket: d.qmpSocket, disks: [{ node: 'disk0' }, { node: 'disk1' }], nbdSocket: d.nbdSocket });
  let tr = await open();
  t.teardown(() => tr.close().catch(() => undefined));
  t.same(tr.disks.map((x) => [x.drv, x.persistent]), [['qcow2', true], ['raw', false]]);
  const g0 = tr.granularity(0);
  const g1 = tr.granularity(1);
  t.same(await tr.drain(), []);
  d.write(0, 1 * MiB, 4 * KiB);
  d.write(1, 1 * MiB, 4 * KiB);
  await tr.close({ keep: true });
  await d.stop('SIGTERM');
  await d.start();
  d.write(0, 5 * MiB, 4 * KiB);
  d.write(1, 5 * MiB, 4 * KiB);
  tr = await open();
  t.equal(tr.resumed, false, 'not resumed as a whole');
  t.same(tr.openLoss[0], { lost: false, reason: null }, 'the qcow2 disk resumed');
  t.match(tr.openLoss[1], { lost: true, reason: /node disk1: first protection, or QEMU restarted \(on a raw image/ }, 'the raw disk lost its bitmap');
  t.same(await tr.drain(), [
    ...expected([{ disk: 0, offset: 1 * MiB, length: 4 * KiB }, { disk: 0, offset: 5 * MiB, length: 4 * KiB }], g0),
  ], 'qcow2: writes before and after the restart; raw: nothing known (written before its new bitmap), so a resync of disk1 is the caller\'s');
  d.write(0, 9 * MiB, 4 * KiB);
  d.write(1, 9 * MiB, 4 * KiB);
  t.same(await tr.drain(), [...expected([{ disk: 0, offset: 9 * MiB, length: 4 * KiB }], g0), ...expected([{ disk: 1, offset: 9 * MiB, length: 4 * KiB }], g1)]);
  const q = await QmpClient.connect(d.testQmpSocket);
  const nodes = await q.execute<{ 'node-name': string; 'dirty-bitmaps'?: { name: string }[] }[]>('query-named-block-nodes', { flat: true });
  for (const n of nodes.filter((x) => /^disk\d$/.test(x['node-name']))) t.same(n['dirty-bitmaps']!.map((b) => b.name), [tr.activeBitmap], `${n['node-name']}: on the common generation`);
  q.close();
  await tr.close();
  await d.stop();
});

t.test('openSource: the extents\' data read through QEMU\'s FUSE export, never stale', async (t) => {
  const d = daemonWith(t, ['qcow2']);
  await d.start();
  const tr = await QemuTracker.open({ name: NAME, qmpSocket: d.qmpSocket, disks: [{ node: 'disk0' }], nbdSocket: d.nbdSocket });
  t.teardown(() => tr.close().catch(() => undefined));
  const src = await tr.openSource(0, d.dir);
  t.equal(src.size, 64 * MiB, 'the virtual size');
  d.write(0, 1 * MiB, 64 * KiB, 0x11);
  const [e] = await tr.drain();
  t.same(e, { disk: 0, offset: 1 * MiB, length: tr.granularity(0) });
  const buf = Buffer.alloc(e!.length);
  await src.read(buf, e!.offset, e!.length);
  t.ok(buf.subarray(0, 64 * KiB).every((b) => b === 0x11), 'the written data');
  d.write(0, 1 * MiB, 4 * KiB, 0x22);
  await src.read(buf, 1 * MiB, 4 * KiB);
  t.ok(buf.subarray(0, 4 * KiB).every((b) => b === 0x22), 'a newer write is seen at once (no stale page cache)');
  const small = Buffer.alloc(4 * KiB);
  src.readSync(small, 1 * MiB + 4 * KiB, 4 * KiB);
  t.ok(small.every((b) => b === 0x11), 'readSync');
  await src.close();
  const q = await QmpClient.connect(d.testQmpSocket);
  t.same((await q.execute<{ id: string }[]>('query-block-exports')).map((x) => x.id), ['guest0'], 'the FUSE export is gone');
  q.close();
  t.notOk(fs.existsSync(path.join(d.dir, `${NAME}-read-0`)), 'its mount point file is removed');
  await tr.close();
  await d.stop();
});

t.test('beginPoint: one transaction gives a point-in-time view of both disks and their extents while the guest writes on', async (t) => {
  const d = daemonWith(t, ['qcow2', 'qcow2']);
  await d.start();
  const tr = await QemuTracker.open({ name: NAME, qmpSocket: d.qmpSocket, disks: [{ node: 'disk0' }, { node: 'disk1' }], nbdSocket: d.nbdSocket });
  t.teardown(() => tr.close().catch(() => undefined));
  const g = tr.granularity(0);
  await tr.drain();
  d.write(0, 1 * MiB, 64 * KiB, 0xaa);
  d.write(1, 2 * MiB, 64 * KiB, 0xaa);
  const point = await tr.beginPoint(d.dir);
  t.teardown(() => point.end());
  t.same(point.extents, expected([{ disk: 0, offset: 1 * MiB, length: 64 * KiB }, { disk: 1, offset: 2 * MiB, length: 64 * KiB }], g), 'the extents up to the point');
  // the guest goes on writing, over the same blocks and elsewhere
  d.write(0, 1 * MiB, 64 * KiB, 0xbb);
  d.write(1, 2 * MiB, 4 * KiB, 0xbb);
  d.write(0, 3 * MiB, 64 * KiB, 0xbb);
  const buf = Buffer.alloc(64 * KiB);
  const all = (b: Buffer, v: number) => b.every((x) => x === v);
  await point.sources[0]!.read(buf, 1 * MiB, 64 * KiB);
  t.ok(all(buf, 0xaa), 'disk0 at the point: the data before the later write');
  await point.sources[0]!.read(buf, 3 * MiB, 64 * KiB);
  t.ok(all(buf, 0), 'disk0 at the point: a block first written after it is still zero');
  await point.sources[1]!.read(buf, 2 * MiB, 64 * KiB);
  t.ok(all(buf, 0xaa), 'disk1 at the point');
  const live = await tr.openSource(0, d.dir);
  await live.read(buf, 1 * MiB, 64 * KiB);
  t.ok(all(buf, 0xbb), 'the live disk has the later write');
  await live.close();
  await point.end();
  const q = await QmpClient.connect(d.testQmpSocket);
  t.same((await q.execute<{ id: string }[]>('query-block-exports')).map((x) => x.id).sort(), ['guest0', 'guest1'], 'no export left');
  t.same(await q.execute('query-block-jobs'), [], 'no job left');
  const nodes = await q.execute<{ 'node-name': string }[]>('query-named-block-nodes', { flat: true });
  t.notOk(nodes.some((n) => n['node-name'].includes('fleece')), 'no view node left');
  q.close();
  t.same(fs.readdirSync(d.dir).filter((f) => f.includes('fleece')), [], 'no temporary image left');
  t.same(await tr.drain(), expected([{ disk: 0, offset: 1 * MiB, length: 64 * KiB }, { disk: 0, offset: 3 * MiB, length: 64 * KiB }, { disk: 1, offset: 2 * MiB, length: 4 * KiB }], g), 'the writes after the point go to the next round');
  await tr.close();
  await d.stop();
});

t.test('a point a killed agent left (job, view node, FUSE export) is removed by the next open()', async (t) => {
  const d = daemonWith(t, ['qcow2']);
  await d.start();
  const tr = await QemuTracker.open({ name: NAME, qmpSocket: d.qmpSocket, disks: [{ node: 'disk0' }], nbdSocket: d.nbdSocket });
  t.teardown(() => tr.close().catch(() => undefined));
  const point = await tr.beginPoint(d.dir);
  // the agent "dies": its QMP connection closes and nothing is ended (its descriptors close;
  // the FUSE export stays mounted, the mount point file cannot be removed under it)
  (tr as unknown as { qmp: QmpClient }).qmp.close();
  await point.sources[0]!.close().catch(() => undefined);
  t.ok(fs.readFileSync('/proc/mounts', 'utf8').includes(`${NAME}-point-0`), 'the FUSE view is still mounted');
  const tr2 = await QemuTracker.open({ name: NAME, qmpSocket: d.qmpSocket, disks: [{ node: 'disk0' }], nbdSocket: d.nbdSocket });
  t.teardown(() => tr2.close().catch(() => undefined));
  t.equal(tr2.resumed, true);
  const q = await QmpClient.connect(d.testQmpSocket);
  t.same(await q.execute('query-block-jobs'), [], 'no job left');
  t.same((await q.execute<{ id: string }[]>('query-block-exports')).map((x) => x.id), ['guest0'], 'no export left');
  const nodes = await q.execute<{ 'node-name': string }[]>('query-named-block-nodes', { flat: true });
  t.notOk(nodes.some((n) => n['node-name'].includes('fleece')), 'no view node left');
  t.notOk(fs.readFileSync('/proc/mounts', 'utf8').includes(`${NAME}-point-0`), 'the FUSE view is unmounted');
  q.close();
  d.write(0, 1 * MiB, 4 * KiB);
  t.same(await tr2.drain(), expected([{ disk: 0, offset: 1 * MiB, length: 4 * KiB }], tr2.granularity(0)));
  await tr2.close();
  await d.stop();
});

t.test('a node QEMU does not have is a coded error', async (t) => {
  const d = daemonWith(t, ['qcow2']);
  await d.start();
  await t.rejects(QemuTracker.open({ name: NAME, qmpSocket: d.qmpSocket, disks: [{ node: 'nope' }], nbdSocket: d.nbdSocket }), { code: 'MOB_ERR_QEMU_TRACKER', message: /no device or block node 'nope'/ });
  await t.rejects(QemuTracker.open({ name: NAME, qmpSocket: path.join(d.dir, 'absent.sock'), disks: [{ node: 'disk0' }] }), { code: 'MOB_ERR_QMP' });
  await d.stop();
});

t.test('an agent killed inside a rotation (both bitmaps recording) resumes without a rescan, and loses nothing', async (t) => {
  const d = daemonWith(t, ['qcow2']);
  await d.start();
  const tr = await QemuTracker.open({ name: NAME, qmpSocket: d.qmpSocket, disks: [{ node: 'disk0' }], nbdSocket: d.nbdSocket });
  const g = tr.granularity(0);
  t.same(await tr.drain(), [], 'nothing written yet');
  await tr.close({ keep: true });
  // what a rotation's first step leaves when the agent dies right after it: the next generation
  // added and recording, the current one not yet disabled
  const q = await QmpClient.connect(d.testQmpSocket);
  t.teardown(() => q.close());
  const mine = async () => ((await q.execute<{ 'node-name': string; 'dirty-bitmaps'?: { name: string; recording: boolean }[] }[]>('query-named-block-nodes', { flat: true }))
    .find((n) => n['node-name'] === 'disk0')!['dirty-bitmaps'] ?? []).filter((b) => b.name.startsWith(`${NAME}.`));
  const cur = (await mine()).find((b) => b.recording)!.name;
  const gen = Number(cur.slice(NAME.length + 1));
  d.write(0, 3 * MiB, 8 * KiB); // in the current generation only
  await q.execute('block-dirty-bitmap-add', { node: 'disk0', name: `${NAME}.${gen + 1}`, persistent: true, granularity: g });
  d.write(0, 9 * MiB, 8 * KiB); // in both
  t.equal((await mine()).filter((b) => b.recording).length, 2, 'two bitmaps of the tracker record');
  const tr2 = await QemuTracker.open({ name: NAME, qmpSocket: d.qmpSocket, disks: [{ node: 'disk0' }], nbdSocket: d.nbdSocket });
  t.teardown(() => tr2.close().catch(() => undefined));
  t.equal(tr2.resumed, true, 'resumed');
  t.match(tr2.openLoss[0], { lost: false }, 'no loss, no rescan');
  t.same(await tr2.drain(), expected([{ disk: 0, offset: 3 * MiB, length: 8 * KiB }, { disk: 0, offset: 9 * MiB, length: 8 * KiB }], g), 'both writes, the one only the older bitmap held too');
  t.equal((await mine()).filter((b) => b.recording).length, 1, 'one recording bitmap again');
  await tr2.close();
  await d.stop();
});

t.test('a bitmap disabled between the check and the rotation is noticed, not rotated away', async (t) => {
  const d = daemonWith(t, ['qcow2']);
  await d.start();
  // a monitor in front of QEMU's: just before the rotation's transaction reaches QEMU, someone
  // disables the recording bitmap (the race the check before the rotation cannot see)
  const q = await QmpClient.connect(d.testQmpSocket);
  t.teardown(() => q.close());
  let armed = false;
  let raced = '';
  const proxySock = path.join(d.dir, 'proxy.qmp');
  await qmpProxy(t, d.qmpSocket, proxySock, async (text) => {
    if (!(armed && /"transaction"/.test(text) && /block-dirty-bitmap-add/.test(text))) return;
    armed = false;
    const nodes = await q.execute<{ 'node-name': string; 'dirty-bitmaps'?: { name: string; recording: boolean }[] }[]>('query-named-block-nodes', { flat: true });
    raced = nodes.find((n) => n['node-name'] === 'disk0')!['dirty-bitmaps']!.find((x) => x.recording && x.name.startsWith(`${NAME}.`))!.name;
    await q.execute('block-dirty-bitmap-disable', { node: 'disk0', name: raced });
  });
  const tr = await QemuTracker.open({ name: NAME, qmpSocket: proxySock, disks: [{ node: 'disk0' }], nbdSocket: d.nbdSocket });
  t.teardown(() => tr.close().catch(() => undefined));
  t.same(await tr.drain(), [], 'a first round');
  armed = true;
  await t.rejects(tr.drain(), { code: 'MOB_ERR_TRACKING_LOST', message: /was disabled/ }, 'the round that raced the disable reports the loss');
  t.ok(raced, `the test disabled ${raced} just before the rotation`);
  t.match(await tr.selfCheck(), /disabled/, 'and the tracker still says so (the disabled bitmap was not replaced by a fresh one)');
  await tr.close();
  await d.stop();
});
