import t from 'tap';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { ReplicaStore } from '../../src/replication/replica-store.js';
import { Wal, encodeRecordHeader } from '../../src/replication/wal.js';
import { tmpDir } from '../helpers.js';

const SIZE = 1024 * 1024;

t.test('writes before the initial pass completes go straight to the replica; zero writes keep holes', async (t) => {
  const dir = await tmpDir(t);
  const { store, created } = await ReplicaStore.open(dir, 'a', 'd', SIZE);
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
  const { store } = await ReplicaStore.open(dir, 'a', 'd', SIZE);
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
  const { store: s2, created } = await ReplicaStore.open(dir, 'a', 'd', SIZE);
  t.notOk(created);
  t.equal(s2.lastDurableSeq, 6, 'durable sequence recovered from the log');
  const rep = await fsp.readFile(path.join(dir, 'replica.img'));
  t.ok(rep.subarray(0, 4096).every((b) => b === 0xaa) && rep.subarray(8192, 12288).every((b) => b === 0xbb), 'logged writes applied');
  t.ok(rep.subarray(4096, 8192).every((b) => b === 0), 'nothing else touched');
  t.ok(rep.subarray(16384, 20480).every((b) => b === 0), 'a batch without its commit record is not applied');
  t.equal((await fsp.stat(path.join(dir, 'wal.log'))).size, 0, 'log checkpointed');
  // replay is idempotent: opening again changes nothing
  await s2.close();
  const { store: s3 } = await ReplicaStore.open(dir, 'a', 'd', SIZE);
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
  const { store } = await ReplicaStore.open(dir, 'a', 'd', SIZE);
  await store.close();
  await t.rejects(ReplicaStore.open(dir, 'a', 'd', SIZE / 2), { code: 'MOB_ERR_DISK_SIZE_CHANGED' });
  const { store: grown } = await ReplicaStore.open(dir, 'a', 'd', SIZE * 2);
  t.equal(grown.sizeBytes, SIZE * 2, 'a grown disk grows its replica');
  await grown.close();
  await fsp.writeFile(path.join(dir, 'state.json'), '{"version":1,');
  await t.rejects(ReplicaStore.open(dir, 'a', 'd', SIZE), { code: 'MOB_ERR_STATE_CORRUPT' });
  await fsp.rm(path.join(dir, 'state.json'));
  await t.rejects(ReplicaStore.open(dir, 'a', 'd', SIZE), { code: 'MOB_ERR_STATE_CORRUPT' }, 'a replica without its state is never overwritten');
  t.equal((await fsp.stat(path.join(dir, 'replica.img'))).size, SIZE * 2, 'replica untouched');
  await t.rejects(ReplicaStore.open(path.join(dir, 'nope'), 'a', 'd', SIZE, { readOnly: true }), { code: 'MOB_ERR_UNKNOWN_DISK' });
  t.equal(await fsp.stat(path.join(dir, 'nope')).then(() => true, () => false), false, 'read-only open creates nothing');
});
