/**
 * GroupCommit (src/target/group-commit.ts): acknowledgements in submission order whatever order
 * batches finish in, batches touching the same bytes never in flight together, failures reject
 * everything not yet durable in order, and whenIdle waits for every batch still out.
 */
import t from 'tap';
import { MobilityError } from '../../src/errors.js';
import { GroupCommit, footprintOf, overlaps, type Batch } from '../../src/target/group-commit.js';
import type { WriteOp } from '../../src/target/replica-store.js';

/** A batch the test finishes by hand. */
interface Held { batch: Batch; ok(): void; fail(e: unknown): void }

function harness(o: { maxInFlight?: number; committed?: (b: Batch) => void | Promise<void> } = {}) {
  const held: Held[] = [];
  const log: string[] = [];
  const gc = new GroupCommit({
    maxInFlight: o.maxInFlight,
    footprint: (ops) => footprintOf(ops, 512),
    apply: (batch) => new Promise<void>((ok, fail) => { held.push({ batch, ok, fail }); log.push(`apply ${batch.maxSeq}`); }),
    committed: (b) => { log.push(`committed ${b.maxSeq}`); return o.committed?.(b); },
    failed: (err) => err instanceof MobilityError ? err : new MobilityError('MOB_ERR_STORAGE', String((err as Error)?.message ?? err)),
  });
  const submit = (offset: number, seq: number) => {
    const p = gc.submit([{ offset, length: 4096, data: Buffer.alloc(4096, seq) } satisfies WriteOp], seq);
    p.then(() => log.push(`ack ${seq}`), (e: MobilityError) => log.push(`reject ${seq} ${e.code}`));
    return p.catch(() => undefined);
  };
  return { gc, held, log, submit };
}

const tick = () => new Promise((r) => setImmediate(r));

t.test('acknowledgements follow submission order when a later batch finishes first', async (t) => {
  const h = harness({ maxInFlight: 4 });
  void h.submit(0, 1);
  await tick();
  void h.submit(8192, 2); // disjoint: dispatched while the first is out
  await tick();
  t.equal(h.held.length, 2, 'two batches in flight');
  h.held[1].ok();
  await tick();
  t.same(h.log.filter((l) => l.startsWith('ack')), [], 'the second is not acknowledged before the first');
  h.held[0].ok();
  await h.gc.whenIdle();
  await tick();
  t.same(h.log.filter((l) => l.startsWith('committed')), ['committed 1', 'committed 2']);
  t.same(h.log.filter((l) => l.startsWith('ack')), ['ack 1', 'ack 2']);
});

t.test('a batch touching bytes of a batch in flight waits for it', async (t) => {
  const h = harness({ maxInFlight: 4 });
  void h.submit(0, 1);
  await tick();
  void h.submit(1024, 2); // same 4 KiB region
  await tick();
  t.equal(h.held.length, 1, 'the overlapping batch is not dispatched');
  h.held[0].ok();
  await tick();
  await tick();
  t.equal(h.held.length, 2, 'it goes once the first is durable');
  h.held[1].ok();
  await h.gc.whenIdle();
  t.same(h.log.filter((l) => l.startsWith('ack')), ['ack 1', 'ack 2']);
});

t.test('one batch at a time by default', async (t) => {
  const h = harness();
  void h.submit(0, 1);
  await tick();
  void h.submit(1 << 20, 2);
  void h.submit(2 << 20, 3);
  await tick();
  t.equal(h.held.length, 1);
  h.held[0].ok();
  await tick();
  await tick();
  t.equal(h.held.length, 2, 'the queued submits go out together as the next batch');
  t.equal(h.held[1].batch.parts.length, 2);
  t.equal(h.held[1].batch.maxSeq, 3);
  h.held[1].ok();
  await h.gc.whenIdle();
  t.same(h.log.filter((l) => l.startsWith('ack')), ['ack 1', 'ack 2', 'ack 3']);
});

t.test('a failed batch: it, every later one and the queue are rejected; an earlier one is still acknowledged; idle waits for flights', async (t) => {
  const h = harness({ maxInFlight: 4 });
  void h.submit(0, 1);
  await tick();
  void h.submit(1 << 20, 2);
  await tick();
  void h.submit(2 << 20, 3);
  await tick();
  t.equal(h.held.length, 3);
  h.held[1].fail(new MobilityError('MOB_ERR_TARGET_UNAVAILABLE', 'gone'));
  await tick();
  let idle = false;
  void h.gc.whenIdle().then(() => { idle = true; });
  await tick();
  t.notOk(idle, 'not idle while batches are still out');
  t.equal(h.gc.failure?.code, 'MOB_ERR_TARGET_UNAVAILABLE', 'the store stops at once');
  h.held[0].ok();
  await tick();
  const late = await h.gc.submit([{ offset: 0, length: 512, data: null }], 9).then(() => 'ok', (e: MobilityError) => e.code);
  t.equal(late, 'MOB_ERR_TARGET_UNAVAILABLE', 'later submits are refused');
  t.notOk(idle, 'still waiting for the third batch');
  h.held[2].ok();
  await tick();
  await tick();
  t.ok(idle, 'idle once every batch settled');
  t.same(h.log.filter((l) => !l.startsWith('apply') && !l.startsWith('committed')), ['ack 1', 'reject 2 MOB_ERR_TARGET_UNAVAILABLE', 'reject 3 MOB_ERR_TARGET_UNAVAILABLE']);
});

t.test('a committed hook that returns a promise holds the next dispatch; its failure stops the store', async (t) => {
  let release!: () => void;
  const gate = new Promise<void>((r) => { release = r; });
  const h = harness({ committed: (b) => (b.maxSeq === 1 ? gate : undefined) });
  void h.submit(0, 1);
  await tick();
  void h.submit(1 << 20, 2);
  h.held[0].ok();
  await tick();
  await tick();
  t.ok(h.log.includes('ack 1'), 'the batch itself is acknowledged');
  t.equal(h.held.length, 1, 'nothing dispatched while the hook runs');
  release();
  await tick();
  await tick();
  t.equal(h.held.length, 2);
  h.held[1].ok();
  await h.gc.whenIdle();

  const h2 = harness({ committed: (b) => (b.maxSeq === 1 ? Promise.reject(new MobilityError('MOB_ERR_NO_SPACE', 'full')) : undefined) });
  void h2.submit(0, 1);
  void h2.submit(4096, 2);
  await tick();
  h2.held[0].ok();
  await h2.gc.whenIdle();
  await tick();
  t.equal(h2.gc.failure?.code, 'MOB_ERR_NO_SPACE');
  t.same(h2.log.filter((l) => l.startsWith('ack') || l.startsWith('reject')), ['ack 1', 'reject 2 MOB_ERR_NO_SPACE']);
});

t.test('footprints', async (t) => {
  t.same(footprintOf([{ offset: 100, length: 10, data: null }, { offset: 600, length: 1, data: null }, { offset: 4096, length: 512, data: null }], 512), [[0, 1024], [4096, 4608]]);
  t.ok(overlaps([[0, 512]], [[511, 600]]));
  t.notOk(overlaps([[0, 512], [1024, 2048]], [[512, 1024], [2048, 4096]]));
});

t.test('linger: a streaming queue waits for more (up to its bound), a small one goes at once, whenIdle sends at once', async (t) => {
  const held: Batch[] = [];
  const gc = new GroupCommit({
    linger: { minBytes: 1 << 20, fullBytes: 4 << 20, ms: 60_000 },
    apply: async (b) => { held.push(b); },
    failed: (err) => new MobilityError('MOB_ERR_STORAGE', String(err)),
  });
  const op = (offset: number, length: number): WriteOp[] => [{ offset, length, data: Buffer.alloc(length) }];
  await gc.submit(op(0, 4096), 1);
  t.equal(held.length, 1, 'a small write goes out at once');
  const a = gc.submit(op(1 << 20, 2 << 20), 2);
  await tick();
  t.equal(held.length, 1, 'a 2 MiB queue lingers');
  const b = gc.submit(op(3 << 20, 2 << 20), 3);
  await Promise.all([a, b]);
  t.equal(held.length, 2, 'reaching 4 MiB sends it, as one batch');
  t.equal(held[1].parts.length, 2);
  const c = gc.submit(op(8 << 20, 2 << 20), 4);
  await tick();
  t.equal(held.length, 2, 'lingering again');
  await gc.whenIdle();
  await c;
  t.equal(held.length, 3, 'whenIdle sends it without waiting out the linger');
});
