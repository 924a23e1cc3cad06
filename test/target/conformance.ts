/**
 * The conformance suite of the target seam (src/target/replica-store.ts), written once against
 * the interface and run against every backend: test/target/local.test.ts, test/target/azure.test.ts.
 * A new backend is one more file calling runConformance with a factory.
 *
 * What it holds every backend to: durable writes (what a resolved submit wrote survives a reopen,
 * also of a store that was never closed), reads of accepted data before they are durable, page
 * digests, growth (and refusal to shrink), points materialised byte-exact while the replica moves
 * on, pruning and orphan removal, promote (failover image, reprotect reads, adopt), unpublished
 * creation leaving nothing, remove, and bad input answered with codes.
 */
import fsp from 'node:fs/promises';
import path from 'node:path';
import crypto from 'node:crypto';
import { xxh64 } from '@node-rs/xxhash';
import type { Test } from 'tap';
import type { DiskPoint, ReplicaBackend, ReplicaStore, WriteOp } from '../../src/target/replica-store.js';
import { tmpDir } from '../helpers.js';

export interface BackendRig {
  backend: ReplicaBackend;
}

const MiB = 1024 * 1024;
const PAGE = 4096;
const BS = 64 * 1024;

/** A model of the disk next to the store: every write applied to both. */
class Disk {
  readonly model: Buffer;
  seq = 0;
  constructor(public store: ReplicaStore, size: number) {
    this.model = Buffer.alloc(size);
  }

  /** Writes blocks (index -> data or null for zeros) and waits until they are durable. */
  async write(blocks: [number, Buffer | null][]): Promise<void> {
    const ops: WriteOp[] = blocks.map(([i, data]) => ({ offset: i * BS, length: data ? data.length : BS, data }));
    for (const op of ops) {
      if (op.data) op.data.copy(this.model, op.offset);
      else this.model.fill(0, op.offset, op.offset + op.length);
    }
    await this.store.submit(ops, ++this.seq);
  }
}

function rnd(n = BS): Buffer {
  return crypto.randomBytes(n);
}

function sha(b: Buffer): string {
  return crypto.createHash('sha256').update(b).digest('hex');
}

async function readAll(store: ReplicaStore, size = store.sizeBytes): Promise<Buffer> {
  const parts: Buffer[] = [];
  for (let o = 0; o < size; o += 4 * MiB) parts.push(await store.read(o, Math.min(4 * MiB, size - o)));
  return Buffer.concat(parts);
}

let agentSeq = 0;
/** A fresh agent id per subtest: backends share one location across subtests. */
function agentId(): string {
  return `conf-${process.pid}-${++agentSeq}`;
}

export function runConformance(t: Test, name: string, make: (t: Test) => Promise<BackendRig>): void {
  t.test(`${name}: a new replica is created, listed, and keeps its generation across reopen`, async (t) => {
    const { backend } = await make(t);
    const a = agentId();
    const { store, created } = await backend.open(a, 'd0', 4 * MiB);
    t.ok(created, 'created');
    t.equal(store.sizeBytes, 4 * MiB);
    t.equal(store.initialComplete, false);
    t.equal(store.lastDurableSeq, 0);
    t.equal(store.unpublished, false);
    t.equal(store.agentId, a);
    t.equal(store.diskId, 'd0');
    const gen = store.generation;
    t.ok(gen.length > 0, 'has a generation');
    await store.close();
    t.ok((await backend.agents()).includes(a), 'the agent is listed');
    t.same(await backend.disks(a), ['d0'], 'the disk is listed');
    const st = await backend.stat(a, 'd0');
    t.equal(st?.sizeBytes, 4 * MiB);
    t.equal(st?.generation, gen);
    t.equal(await backend.stat(a, 'nope'), null, 'no stat for a disk without a replica');
    const again = await backend.open(a, 'd0', 4 * MiB);
    t.notOk(again.created, 'reopened, not created');
    t.equal(again.store.generation, gen, 'same generation');
    await again.store.close();
  });

  t.test(`${name}: durable writes survive a reopen, also of a store never closed; accepted writes read back at once`, async (t) => {
    const { backend } = await make(t);
    const a = agentId();
    const size = 4 * MiB;
    const { store } = await backend.open(a, 'd0', size);
    const d = new Disk(store, size);
    // initial pass: straight writes
    await d.write([[0, rnd()], [1, rnd()], [5, rnd()], [63, rnd()]]);
    const p = rnd();
    const pending = store.submit([{ offset: 7 * BS, length: BS, data: p }], ++d.seq);
    p.copy(d.model, 7 * BS);
    t.equal(sha(await store.read(7 * BS, BS)), sha(p), 'an accepted write reads back before it is durable');
    await pending;
    await store.endPass('initial', ++d.seq);
    t.ok(store.initialComplete, 'the initial pass completes the replica');
    // continuous: overwrite, zero a block, write across the end
    await d.write([[1, rnd()], [5, null], [62, rnd()]]);
    await d.write([[1, rnd()]]);
    t.ok(store.lastDurableSeq >= d.seq, 'lastDurableSeq covers every resolved submit');
    t.equal(sha(await readAll(store)), sha(d.model), 'reads give the model');
    await store.close();
    const r = await backend.open(a, 'd0', size);
    t.ok(r.store.initialComplete, 'completion is durable');
    t.equal(sha(await readAll(r.store)), sha(d.model), 'after reopen the replica equals the model');
    t.ok(r.store.lastDurableSeq <= d.seq, 'lastDurableSeq is never ahead of what was written');
    // a store that is dropped without close (a crash): what resolved is there when reopened
    const d2 = new Disk(r.store, size);
    d.model.copy(d2.model);
    d2.seq = d.seq;
    await d2.write([[10, rnd()], [11, rnd()]]);
    await d2.write([[12, rnd()], [1, null]]);
    const crashed = await backend.open(a, 'd0', size).catch((err: Error) => err);
    // a backend may refuse a second concurrent open (it is the server's lease that prevents it);
    // then reopen after the first store's handles are released
    if (crashed instanceof Error) {
      await r.store.close();
      const re = await backend.open(a, 'd0', size);
      t.equal(sha(await readAll(re.store)), sha(d2.model), 'resolved writes are durable');
      await re.store.close();
    } else {
      t.equal(sha(await readAll(crashed.store)), sha(d2.model), 'resolved writes are durable without a close');
      await crashed.store.close();
      await r.store.close().catch(() => undefined);
    }
  });

  t.test(`${name}: page digests are xxh64 of each page, empty ranges digest as zeros`, async (t) => {
    const { backend } = await make(t);
    const a = agentId();
    const size = 2 * MiB + 3 * 512; // the last page is short
    const { store } = await backend.open(a, 'd0', size);
    const data = rnd(3 * PAGE);
    await store.submit([{ offset: PAGE, length: data.length, data }, { offset: size - 3 * 512, length: 3 * 512, data: Buffer.alloc(3 * 512, 7) }], 1);
    const pages = Math.ceil(size / PAGE);
    const dig = await store.pageDigests(0, pages, PAGE);
    t.equal(dig.length, pages * 8, 'one digest per page, the short last page included');
    const model = Buffer.alloc(size);
    data.copy(model, PAGE);
    model.fill(7, size - 3 * 512);
    let bad = 0;
    for (let i = 0; i < pages; i++) {
      const want = xxh64(model.subarray(i * PAGE, Math.min((i + 1) * PAGE, size)));
      if (dig.readBigUInt64LE(8 * i) !== want) bad++;
    }
    t.equal(bad, 0, 'every digest matches the model');
    const one = await store.pageDigests(2, 1, PAGE);
    t.equal(one.readBigUInt64LE(0), xxh64(model.subarray(2 * PAGE, 3 * PAGE)), 'a single page');
    await t.rejects(store.pageDigests(pages, 1, PAGE), { code: 'MOB_ERR_OUT_OF_RANGE' }, 'digests past the end are refused');
    await store.close();
  });

  t.test(`${name}: a grown source grows the replica (new space reads as zeros); a shrunk one is refused`, async (t) => {
    const { backend } = await make(t);
    const a = agentId();
    const { store } = await backend.open(a, 'd0', MiB);
    const b = rnd();
    await store.submit([{ offset: 0, length: BS, data: b }], 1);
    await store.close();
    await t.rejects(backend.open(a, 'd0', MiB / 2), { code: 'MOB_ERR_DISK_SIZE_CHANGED' }, 'shrinking is refused');
    const { store: g, created } = await backend.open(a, 'd0', 3 * MiB);
    t.notOk(created);
    t.equal(g.sizeBytes, 3 * MiB, 'grown');
    t.equal(sha(await g.read(0, BS)), sha(b), 'old data kept');
    t.ok((await g.read(2 * MiB, MiB)).every((x) => x === 0), 'new space reads as zeros');
    const more = rnd();
    await g.submit([{ offset: 3 * MiB - BS, length: BS, data: more }], 2);
    t.equal(sha(await g.read(3 * MiB - BS, BS)), sha(more), 'the new space is writable');
    await g.close();
    t.equal((await backend.stat(a, 'd0'))?.sizeBytes, 3 * MiB, 'the new size is recorded');
  });

  t.test(`${name}: points materialise byte-exact while the replica moves on; pruning keeps the rest exact`, async (t) => {
    const { backend } = await make(t);
    const a = agentId();
    const size = 4 * MiB;
    const { store } = await backend.open(a, 'd0', size);
    const d = new Disk(store, size);
    await d.write(Array.from({ length: 16 }, (_, i) => [i, rnd()] as [number, Buffer]));
    await store.endPass('initial', ++d.seq);
    const points: { dp: DiskPoint; sha: string }[] = [];
    const cut = async (id: string) => {
      const ref = await store.preparePoint(id);
      t.type(ref, 'object', 'preparePoint returns a reference');
      await store.commitPoint(id);
      await store.commitPoint(id); // idempotent
      const dp: DiskPoint = { pointId: id, seq: d.seq, sizeBytes: store.sizeBytes, ref };
      points.push({ dp, sha: sha(d.model) });
      return dp;
    };
    const p1 = await cut('rp-000001');
    await d.write([[0, rnd()], [3, null], [20, rnd()], [63, rnd()]]);
    const p2 = await cut('rp-000002');
    await d.write([[0, rnd()], [1, rnd()], [20, null], [40, rnd()]]);
    await d.write([[1, rnd()]]);
    const p3 = await cut('rp-000003');
    await d.write([[2, rnd()], [40, rnd()], [41, null]]);
    const live = () => points.map((p) => p.dp);
    const epochsOf = (dp: DiskPoint) => async () => live().filter((x) => x.pointId >= dp.pointId);
    const out = await tmpDir(t, 'conf-points-');
    const check = async (dp: DiskPoint, want: string, what: string) => {
      const img = await backend.materialize(a, 'd0', dp, epochsOf(dp), 'test-failover');
      t.equal(img.pointId, dp.pointId);
      t.equal(img.sizeBytes, dp.sizeBytes);
      const file = path.join(out, `${dp.pointId}-${Math.random().toString(36).slice(2)}.img`);
      await fsp.writeFile(file, 'an older file of another mode', { mode: 0o644 });
      await fsp.chmod(file, 0o644);
      const dl = await backend.download(img, file);
      t.ok(dl.ms >= 0);
      t.equal((await fsp.stat(file)).mode & 0o777, 0o600, `${what}: the downloaded image is 0600 even over an older file`);
      const got = await fsp.readFile(file);
      t.equal(got.length, dp.sizeBytes, `${what}: the image has the point's size`);
      t.equal(sha(got), want, `${what}: byte-exact`);
      await backend.removeImage(img);
      await backend.removeImage(img); // idempotent
      t.notOk((await backend.images(a, 'test-failover')).some((i) => i.pointId === dp.pointId && i.diskId === 'd0'), `${what}: the image is gone`);
    };
    for (const p of points) await check(p.dp, p.sha, `point ${p.dp.pointId}`);
    t.equal(sha(await readAll(store)), sha(d.model), 'the replica itself moved on unharmed');
    // prune the oldest
    points.shift();
    await backend.prunePoint(a, 'd0', p1);
    await backend.prunePoint(a, 'd0', p1); // idempotent
    await check(p2, points[0].sha, 'point 2 after pruning point 1');
    await check(p3, points[1].sha, 'point 3 after pruning point 1');
    // orphans: data of a point the catalog does not name goes; named points stay exact
    const removed = await backend.removeOrphans(a, 'd0', [p3]);
    t.ok(removed.length >= 1, `the unnamed point's data is an orphan (${removed.join(', ')})`);
    t.same(await backend.removeOrphans(a, 'd0', [p3]), [], 'idempotent');
    points.shift();
    await check(p3, points[0].sha, 'point 3 after orphans were removed');
    await store.close();
  });

  t.test(`${name}: overlapping writes and spans of 512-byte pages: the later write wins, reads see the newest, points stay exact`, async (t) => {
    const { backend } = await make(t);
    const a = agentId();
    const size = 2 * MiB;
    const { store } = await backend.open(a, 'd0', size);
    const d = new Disk(store, size);
    await d.write(Array.from({ length: 32 }, (_, i) => [i, rnd()] as [number, Buffer]));
    await store.endPass('initial', ++d.seq);
    /** Submits ops (in order) as one submit, applying them to the model in the same order. */
    const submit = (ops: WriteOp[]) => {
      for (const op of ops) {
        if (op.data) op.data.copy(d.model, op.offset, 0, op.length);
        else d.model.fill(0, op.offset, op.offset + op.length);
      }
      return store.submit(ops, ++d.seq);
    };
    const span = (at: number, len: number, data: Buffer | null = rnd(len)): WriteOp => ({ offset: at, length: len, data });
    const points: { dp: DiskPoint; sha: string }[] = [];
    const cut = async (id: string) => {
      const ref = await store.preparePoint(id);
      await store.commitPoint(id);
      const dp: DiskPoint = { pointId: id, seq: d.seq, sizeBytes: store.sizeBytes, ref };
      points.push({ dp, sha: sha(d.model) });
    };
    await cut('rp-000001');
    // one submit: a later span starting before an earlier one and ending inside it (sorted by
    // offset they would apply in the wrong order), a whole block then a span over it, a span then
    // zeros over part of it
    await submit([span(BS + 8192, 8192), span(BS + 4096, 8192), span(3 * BS, BS), span(3 * BS + 512, 1024), span(5 * BS + 512, 4096), span(5 * BS + 1024, 1024, null)]);
    t.equal(sha(await store.read(0, size)), sha(d.model), 'one submit of overlapping writes: the later one wins');
    // across submits, not yet durable: reads must see the newest (a whole block, then a span inside it)
    const p1 = submit([span(7 * BS, BS)]);
    const p2 = submit([span(7 * BS + 1536, 512)]);
    t.equal(sha(await store.read(7 * BS, BS)), sha(d.model.subarray(7 * BS, 8 * BS)), 'a whole block then a span over it read back as the newest, before either is durable');
    t.equal(sha(await store.read(7 * BS + 1024, 2048)), sha(d.model.subarray(7 * BS + 1024, 7 * BS + 3072)), 'a range across both reads back as the newest');
    await Promise.all([p1, p2]);
    await cut('rp-000002');
    // spans of 512-byte pages inside 4 KiB units, the same units written again in a later batch:
    // the point's old bytes of the whole unit must be kept
    await submit([span(9 * BS + 512, 512)]);
    await submit([span(9 * BS + 2048, 512), span(9 * BS, 512)]);
    await submit([span(11 * BS + 3584, 1024)]); // across a unit boundary
    await submit([span(11 * BS + 4608, 512), span(11 * BS + 1024, 512)]);
    await cut('rp-000003');
    await submit([span(9 * BS, BS, null), span(11 * BS + 4096 - 512, 512)]);
    t.equal(sha(await store.read(0, size)), sha(d.model), 'the replica equals the model');
    const out = await tmpDir(t, 'conf-spans-');
    const live = () => points.map((p) => p.dp);
    for (const p of points) {
      const img = await backend.materialize(a, 'd0', p.dp, async () => live().filter((x) => x.pointId >= p.dp.pointId), 'test-failover');
      const file = path.join(out, `${p.dp.pointId}.img`);
      await backend.download(img, file);
      t.equal(sha(await fsp.readFile(file)), p.sha, `point ${p.dp.pointId} is byte-exact`);
      await backend.removeImage(img);
    }
    await store.close();
    const r = await backend.open(a, 'd0', size);
    t.equal(sha(await readAll(r.store)), sha(d.model), 'after reopen the replica equals the model');
    await r.store.close();
  });

  t.test(`${name}: promote: a failover image reads like the point, and adopt makes it the replica under a new generation`, async (t) => {
    const { backend } = await make(t);
    const a = agentId();
    const size = 2 * MiB;
    const { store } = await backend.open(a, 'd0', size);
    const d = new Disk(store, size);
    await d.write([[0, rnd()], [1, rnd()], [31, rnd()]]);
    await store.endPass('initial', ++d.seq);
    const ref = await store.preparePoint('rp-000001');
    await store.commitPoint('rp-000001');
    const dp: DiskPoint = { pointId: 'rp-000001', seq: d.seq, sizeBytes: size, ref };
    const atPoint = Buffer.from(d.model);
    await d.write([[0, rnd()], [2, rnd()]]);
    const gen = store.generation;
    await store.close();
    const img = await backend.materialize(a, 'd0', dp, async () => [dp], 'failover');
    t.equal(img.purpose, 'failover');
    t.ok((await backend.images(a, 'failover')).some((i) => i.diskId === 'd0'), 'the failover image is listed');
    const reader = await backend.openImage(img);
    t.equal(reader.sizeBytes, size);
    t.equal(sha(await reader.read(0, 16, PAGE)), sha(atPoint.subarray(0, 16 * PAGE)), 'reprotect reads the point');
    const dig = await reader.pageDigests(0, size / PAGE, PAGE);
    let bad = 0;
    for (let i = 0; i < size / PAGE; i++) if (dig.readBigUInt64LE(8 * i) !== xxh64(atPoint.subarray(i * PAGE, (i + 1) * PAGE))) bad++;
    t.equal(bad, 0, 'reprotect digests are the point\'s');
    await t.rejects(reader.read(size / PAGE, 1, PAGE), { code: 'MOB_ERR_OUT_OF_RANGE' }, 'reads past the image are refused');
    await reader.close();
    await backend.adopt(img);
    const st = await backend.stat(a, 'd0');
    t.not(st?.generation, gen, 'a new generation');
    t.equal(st?.initialComplete, true, 'the adopted replica is complete');
    const { store: s2 } = await backend.open(a, 'd0', size);
    t.equal(sha(await readAll(s2)), sha(atPoint), 'the replica is the promoted image');
    await s2.close();
    t.same((await backend.images(a, 'failover')).filter((i) => i.diskId === 'd0'), [], 'the adopted image is no longer an image');
  });

  t.test(`${name}: an unpublished replica is invisible and discard leaves nothing`, async (t) => {
    const { backend } = await make(t);
    const a = agentId();
    const { store, created } = await backend.open(a, 'd0', MiB, { publish: false });
    t.ok(created);
    t.ok(store.unpublished, 'unpublished');
    await store.submit([{ offset: 0, length: BS, data: rnd() }], 1);
    t.same(await backend.disks(a), [], 'not listed');
    t.equal(await backend.stat(a, 'd0'), null, 'no stat');
    await store.discard();
    await store.discard(); // idempotent
    t.same(await backend.disks(a), [], 'still nothing');
    const next = await backend.open(a, 'd0', MiB, { publish: false });
    t.ok(next.created, 'a later open creates it afresh');
    t.ok((await next.store.read(0, BS)).every((x) => x === 0), 'with none of the discarded data');
    await next.store.publish();
    t.notOk(next.store.unpublished);
    t.same(await backend.disks(a), ['d0'], 'published: listed');
    await next.store.close();
    // close of an unpublished replica drops it too
    const other = await backend.open(a, 'd1', MiB, { publish: false });
    await other.store.close();
    t.same(await backend.disks(a), ['d0'], 'close drops an unpublished replica');
  });

  t.test(`${name}: remove deletes the replica and its points; bad input gets codes`, async (t) => {
    const { backend } = await make(t);
    const a = agentId();
    await t.rejects(backend.open(a, 'd0', MiB, { readOnly: true }), { code: 'MOB_ERR_UNKNOWN_DISK' }, 'read-only open of an unknown disk');
    t.same(await backend.disks(a), [], 'and it created nothing');
    await t.rejects(backend.checkFits(a, 'd0', 9007199254740480), { code: 'MOB_ERR_DISK_TOO_LARGE' }, 'a disk too large for the backend is refused');
    t.same(await backend.disks(a), [], 'checkFits creates nothing');
    const { store } = await backend.open(a, 'd0', MiB);
    await t.rejects(async () => store.submit([{ offset: MiB - 512, length: 1024, data: rnd(1024) }], 1), { code: 'MOB_ERR_OUT_OF_RANGE' }, 'a write past the end');
    await t.rejects(async () => store.read(MiB, 512), { code: 'MOB_ERR_OUT_OF_RANGE' }, 'a read past the end');
    await t.rejects(async () => store.read(-512, 512), { code: 'MOB_ERR_OUT_OF_RANGE' }, 'a negative offset');
    await store.submit([{ offset: 0, length: BS, data: rnd() }], 1);
    t.equal(store.failure, null, 'bad input did not break the store');
    await store.endPass('initial', 2);
    const ref = await store.preparePoint('rp-000001');
    await store.commitPoint('rp-000001');
    await store.close();
    await backend.remove(a, 'd0');
    await backend.remove(a, 'd0'); // idempotent
    t.equal(await backend.stat(a, 'd0'), null, 'removed');
    t.same(await backend.disks(a), []);
    t.notOk((await backend.agents()).includes(a), 'an agent without replicas is not listed');
    await t.rejects(backend.materialize(a, 'd0', { pointId: 'rp-000001', seq: 2, sizeBytes: MiB, ref }, async () => [], 'test-failover'),
      'a point of a removed disk cannot be materialised');
  });
}
