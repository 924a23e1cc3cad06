import t from 'tap';
import { BufferPool } from '../../src/util/buffer-pool.js';

t.test('buffers come back for the next user, within the retained count', async (t) => {
  const pool = new BufferPool(1024, 2);
  const a = pool.take(100);
  t.ok(a.length >= 1024, 'at least the minimum size');
  pool.give(a);
  t.equal(pool.take(500), a, 'a given-back buffer is handed out again');
  const big = pool.take(4096);
  t.equal(big.length, 4096, 'a request above the minimum gets its own size');
  pool.give(a);
  pool.give(a);
  t.equal(pool.idle, 1, 'the same buffer given twice is kept once');
  pool.give(big);
  pool.give(Buffer.alloc(2048));
  t.equal(pool.idle, 2, 'no more than `keep` idle buffers');
  t.equal(pool.take(3000), big, 'a large enough idle buffer is chosen');
  t.not(pool.take(8192), a, 'none large enough: a new one');
});
