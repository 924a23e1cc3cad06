import t from 'tap';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { LocalReplicaStore } from '../../../src/target/local/local-store.js';
import { Wal, encodeRecordHeader } from '../../../src/target/local/wal.js';
import { tmpDir } from '../../helpers.js';
import { mountExt4 } from '../../mount-helpers.js';

const SIZE = 1024 * 1024;

t.test('writes before the initial pass completes go straight to the replica; zero writes keep holes', async (t) => {
  const dir = await tmpDir(t);
  const { store, created } = await LocalReplicaStore.open(dir, 'a', 'd', SIZE);
  t.ok(created);
  await store.submit([{ offset: 65536, length: 65536, data: Buffer.alloc(65536, 7) }, { offset: 0, length: 65536, data: null }], 1);
  t.equal(store.lastDurableSeq, 1);
  const st = await fsp.stat(path.join(dir, 'replica.img'));
  t.equal(st.size, SIZE);
  t.ok(st.blocks * 512 <= 128 * 1024, 'zero block left as a hole');
  t.equal(await fsp.stat(path.join(dir, 'wal.log')).then((s) => s.size), 0, 'no WAL during the initial pass');
  t.throws(() => store.submit([{ offset: SIZE - 4096, length: 8192, data: Buffer.alloc(8192) }], 2), { code: 'MOB_ERR_OUT_OF_RANGE' });
  await store.close();
});

t.test('WAL: a crash after the log is durable is recovered on open; a torn tail is cut off', async (t) => {
  const dir = await tmpDir(t);
  const { store } = await LocalReplicaStore.open(dir, 'a', 'd', SIZE);
  await store.endPass('initial', 1);
  t.ok(store.initialComplete);
  await store.close();
  // what a server killed after fsyncing the log but before applying it leaves behind
  const wal = await Wal.open(path.join(dir, 'wal.log'));
  await wal.append([
    { seq: 5, offset: 0, length: 4096, data: Buffer.alloc(4096, 0xaa) },
    { seq: 6, offset: 8192, length: 4096, data: Buffer.alloc(4096, 0xbb) },
  ]);
  await wal.close();
  // a batch whose records reached the log but whose commit record did not: never acknowledged
  const uncommitted = Buffer.alloc(4096, 0xdd);
  await fsp.appendFile(path.join(dir, 'wal.log'), Buffer.concat([encodeRecordHeader({ seq: 9, offset: 16384, length: 4096, data: uncommitted }), uncommitted]));
  await fsp.appendFile(path.join(dir, 'wal.log'), Buffer.from('MWAL torn record that never became durable'));
  const { store: s2, created } = await LocalReplicaStore.open(dir, 'a', 'd', SIZE);
  t.notOk(created);
  t.equal(s2.lastDurableSeq, 6, 'durable sequence recovered from the log');
  const rep = await fsp.readFile(path.join(dir, 'replica.img'));
  t.ok(rep.subarray(0, 4096).every((b) => b === 0xaa) && rep.subarray(8192, 12288).every((b) => b === 0xbb), 'logged writes applied');
  t.ok(rep.subarray(4096, 8192).every((b) => b === 0), 'nothing else touched');
  t.ok(rep.subarray(16384, 20480).every((b) => b === 0), 'a batch without its commit record is not applied');
  t.equal((await fsp.stat(path.join(dir, 'wal.log'))).size, 0, 'log checkpointed');
  // replay is idempotent: opening again changes nothing
  await s2.close();
  const { store: s3 } = await LocalReplicaStore.open(dir, 'a', 'd', SIZE);
  t.same(await fsp.readFile(path.join(dir, 'replica.img')), rep);
  // after the initial pass, writes go through the WAL and reads see them at once
  const p = s3.submit([{ offset: 4096, length: 4096, data: Buffer.alloc(4096, 0xcc) }], 7);
  t.ok((await s3.read(4096, 4096)).every((b) => b === 0xcc), 'accepted write visible before it is applied');
  await p;
  t.equal(s3.lastDurableSeq, 7);
  await s3.close();
});

t.test('a damaged state file is a coded error, and a shrunk disk is refused', async (t) => {
  const dir = await tmpDir(t);
  const { store } = await LocalReplicaStore.open(dir, 'a', 'd', SIZE);
  await store.close();
  await t.rejects(LocalReplicaStore.open(dir, 'a', 'd', SIZE / 2), { code: 'MOB_ERR_DISK_SIZE_CHANGED' });
  const { store: grown } = await LocalReplicaStore.open(dir, 'a', 'd', SIZE * 2);
  t.equal(grown.sizeBytes, SIZE * 2, 'a grown disk grows its replica');
  await grown.submit([{ offset: 4096, length: 4096, data: Buffer.alloc(4096, 9) }], 1);
  await grown.close();
  await fsp.writeFile(path.join(dir, 'state.json'), '{"version":1,');
  await t.rejects(LocalReplicaStore.open(dir, 'a', 'd', SIZE), { code: 'MOB_ERR_STATE_CORRUPT' });
  await fsp.rm(path.join(dir, 'state.json'));
  await t.rejects(LocalReplicaStore.open(dir, 'a', 'd', SIZE), { code: 'MOB_ERR_STATE_CORRUPT' }, 'a replica without its state is never overwritten');
  t.equal((await fsp.stat(path.join(dir, 'replica.img'))).size, SIZE * 2, 'replica untouched');
  t.ok((await fsp.readFile(path.join(dir, 'replica.img'))).subarray(4096, 8192).every((b) => b === 9), 'its data too');
  await t.rejects(LocalReplicaStore.open(path.join(dir, 'nope'), 'a', 'd', SIZE, { readOnly: true }), { code: 'MOB_ERR_UNKNOWN_DISK' });
  t.equal(await fsp.stat(path.join(dir, 'nope')).then(() => true, () => false), false, 'read-only open creates nothing');
});

/** Everything below `root`, as sorted relative paths. */
async function tree(root: string): Promise<string[]> {
  const out: string[] = [];
  const walk = async (d: string, rel: string) => {
    for (const e of await fsp.readdir(d, { withFileTypes: true }).catch(() => [])) {
      out.push(path.join(rel, e.name));
      if (e.isDirectory()) await walk(path.join(d, e.name), path.join(rel, e.name));
    }
  };
  await walk(root, '');
  return out.sort();
}

t.test('a directory a failed creation left behind (no state.json, no data) is treated as new', async (t) => {
  const root = await tmpDir(t);
  const dir = path.join(root, 'agent', 'd');
  // what the EFBIG failure of earlier versions left: 0-byte replica.img and wal.log, no state.json
  await fsp.mkdir(dir, { recursive: true });
  await fsp.writeFile(path.join(dir, 'replica.img'), '');
  await fsp.writeFile(path.join(dir, 'wal.log'), '');
  await fsp.writeFile(path.join(dir, `state.json.tmp-${process.pid}`), '{"version":1,');
  const { store, created } = await LocalReplicaStore.open(dir, 'a', 'd', SIZE);
  t.ok(created, 'empty leftovers: a new replica');
  t.equal(store.dir, dir);
  await store.submit([{ offset: 0, length: 4096, data: Buffer.alloc(4096, 3) }], 1);
  await store.close();
  t.same(await tree(root), ['agent', 'agent/d', 'agent/d/replica.img', 'agent/d/state.json', 'agent/d/wal.log'], 'replaced, nothing else left');
  t.equal((await fsp.stat(path.join(dir, 'replica.img'))).size, SIZE);

  // a big all-hole replica.img (nothing allocated) is no data either
  await fsp.rm(path.join(dir, 'state.json'));
  await fsp.rm(path.join(dir, 'replica.img'));
  await fsp.writeFile(path.join(dir, 'replica.img'), '');
  await fsp.truncate(path.join(dir, 'replica.img'), 1024 * 1024 * 1024);
  const r2 = await LocalReplicaStore.open(dir, 'a', 'd', SIZE);
  t.ok(r2.created, 'all-hole leftover: a new replica');
  t.equal(r2.store.sizeBytes, SIZE, 'with the announced size');
  await r2.store.close();

  // but a replica.img with data, a non-empty wal.log or anything unexpected is never overwritten
  for (const [name, prepare] of [
    ['data in replica.img', async () => { await fsp.writeFile(path.join(dir, 'replica.img'), Buffer.concat([Buffer.alloc(8192), Buffer.from([1])])); }],
    ['non-empty wal.log', async () => { await fsp.writeFile(path.join(dir, 'wal.log'), 'x'); }],
    ['an unexpected file', async () => { await fsp.writeFile(path.join(dir, 'notes.txt'), ''); }],
  ] as const) {
    await fsp.rm(dir, { recursive: true, force: true });
    await fsp.mkdir(dir, { recursive: true });
    await fsp.writeFile(path.join(dir, 'replica.img'), '');
    await prepare();
    const before = await tree(root);
    await t.rejects(LocalReplicaStore.open(dir, 'a', 'd', SIZE), { code: 'MOB_ERR_STATE_CORRUPT' }, `${name}: refused`);
    t.same(await tree(root), before, `${name}: nothing changed`);
  }
});

t.test('a new replica is created atomically: unpublished, discarded, or swept after a crash', async (t) => {
  const root = await tmpDir(t);
  const dir = path.join(root, 'replicas', 'agent', 'd');
  await fsp.mkdir(path.join(root, 'replicas'));
  // unpublished: lives in a temporary sibling, invisible under its disk id
  const { store, created } = await LocalReplicaStore.open(dir, 'a', 'd', SIZE, { publish: false });
  t.ok(created);
  t.ok(store.unpublished);
  t.equal(await fsp.stat(dir).then(() => true, () => false), false, 'nothing under the disk id before publish');
  await store.discard();
  t.same(await tree(root), ['replicas'], 'discard removes the replica and the agent directory it created');

  const again = await LocalReplicaStore.open(dir, 'a', 'd', SIZE, { publish: false });
  await again.store.close();
  t.same(await tree(root), ['replicas'], 'closing an unpublished replica discards it');

  const pub = await LocalReplicaStore.open(dir, 'a', 'd', SIZE, { publish: false });
  await pub.store.publish();
  t.notOk(pub.store.unpublished);
  await pub.store.submit([{ offset: 0, length: 4096, data: Buffer.alloc(4096, 5) }], 1);
  await pub.store.close();
  t.same(await tree(path.join(root, 'replicas')), ['agent', 'agent/d', 'agent/d/replica.img', 'agent/d/state.json', 'agent/d/wal.log'], 'published in place');
  const st = JSON.parse(await fsp.readFile(path.join(dir, 'state.json'), 'utf8')) as { lastDurableSeq: number; generation: string };
  t.equal(st.lastDurableSeq, 1, 'writes after publish land in the published replica');

  // a crash between the two renames of a publish, and a crashed creation: stale siblings are swept
  const dead = process.pid + 4_000_000; // above the largest pid_max: never a live process
  await fsp.mkdir(path.join(root, 'replicas', 'agent', `.e~new-${dead}-0badf00d`));
  await fsp.writeFile(path.join(root, 'replicas', 'agent', `.e~new-${dead}-0badf00d`, 'replica.img'), '');
  await fsp.mkdir(path.join(root, 'replicas', 'agent', `.e~old-${process.pid}-0badf00d`));
  const other = await LocalReplicaStore.open(path.join(root, 'replicas', 'agent', 'e'), 'a', 'e', SIZE);
  await other.store.close();
  t.same((await fsp.readdir(path.join(root, 'replicas', 'agent'))).sort(), ['d', 'e'], 'stale temporary directories swept at open');

  // a state-less clean close leaves state.json alone (nothing to checkpoint)
  const before = await fsp.readFile(path.join(dir, 'state.json'), 'utf8');
  const ro = await LocalReplicaStore.open(dir, 'a', 'd', SIZE);
  await ro.store.close();
  t.equal(await fsp.readFile(path.join(dir, 'state.json'), 'utf8'), before, 'a session that wrote nothing does not rewrite state.json');
});

t.test('a disk the filesystem cannot hold: MOB_ERR_DISK_TOO_LARGE and nothing created', async (t) => {
  const mnt = await mountExt4(t, { sizeMb: 32, blockSize: 1024 });
  const dir = path.join(mnt, 'replicas', 'agent', 'd');
  await fsp.mkdir(path.join(mnt, 'replicas'));
  const before = await tree(mnt);
  await t.rejects(LocalReplicaStore.open(dir, 'a', 'd', 20 * 1024 ** 4), { code: 'MOB_ERR_DISK_TOO_LARGE' });
  t.same(await tree(mnt), before, 'no directory or file was created');
  const { store, created } = await LocalReplicaStore.open(dir, 'a', 'd', SIZE);
  t.ok(created, 'the same disk id then works');
  await store.close();
});
