import t from 'tap';
import crypto from 'node:crypto';
import { WriteOverlay, resolveOverlaps, overlayInto } from '../../src/target/overlay.js';
import type { WriteOp } from '../../src/target/replica-store.js';

/** Applies ops in order to a buffer: the reference a store must match. */
function model(size: number, ops: WriteOp[]): Buffer {
  const b = Buffer.alloc(size, 0xee);
  for (const op of ops) overlayInto(b, 0, op);
  return b;
}

function randomOps(n: number, size: number): WriteOp[] {
  const ops: WriteOp[] = [];
  for (let i = 0; i < n; i++) {
    const len = 1 + crypto.randomInt(Math.min(size, 3 << 20));
    const offset = crypto.randomInt(size - len + 1);
    ops.push({ offset, length: len, data: crypto.randomInt(5) === 0 ? null : crypto.randomBytes(len) });
  }
  return ops;
}

t.test('resolveOverlaps: disjoint sorted pieces, the later op winning, equal to applying in order', async (t) => {
  const size = 4 << 20;
  for (let round = 0; round < 50; round++) {
    const ops = randomOps(1 + crypto.randomInt(12), size);
    const segs = resolveOverlaps(ops);
    for (let i = 1; i < segs.length; i++) t.ok(segs[i].start >= segs[i - 1].end, 'sorted and disjoint');
    const got = Buffer.alloc(size, 0xee);
    for (const s of segs) {
      if (s.data) s.data.copy(got, s.start, s.dataOffset, s.dataOffset + (s.end - s.start));
      else got.fill(0, s.start, s.end);
    }
    if (!got.equals(model(size, ops))) {
      t.fail(`round ${round}: differs from applying the ops in order`);
      return;
    }
  }
  t.pass('50 random batches match');
});

t.test('WriteOverlay: reads give the newest content of pending writes, across slices; removed writes are gone', async (t) => {
  const size = 8 << 20;
  const base = Buffer.alloc(size, 0xee);
  const ov = new WriteOverlay();
  const batches: { ops: WriteOp[]; ids: number[] }[] = [];
  for (let i = 0; i < 6; i++) {
    const ops = randomOps(5, size);
    batches.push({ ops, ids: ov.add(ops) });
  }
  const check = (what: string) => {
    const want = Buffer.from(base);
    for (const op of batches.flatMap((b) => b.ops)) overlayInto(want, 0, op);
    for (let k = 0; k < 40; k++) {
      const len = 1 + crypto.randomInt(2 << 20);
      const start = crypto.randomInt(size - len + 1);
      const { whole, pieces } = ov.read(start, start + len);
      let got: Buffer;
      if (whole) got = whole;
      else {
        got = Buffer.from(base.subarray(start, start + len));
        for (const p of pieces) overlayInto(got, start, p);
      }
      if (!got.equals(want.subarray(start, start + len))) {
        t.fail(`${what}: range ${start}+${len} differs`);
        return;
      }
    }
    t.pass(`${what}: 40 random reads match`);
  };
  check('six batches pending');
  // the oldest batches become durable: their bytes are in the base now
  for (const b of batches.splice(0, 3)) {
    for (const op of b.ops) overlayInto(base, 0, op);
    ov.remove(b.ids);
  }
  check('three applied and removed');
  const pieces = ov.read(0, size).pieces;
  t.ok(pieces.every((p) => p.data === null || !batches.flatMap((b) => b.ops).some((o) => o.data === p.data)), 'pieces are copies, not the pending buffers');
  for (const b of batches) ov.remove(b.ids);
  t.equal(ov.size, 0);
  t.same(ov.read(0, size), { whole: null, pieces: [] }, 'nothing pending');
});
