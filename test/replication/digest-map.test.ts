import t from 'tap';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { DigestMap } from '../../src/replication/digest-map.js';
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
