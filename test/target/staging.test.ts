import t from 'tap';
import { StagingArena, StagingPool } from '../../src/target/staging.js';

t.test('copies are independent of the caller\'s buffers and adjacent in arrival order', async (t) => {
  const pool = new StagingPool(1024, 2);
  const arena = new StagingArena(pool);
  const a = Buffer.alloc(100, 1);
  const b = Buffer.alloc(200, 2);
  const { ops, chunks } = arena.stage([{ offset: 0, length: 100, data: a }, { offset: 4096, length: 4096, data: null }, { offset: 100, length: 200, data: b }]);
  a.fill(9);
  b.fill(9);
  t.same([...new Set(ops[0].data!)], [1], 'the copy keeps what was given, whatever the caller does next');
  t.same([...new Set(ops[2].data!)], [2]);
  t.equal(ops[1].data, null, 'a zero op stays a zero op');
  t.equal(ops[0].data!.buffer, ops[2].data!.buffer, 'both copies in one chunk');
  t.equal(ops[0].data!.byteOffset + 100, ops[2].data!.byteOffset, 'one after the other');
  t.equal(chunks.length, 2, 'one chunk reference per copied op');
  arena.releaseAll(chunks);
  t.throws(() => arena.release(chunks[0]), /released more often/, 'a double release is caught');
});

t.test('a chunk returns to the pool only when every copy in it was released', async (t) => {
  const pool = new StagingPool(1024, 4);
  const arena = new StagingArena(pool);
  const first = arena.copy(Buffer.alloc(600, 1));
  const second = arena.copy(Buffer.alloc(600, 2)); // does not fit: a new chunk, the first one sealed
  t.not(first.data.buffer, second.data.buffer, 'a copy that does not fit starts a new chunk');
  t.equal(pool.idleChunks, 0);
  arena.release(first.chunk!);
  t.equal(pool.idleChunks, 1, 'the sealed first chunk is free once its copy is released');
  const third = arena.copy(Buffer.alloc(100, 3));
  t.equal(third.data.buffer, second.data.buffer, 'the current chunk takes more while it has room');
  arena.release(second.chunk!);
  t.equal(pool.idleChunks, 1, 'the current chunk stays with the arena while a copy in it is held');
  t.same([...new Set(third.data)], [3], 'and the held copy is intact');
  arena.release(third.chunk!);
  t.equal(pool.idleChunks, 2, 'an emptied current chunk goes back to the pool: an idle store holds nothing');
  const fourth = arena.copy(Buffer.alloc(50, 4));
  t.equal(pool.idleChunks, 1, 'the next copy takes a chunk from the pool again');
  arena.close();
  t.equal(pool.idleChunks, 1, 'closing with a copy held keeps its chunk out of the pool');
  arena.release(fourth.chunk!);
  t.equal(pool.idleChunks, 2, 'until that copy is released');
  const big = arena.copy(Buffer.alloc(5000, 5));
  t.equal(big.chunk, null, 'larger than a chunk: a buffer of its own, nothing to release');
  t.equal(big.data.length, 5000);
});

t.test('the pool keeps at most `keep` idle chunks', async (t) => {
  const pool = new StagingPool(64, 1);
  const x = pool.take();
  const y = pool.take();
  pool.give(x);
  pool.give(y);
  t.equal(pool.idleChunks, 1);
  pool.give(Buffer.alloc(32));
  t.equal(pool.idleChunks, 1, 'a buffer of another size is not kept');
});
