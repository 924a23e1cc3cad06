import t from 'tap';
import { BufferPool } from '../../src/util/buffer-pool.js';

t.test('buffers come back for the next user, within the retained count', async (t) => {
  const pool = new BufferPool(1024, 2);
  const a = pool.take(600);
  t.ok(a.length >= 1024, 'at least the minimum size');
  pool.give(a);
  t.equal(pool.take(700), a, 'a given-back buffer is handed out again');
  const big = pool.take(4096);
  t.equal(big.length, 4096, 'a request above the minimum gets its own size');
  pool.give(a);
  pool.give(a);
  t.equal(pool.idle, 1, 'the same buffer given twice is kept once');
  pool.give(big);
  pool.give(Buffer.alloc(2048));
  t.equal(pool.idle, 2, 'no more than `keep` idle buffers');
  t.equal(pool.take(3000), big, 'a large enough idle buffer is chosen');
  const fresh = pool.take(8192);
  t.not(fresh, a, 'none large enough: a new one');
  t.equal(fresh.length, 8192);
  t.equal(pool.idle, 1, 'the idle one too small for 8192 stays idle');
});

t.test('small requests get exact-size buffers that never enter the pool', async (t) => {
  const pool = new BufferPool(1024 * 1024, 4);
  const small = pool.take(1300);
  t.equal(small.length, 1300, 'a small frame does not pin a pooled buffer');
  pool.give(small);
  t.equal(pool.idle, 0, 'a buffer under the minimum size is not kept');
  const big = pool.take(600 * 1024);
  t.equal(big.length, 1024 * 1024, 'half the minimum or more: a pooled, minimum-size buffer');
  pool.give(big);
  t.equal(pool.idle, 1);
  t.not(pool.take(100), big, 'a small request does not take the idle pooled buffer');
  t.equal(pool.idle, 1);
});
