import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import crypto from 'node:crypto';
import { chooseSamples, digestPages, includeFromEnv, WrittenPages } from '../../src/source/cut-sample.js';
import { openDiskSource } from '../../src/source/disk-source.js';
import { LocalReplicaStore } from '../../src/target/local/local-store.js';
import { tmpDir } from '../helpers.js';

t.test('written pages: exact for small extents, bounded work and memory for huge ones', async (t) => {
  const w = new WrittenPages();
  w.add(8192, 4096, 4096);
  w.add(4096 * 10 + 100, 5000, 4096); // pages 10 and 11
  t.same([...w.list()].sort((a, b) => a - b), [2, 10, 11]);
  const t0 = process.hrtime.bigint();
  w.add(0, 2 ** 40, 4096); // a 1 TiB discard: 2^28 pages
  const ms = Number(process.hrtime.bigint() - t0) / 1e6;
  t.ok(w.size <= 4096, `the reservoir stays bounded (${w.size})`);
  t.ok(w.list().every((p) => p >= 0 && p < 2 ** 28), 'pages within the extent');
  t.comment(`a 1 TiB extent took ${ms.toFixed(2)} ms`);
  for (let i = 0; i < 10_000; i++) w.add(i * 4096, 4096, 4096);
  t.ok(w.size <= 4096, 'bounded after many extents');
  w.clear();
  t.equal(w.size, 0);
});

t.test('chooseSamples: random + written + included, unique, sorted, within the disk', async (t) => {
  const written = Array.from({ length: 500 }, (_, i) => 1000 + i);
  const s = chooseSamples({ totalPages: 100_000, written, random: 64, writtenBudget: 64, include: [5, 5, 99_999, 100_000, -1] });
  t.same(s, [...s].sort((a, b) => a - b), 'sorted');
  t.equal(new Set(s).size, s.length, 'unique');
  t.ok(s.includes(5) && s.includes(99_999), 'included pages are sampled');
  t.notOk(s.includes(100_000) || s.includes(-1), 'pages outside the disk are not');
  const fromWritten = s.filter((p) => p >= 1000 && p < 1500).length;
  t.ok(fromWritten >= 64, `at least the written budget comes from written pages (${fromWritten})`);
  t.ok(s.length <= 64 + 64 + 2, `at most random + written + included (${s.length})`);
  t.same(chooseSamples({ totalPages: 3, written: [], random: 64 }).length <= 3, true, 'a tiny disk: no more samples than pages');
  // fresh draws: two cuts sample different pages
  const a = chooseSamples({ totalPages: 1_000_000, written: [] });
  const b = chooseSamples({ totalPages: 1_000_000, written: [] });
  t.notSame(a, b, 'each cut draws afresh');
});

t.test('digestPages agrees with the replica store\'s page digests, short last page included', async (t) => {
  const dir = await tmpDir(t);
  const size = 3 * 4096 + 1024; // the last page is 1 KiB
  const data = crypto.randomBytes(size);
  const file = path.join(dir, 'disk.img');
  fs.writeFileSync(file, data);
  const src = await openDiskSource(file, { direct: false });
  t.teardown(() => src.close());
  const pages = [0, 2, 3];
  const got = await digestPages(src, pages, 4096);
  const { store } = await LocalReplicaStore.open(path.join(dir, 'replica'), 'a', 'd0', size);
  t.teardown(() => store.close());
  await store.submit([{ offset: 0, length: size, data }], 1);
  for (const [i, p] of pages.entries()) {
    t.equal(got.readBigUInt64LE(8 * i), (await store.pageDigests(p, 1, 4096)).readBigUInt64LE(0), `page ${p}`);
  }
});

t.test('includeFromEnv parses disk:page lists', async (t) => {
  t.same(includeFromEnv('d0', 'd0:1,2,x;d1:7'), [1, 2]);
  t.same(includeFromEnv('d1', 'd0:1,2;d1:7'), [7]);
  t.same(includeFromEnv('d2', 'd0:1'), []);
  t.same(includeFromEnv('d0', undefined), []);
});
