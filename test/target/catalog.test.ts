import t from 'tap';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { createHash, randomBytes } from 'node:crypto';
import { LocalReplicaStore, type WriteOp } from '../../src/target/local/local-store.js';
import { PointCatalog, diskPoint, type RecoveryPoint } from '../../src/target/catalog.js';
import { materializeDisk } from '../../src/target/local/materialize.js';
import { LocalBackend } from '../../src/target/local/local-backend.js';
import { UndoJournal, UNDO_UNIT, readUndoFile } from '../../src/target/local/undo-journal.js';
import { tmpDir, sleep } from '../helpers.js';

const BS = 64 * 1024;
const SIZE = 16 * BS; // 1 MiB, 16 blocks
const AGENT = 'agent1';
const DISK = 'disk0';

const sha = (b: Buffer) => createHash('sha256').update(b).digest('hex');
const fileSha = async (f: string) => sha(await fsp.readFile(f));

/** A replica under test plus an in-memory model of what the disk holds. */
class Rig {
  seq = 0;
  model: Buffer;
  constructor(public store: LocalReplicaStore, readonly agentDir: string, readonly cat: PointCatalog, size: number) {
    this.model = Buffer.alloc(size);
  }
  get diskDir(): string { return path.join(this.agentDir, DISK); }
  get undoDir(): string { return path.join(this.diskDir, 'undo'); }

  /** Submits whole-block writes (data null = zeros) as one submit; the model follows. */
  write(blocks: [number, Buffer | null][], bs = BS): Promise<void> {
    const ops: WriteOp[] = blocks.map(([i, data]) => ({ offset: i * bs, length: data ? data.length : bs, data }));
    for (const op of ops) {
      if (op.data) op.data.copy(this.model, op.offset);
      else this.model.fill(0, op.offset, op.offset + op.length);
    }
    return this.store.submit(ops, ++this.seq);
  }

  /** Mirrors ProcessServer.recordCut for one disk: applied, catalog first, then the epoch switch. */
  async cut(kind: 'crash' | 'app' = 'crash', note = ''): Promise<{ point: RecoveryPoint; image: string }> {
    await this.store.whenApplied();
    if (!this.store.initialComplete) throw new Error('initial replication not complete');
    const point = await this.cat.add({
      kind, takenAt: new Date().toISOString(), frozenMs: 3, note,
      disks: { [DISK]: { seq: this.seq, sizeBytes: this.store.sizeBytes } },
    });
    await this.store.setEpoch(point.id);
    return { point, image: sha(this.model.subarray(0, this.store.sizeBytes)) };
  }

  async materialize(p: RecoveryPoint, outDir: string, cat = this.cat) {
    return materializeDisk({
      diskId: DISK, replica: path.join(this.diskDir, 'replica.img'), undoDir: this.undoDir,
      out: path.join(outDir, `${p.id}.img`), sizeBytes: p.disks[DISK].sizeBytes, epochs: async () => cat.epochsFrom(p, DISK).map((x) => diskPoint(x, DISK)),
    });
  }
}

/** What the server does with pruned points: the local backend drops each disk's undo file. */
function dropWith(agentDir: string) {
  const backend = new LocalBackend({ dir: path.dirname(agentDir), imagesDir: path.dirname(agentDir) });
  const agent = path.basename(agentDir);
  return async (p: RecoveryPoint) => {
    for (const d of Object.keys(p.disks)) await backend.prunePoint(agent, d, diskPoint(p, d));
  };
}

/** A replica whose initial pass is done: blocks 0..7 hold data, 8..15 are holes. */
async function rig(t: { teardown(fn: () => unknown): void }, size = SIZE): Promise<{ r: Rig; out: string }> {
  const root = await tmpDir(t);
  const agentDir = path.join(root, 'replicas', AGENT);
  const { store, created } = await LocalReplicaStore.open(path.join(agentDir, DISK), AGENT, DISK, size);
  if (!created) throw new Error('replica should be new');
  const cat = await PointCatalog.load(agentDir);
  const r = new Rig(store, agentDir, cat, size);
  await r.write(Array.from({ length: 8 }, (_, i) => [i, randomBytes(BS)] as [number, Buffer]));
  await store.endPass('initial', r.seq);
  if (!store.initialComplete) throw new Error('WAL mode expected after the initial pass');
  const out = path.join(root, 'out');
  await fsp.mkdir(out);
  t.teardown(() => r.store.close());
  return { r, out };
}

t.test('recovery points: every point materialises byte-exact while the replica moves on; prune keeps the rest exact', async (t) => {
  const { r, out } = await rig(t);
  const store = r.store;
  t.equal(store.epoch, null, 'no epoch before the first point');

  // version A (no point yet: nothing is captured)
  await r.write([[0, randomBytes(BS)], [1, randomBytes(BS)], [2, randomBytes(BS)], [9, randomBytes(BS)]]);
  t.equal(await fsp.stat(r.undoDir).then(() => true, () => false), false, 'no undo directory before the first point');
  t.equal(store.undoBytesWritten, 0);
  const p1 = await r.cut('crash', 'first');
  t.equal(p1.point.id, 'rp-000001');
  t.equal(store.epoch, 'rp-000001');
  t.equal((await fsp.stat(path.join(r.undoDir, 'rp-000001.undo'))).size, 0, 'epoch file created empty');

  // version B: overlaps A (1, 2), new blocks (10 was a hole, 11), a zeroed block (3), block 2 twice in concurrent submits
  const b2a = randomBytes(BS);
  await Promise.all([
    r.write([[1, randomBytes(BS)], [2, b2a], [10, randomBytes(BS)]]),
    r.write([[2, randomBytes(BS)], [3, null]]),
    r.write([[11, randomBytes(BS)]]),
  ]);
  await r.write([[1, randomBytes(BS)], [2, randomBytes(BS)]]); // second overwrite in the epoch: not captured again
  const u1 = await readUndoFile(path.join(r.undoDir, 'rp-000001.undo'));
  t.same(u1.map((x) => x.offset / BS).sort((a, b) => a - b), [1, 2, 3, 10, 11], 'each overwritten block captured exactly once in epoch 1');
  t.equal(u1.find((x) => x.offset === 10 * BS)!.data, null, 'a hole is captured as a zero record');
  t.ok(store.undoBytesWritten >= 5 * BS, 'undo bytes are counted');

  await sleep(5); // distinct recordedAt, so a cutoff can fall between points 1 and 2
  const p2 = await r.cut('app', 'second');
  t.equal(p2.point.id, 'rp-000002');
  t.equal(store.epoch, 'rp-000002');

  // version C
  await r.write([[1, randomBytes(BS)], [4, randomBytes(BS)], [12, randomBytes(BS)], [0, null], [15, randomBytes(BS)]]);
  const p3 = await r.cut('crash', 'third');
  await store.whenApplied();
  const current = await fileSha(path.join(r.diskDir, 'replica.img'));
  t.equal(current, sha(r.model), 'the replica equals the model (sanity)');

  t.not(p1.image, p2.image);
  t.not(p2.image, current);
  const m1 = await r.materialize(p1.point, out);
  t.equal(await fileSha(m1.image), p1.image, 'point 1 image is byte-equal to the disk at point 1');
  t.equal((await fsp.stat(m1.image)).size, SIZE);
  t.ok(m1.method === 'copy' || m1.method === 'reflink');
  t.equal(m1.undoRecords, 5 + 5, 'point 1 reverts the records of epochs 1 and 2 (epoch 3 is empty)');
  const m2 = await r.materialize(p2.point, out);
  t.equal(await fileSha(m2.image), p2.image, 'point 2 image is byte-equal to the disk at point 2');
  t.equal(m2.undoRecords, 5);
  const latest = r.cat.resolve('latest');
  t.equal(latest.id, p3.point.id);
  const m3 = await r.materialize(latest, out);
  t.equal(await fileSha(m3.image), current, "'latest' (no writes since) equals the current replica");
  t.equal(m3.undoRecords, 0);
  t.equal(r.cat.resolve('latest-app').id, 'rp-000002', "'latest-app' is the newest app point");
  t.equal(r.cat.resolve('rp-000001').note, 'first');
  t.equal(await fileSha(path.join(r.diskDir, 'replica.img')), current, 'materialising leaves the replica untouched');

  // writes after the newest point make 'latest' differ from the replica, but keep every point exact
  await r.write([[5, randomBytes(BS)], [13, null], [1, randomBytes(BS)]]);
  const m3b = await r.materialize(p3.point, out);
  t.equal(await fileSha(m3b.image), current, 'point 3 still exact after later writes');
  t.not(await fileSha(path.join(r.diskDir, 'replica.img')), current);

  // prune: a cutoff between points 1 and 2 removes point 1 only, catalog and undo file
  const removed = await r.cat.prune(new Date(Date.parse(p2.point.recordedAt)), dropWith(r.agentDir));
  t.same(removed.map((p) => p.id), ['rp-000001'], 'points before the cutoff are removed');
  t.same(r.cat.list().map((p) => p.id), ['rp-000002', 'rp-000003']);
  t.equal(await fsp.stat(path.join(r.undoDir, 'rp-000001.undo')).then(() => true, () => false), false, 'undo file of a pruned point deleted');
  t.ok(await fsp.stat(path.join(r.undoDir, 'rp-000002.undo')).then(() => true, () => false), 'undo file of a kept point kept');
  await t.rejects(async () => r.cat.resolve('rp-000001'), { code: 'MOB_ERR_UNKNOWN_POINT' }, 'a pruned point is unknown');
  const m2b = await r.materialize(r.cat.resolve('rp-000002'), out);
  t.equal(await fileSha(m2b.image), p2.image, 'point 2 still exact after pruning point 1');
  const reloaded = await PointCatalog.load(r.agentDir);
  t.same(reloaded.list(), r.cat.list(), 'the pruned catalog is durable');

  // a cutoff in the future removes everything but the newest point
  const removed2 = await r.cat.prune(new Date(Date.now() + 3600_000), dropWith(r.agentDir));
  t.same(removed2.map((p) => p.id), ['rp-000002']);
  t.same(r.cat.list().map((p) => p.id), ['rp-000003'], 'the newest point is always kept');
  t.same(await r.cat.prune(new Date(Date.now() + 3600_000), dropWith(r.agentDir)), [], 'the last point is never pruned');
  const m3c = await r.materialize(r.cat.resolve('latest'), out);
  t.equal(await fileSha(m3c.image), current, 'point 3 still exact after pruning all older points');
  t.same((await fsp.readdir(r.undoDir)).sort(), ['rp-000003.undo']);
  // ids are never reused after pruning
  const p4 = await r.cut();
  t.equal(p4.point.id, 'rp-000004');
  t.equal(p4.point.n, 4);
});

t.test('recovery points: a reopened store resumes the epoch of the newest point and does not recapture', async (t) => {
  const { r, out } = await rig(t);
  await r.write([[0, randomBytes(BS)]]);
  const p1 = await r.cut();
  await r.write([[0, randomBytes(BS)], [1, randomBytes(BS)]]);
  const p2 = await r.cut();
  await r.write([[1, randomBytes(BS)], [2, randomBytes(BS)], [9, randomBytes(BS)]]);
  const undo2 = path.join(r.undoDir, 'rp-000002.undo');
  const sizeBefore = (await fsp.stat(undo2)).size;
  t.equal((await readUndoFile(undo2)).length, 3);
  await r.store.close();

  // the server restarts: catalog reloaded, store reopened with the newest point's epoch (as acquireDisk does)
  const cat = await PointCatalog.load(r.agentDir);
  t.same(cat.list(), r.cat.list(), 'catalog survives a reload');
  t.equal(cat.latestFor(DISK)!.id, 'rp-000002');
  t.equal(cat.latestFor('other-disk'), null);
  const { store, created } = await LocalReplicaStore.open(r.diskDir, AGENT, DISK, SIZE, { epoch: cat.latestFor(DISK)?.id ?? null });
  t.notOk(created);
  r.store = store;
  t.equal(store.epoch, 'rp-000002', 'epoch resumed');
  await r.write([[1, randomBytes(BS)], [2, null], [9, randomBytes(BS)]]);
  t.equal((await fsp.stat(undo2)).size, sizeBefore, 'blocks already captured in the epoch are not captured again after a reopen');
  await r.write([[3, randomBytes(BS)]]);
  t.equal((await readUndoFile(undo2)).length, 4, 'a block new to the epoch is captured');
  for (const p of [p1, p2]) {
    const m = await r.materialize(p.point, out, cat);
    t.equal(await fileSha(m.image), p.image, `${p.point.id} exact after the reopen`);
  }
});

t.test('recovery points: a torn undo tail left by a crash is cut and the point stays exact', async (t) => {
  const { r, out } = await rig(t);
  const p1 = await r.cut();
  await r.write([[0, randomBytes(BS)], [8, randomBytes(BS)]]);
  await r.store.close();
  const undo1 = path.join(r.undoDir, 'rp-000001.undo');
  // a crash mid-append of a batch that never committed: half a record at the end
  await fsp.appendFile(undo1, randomBytes(100));
  const { store } = await LocalReplicaStore.open(r.diskDir, AGENT, DISK, SIZE, { epoch: 'rp-000001' });
  r.store = store;
  t.equal((await readUndoFile(undo1)).length, 2, 'complete records kept');
  await r.write([[1, randomBytes(BS)]]);
  t.equal((await readUndoFile(undo1)).length, 3, 'records appended after the cut are readable');
  const m = await r.materialize(p1.point, out);
  t.equal(await fileSha(m.image), p1.image, 'point exact');
});

t.test('recovery points: a point taken before the disk grew materialises at its own size', async (t) => {
  const { r, out } = await rig(t);
  await r.write([[3, randomBytes(BS)]]);
  const p1 = await r.cut();
  await r.store.close();
  const { store } = await LocalReplicaStore.open(r.diskDir, AGENT, DISK, 2 * SIZE, { epoch: r.cat.latestFor(DISK)!.id });
  r.store = store;
  const grown = Buffer.alloc(2 * SIZE);
  r.model.copy(grown);
  r.model = grown;
  await r.write([[3, randomBytes(BS)], [16, randomBytes(BS)], [31, randomBytes(BS)]]);
  const p2 = await r.cut();
  t.equal(p2.point.disks[DISK].sizeBytes, 2 * SIZE);
  await r.write([[16, null], [20, randomBytes(BS)]]);
  const m1 = await r.materialize(p1.point, out);
  t.equal(m1.sizeBytes, SIZE);
  t.equal((await fsp.stat(m1.image)).size, SIZE, 'image has the size of the disk at the point');
  t.equal(await fileSha(m1.image), p1.image, 'point before the growth exact');
  const m2 = await r.materialize(p2.point, out);
  t.equal(await fileSha(m2.image), p2.image, 'point after the growth exact');
});

t.test('recovery points: materialising while writes keep coming yields exactly the point', async (t) => {
  const { r, out } = await rig(t);
  await r.write([[0, randomBytes(BS)], [5, randomBytes(BS)]]);
  const p1 = await r.cut();
  let stop = false;
  const writer = (async () => {
    let i = 0;
    while (!stop) {
      const b = (i * 7) % 16;
      await r.write([[b, i % 5 === 0 ? null : randomBytes(BS)], [(b + 3) % 16, randomBytes(BS)]]);
      i++;
    }
    return i;
  })();
  try {
    for (let k = 0; k < 5; k++) {
      const m = await r.materialize(p1.point, out);
      t.equal(await fileSha(m.image), p1.image, `materialisation ${k} under load is exact`);
    }
  } finally {
    stop = true;
  }
  t.ok((await writer) > 0, 'writes went on meanwhile');
});

t.test('recovery points: a block written with a larger block size in the same epoch is still revertible', async (t) => {
  // The server takes the block size from each session's Hello, so an agent restarted with another
  // block size writes ops at the same offsets with other lengths within one epoch.
  const { r, out } = await rig(t);
  const p1 = await r.cut();
  await r.write([[0, randomBytes(BS)]]); // captures [0, 64K) only
  await r.store.close();
  const { store } = await LocalReplicaStore.open(r.diskDir, AGENT, DISK, SIZE, { epoch: 'rp-000001' });
  r.store = store;
  await r.write([[0, randomBytes(2 * BS)]], 2 * BS); // block 0 of a 128 KiB-block session covers [0, 128K)
  const recs = await readUndoFile(path.join(r.undoDir, 'rp-000001.undo'));
  const covered = recs.reduce((n, x) => Math.max(n, x.offset + x.length), 0);
  t.ok(covered >= 2 * BS, `old bytes of [0, 128K) are captured (undo covers [0, ${covered}))`);
  t.same(recs.map((x) => [x.offset, x.length]), [[0, BS], [BS, BS]], 'the longer write captures only what it adds: [64K, 128K)');
  const uj = await UndoJournal.open(path.join(r.undoDir, 'rp-000001.undo'));
  t.same([...uj.captured].sort((a, b) => a - b), Array.from({ length: 2 * BS / UNDO_UNIT }, (_, i) => i), 'the epoch has exactly the 4 KiB units of [0, 128K) captured');
  await uj.close();
  const m = await r.materialize(p1.point, out);
  t.equal(await fileSha(m.image), p1.image, 'point 1 exact after a write that is longer than the captured range at its offset');
});

t.test('recovery points: an op over captured and fresh units captures each fresh run once, in its own record', async (t) => {
  const { r, out } = await rig(t);
  const p1 = await r.cut();
  await r.write([[1, randomBytes(BS)], [3, randomBytes(BS)]]); // captures [64K, 128K) and [192K, 256K)
  // one 256 KiB op over [0, 256K): fresh [0, 64K), captured, fresh [128K, 192K), captured
  await r.write([[0, randomBytes(4 * BS)]], 4 * BS);
  // a shorter op inside what is captured: nothing new
  await r.write([[2, randomBytes(BS)]]);
  // an op that ends in a unit of its own: [256K, 256K + 4K) is fresh
  await r.write([[64, randomBytes(4096)]], 4096);
  const recs = await readUndoFile(path.join(r.undoDir, 'rp-000001.undo'));
  t.same(recs.map((x) => [x.offset, x.length]), [[BS, BS], [3 * BS, BS], [0, BS], [2 * BS, BS], [4 * BS, 4096]],
    'only the not-yet-captured runs are captured, each exactly once');
  const m = await r.materialize(p1.point, out);
  t.equal(await fileSha(m.image), p1.image, 'point 1 exact');
});

t.test('point catalog: resolve, latestFor, epochsFrom, durable reload', async (t) => {
  const dir = await tmpDir(t);
  const agentDir = path.join(dir, 'replicas', 'a');
  const cat = await PointCatalog.load(agentDir);
  t.same(cat.list(), [], 'no catalog yet: empty');
  t.throws(() => cat.resolve('latest'), { code: 'MOB_ERR_UNKNOWN_POINT' });
  t.throws(() => cat.resolve('latest-app'), { code: 'MOB_ERR_UNKNOWN_POINT' });
  t.throws(() => cat.resolve('rp-000001'), { code: 'MOB_ERR_UNKNOWN_POINT' });
  t.equal(cat.latestFor('d1'), null);
  const base = { takenAt: new Date().toISOString(), frozenMs: 1, note: '' };
  const a = await cat.add({ ...base, kind: 'crash', disks: { d1: { seq: 1, sizeBytes: 100 }, d2: { seq: 5, sizeBytes: 200 } } });
  const b = await cat.add({ ...base, kind: 'app', disks: { d1: { seq: 2, sizeBytes: 100 } } });
  const c = await cat.add({ ...base, kind: 'crash', disks: { d2: { seq: 9, sizeBytes: 200 } } });
  t.same([a.id, b.id, c.id], ['rp-000001', 'rp-000002', 'rp-000003']);
  t.ok(a.n < b.n && b.n < c.n, 'n increases');
  t.ok(!Number.isNaN(Date.parse(a.recordedAt)), 'recordedAt is a date');
  t.equal((await fsp.stat(cat.file)).mode & 0o777, 0o600, 'catalog is 0600');
  t.equal(cat.resolve('latest').id, 'rp-000003');
  t.equal(cat.resolve('latest-app').id, 'rp-000002');
  t.equal(cat.resolve('rp-000001').id, 'rp-000001');
  t.throws(() => cat.resolve('rp-000009'), { code: 'MOB_ERR_UNKNOWN_POINT' });
  t.throws(() => cat.resolve(''), { code: 'MOB_ERR_UNKNOWN_POINT' });
  t.equal(cat.latestFor('d1')!.id, 'rp-000002');
  t.equal(cat.latestFor('d2')!.id, 'rp-000003');
  t.same(cat.epochsFrom(a, 'd1').map((p) => p.id), ['rp-000001', 'rp-000002'], 'only points that include the disk');
  t.same(cat.epochsFrom(a, 'd2').map((p) => p.id), ['rp-000001', 'rp-000003']);
  t.same(cat.epochsFrom(b, 'd1').map((p) => p.id), ['rp-000002']);
  const again = await PointCatalog.load(agentDir);
  t.same(again.list(), cat.list(), 'reload gives the same points');
  const d = await again.add({ ...base, kind: 'crash', disks: { d1: { seq: 3, sizeBytes: 100 } } });
  t.equal(d.id, 'rp-000004', 'numbering continues after a reload');

  // no crash-only catalog has a latest-app
  const cat2 = await PointCatalog.load(path.join(dir, 'other'));
  await cat2.add({ ...base, kind: 'crash', disks: {} });
  t.throws(() => cat2.resolve('latest-app'), { code: 'MOB_ERR_UNKNOWN_POINT' });
  t.equal(cat2.resolve('latest').id, 'rp-000001');
});

t.test('point catalog: an unreadable catalog is MOB_ERR_STATE_CORRUPT', async (t) => {
  const dir = await tmpDir(t);
  await fsp.writeFile(path.join(dir, 'points.json'), '{"version":1,"next":');
  await t.rejects(PointCatalog.load(dir), { code: 'MOB_ERR_STATE_CORRUPT' }, 'truncated JSON');
  await fsp.writeFile(path.join(dir, 'points.json'), JSON.stringify({ version: 2, next: 1, points: [] }));
  await t.rejects(PointCatalog.load(dir), { code: 'MOB_ERR_STATE_CORRUPT' }, 'unknown version');
  await fsp.writeFile(path.join(dir, 'points.json'), JSON.stringify({ version: 1, next: 1 }));
  await t.rejects(PointCatalog.load(dir), { code: 'MOB_ERR_STATE_CORRUPT' }, 'no points array');
});

t.test('point catalog: prune by recordedAt, removing undo files of every disk of the pruned points', async (t) => {
  const dir = await tmpDir(t);
  const agentDir = path.join(dir, 'a');
  const diskDir = (d: string) => path.join(agentDir, d);
  const cat = await PointCatalog.load(agentDir);
  const base = { takenAt: new Date().toISOString(), frozenMs: 1, note: '', kind: 'crash' as const };
  const p1 = await cat.add({ ...base, disks: { d1: { seq: 1, sizeBytes: 1 }, d2: { seq: 1, sizeBytes: 1 } } });
  await sleep(15);
  const cutoff = new Date();
  await sleep(15);
  const p2 = await cat.add({ ...base, disks: { d1: { seq: 2, sizeBytes: 1 } } });
  const p3 = await cat.add({ ...base, disks: { d1: { seq: 3, sizeBytes: 1 }, d2: { seq: 3, sizeBytes: 1 } } });
  for (const d of ['d1', 'd2']) await fsp.mkdir(path.join(diskDir(d), 'undo'), { recursive: true });
  for (const p of [p1, p2, p3]) for (const d of Object.keys(p.disks)) await fsp.writeFile(path.join(diskDir(d), 'undo', `${p.id}.undo`), 'x');
  t.same(await cat.prune(new Date(Date.parse(p1.recordedAt) - 1000), dropWith(agentDir)), [], 'nothing older than the cutoff');
  const removed = await cat.prune(cutoff, dropWith(agentDir));
  t.same(removed.map((p) => p.id), [p1.id]);
  t.same((await fsp.readdir(path.join(diskDir('d1'), 'undo'))).sort(), [`${p2.id}.undo`, `${p3.id}.undo`]);
  t.same((await fsp.readdir(path.join(diskDir('d2'), 'undo'))).sort(), [`${p3.id}.undo`], 'undo files of every disk of the point are removed');
  t.same((await PointCatalog.load(agentDir)).list().map((p) => p.id), [p2.id, p3.id], 'prune is durable');
});

t.test('local backend: removeOrphans deletes undo files no point of the disk names', async (t) => {
  const dir = await tmpDir(t);
  const agentDir = path.join(dir, 'a');
  const cat = await PointCatalog.load(agentDir);
  t.same(await new LocalBackend({ dir, imagesDir: dir }).removeOrphans('a', 'd1', cat.diskPoints('d1')), [], 'no undo directory: nothing to do');
  const base = { takenAt: new Date().toISOString(), frozenMs: 1, note: '', kind: 'crash' as const };
  const p1 = await cat.add({ ...base, disks: { d1: { seq: 1, sizeBytes: 1 } } });
  const p2 = await cat.add({ ...base, disks: { d2: { seq: 1, sizeBytes: 1 } } });
  const undo = path.join(agentDir, 'd1', 'undo');
  await fsp.mkdir(undo, { recursive: true });
  for (const f of [`${p1.id}.undo`, `${p2.id}.undo`, 'rp-000099.undo', 'notes.txt']) await fsp.writeFile(path.join(undo, f), 'x');
  const removed = await new LocalBackend({ dir, imagesDir: dir }).removeOrphans('a', 'd1', cat.diskPoints('d1'));
  t.same(removed.sort(), [`${p2.id}.undo`, 'rp-000099.undo'], 'files of unknown points and of points without this disk are orphans');
  t.same((await fsp.readdir(undo)).sort(), ['notes.txt', `${p1.id}.undo`], 'named undo files and other files are kept');
  t.same(await new LocalBackend({ dir, imagesDir: dir }).removeOrphans('a', 'd1', cat.diskPoints('d1')), [], 'idempotent');
});
