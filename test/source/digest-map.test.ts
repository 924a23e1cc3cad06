import t from 'tap';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { DigestMap } from '../../src/source/digest-map.js';
import { tmpDir } from '../helpers.js';

t.test('digest map: durable round trip, mode 0600, damage detected', async (t) => {
  const dir = await tmpDir(t);
  const file = path.join(dir, 'd.map');
  t.equal(await DigestMap.load(file), null, 'no map yet');
  const m = new DigestMap({ version: 1, diskId: 'd', diskSize: 1024 * 1024 + 512, pageSize: 4096, generation: 'g1' });
  t.equal(m.pages, 257);
  m.set(3, 12345n);
  m.set(256, 0n);
  await m.save(file);
  t.equal((await fsp.stat(file)).mode & 0o777, 0o600);
  const l = (await DigestMap.load(file))!;
  t.equal(l.digests[3], 12345n);
  t.equal(l.digests[256], 1n, 'a digest of 0 is stored as 1 (0 means unknown)');
  t.equal(l.knownPages(), 2);
  t.equal(l.header.generation, 'g1');
  const buf = await fsp.readFile(file);
  for (const cut of [0, 5, buf.length - 1]) {
    await fsp.writeFile(file, buf.subarray(0, cut));
    await t.rejects(DigestMap.load(file), { code: 'MOB_ERR_STATE_CORRUPT' }, `truncated to ${cut}`);
  }
  const flipped = Buffer.from(buf);
  flipped[flipped.length - 20] ^= 1;
  await fsp.writeFile(file, flipped);
  await t.rejects(DigestMap.load(file), { code: 'MOB_ERR_STATE_CORRUPT' }, 'one flipped bit');
});

t.test('digest map: block digests round trip, are forgotten when a page changes or the block size does', async (t) => {
  const dir = await tmpDir(t);
  const file = path.join(dir, 'd.map');
  const m = new DigestMap({ version: 2, diskId: 'd', diskSize: 256 * 1024, pageSize: 4096, generation: 'g1' });
  t.equal(m.blockDigests.length, 0, 'no block size yet: no block digests');
  m.useBlockSize(64 * 1024);
  t.equal(m.blockDigests.length, 4);
  for (let p = 16; p < 32; p++) m.set(p, BigInt(p + 100));
  m.setBlock(1, 777n);
  m.setBlock(2, 888n);
  m.set(40, 5n); // a page of block 2 changes: its block digest is no longer known
  t.equal(m.blockDigests[2], 0n, 'setting a page forgets its block digest');
  await m.save(file);
  const l = (await DigestMap.load(file))!;
  t.equal(l.header.blockSize, 64 * 1024);
  t.equal(l.blockDigests[1], 777n, 'block digest survives a round trip');
  t.equal(l.digests[20], 120n);
  l.useBlockSize(64 * 1024);
  t.equal(l.blockDigests[1], 777n, 'same block size keeps block digests');
  l.useBlockSize(128 * 1024);
  t.equal(l.blockDigests.length, 2);
  t.equal(l.blockDigests[0], 0n, 'another block size starts unknown');
  t.equal(l.digests[20], 120n, 'page digests are kept');

  // a v1 file (no block digests) still loads
  const head = Buffer.from(JSON.stringify({ version: 1, diskId: 'd', diskSize: 8192, pageSize: 4096, generation: 'g0' }));
  const body = Buffer.alloc(16);
  body.writeBigUInt64LE(9n, 0);
  const v1 = Buffer.alloc(4 + head.length + 16 + 8);
  v1.writeUInt32BE(head.length, 0);
  head.copy(v1, 4);
  body.copy(v1, 4 + head.length);
  const { xxh64 } = await import('@node-rs/xxhash');
  v1.writeBigUInt64LE(xxh64(v1.subarray(0, v1.length - 8)), v1.length - 8);
  await fsp.writeFile(file, v1);
  const old = (await DigestMap.load(file))!;
  t.equal(old.digests[0], 9n, 'v1 page digests load');
  t.equal(old.blockDigests.length, 0, 'v1 has no block digests');
});
