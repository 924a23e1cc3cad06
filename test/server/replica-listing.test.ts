/**
 * What status lists while the replica store misbehaves (src/server/replica-listing.ts), over a
 * real local backend: a disk with a damaged state is listed with its error and does not hide
 * the others; a store that fails is reported with its code and the last listing; a slow store
 * is not called unavailable; a hanging store gets one listing at a time.
 */
import fsp from 'node:fs/promises';
import path from 'node:path';
import t from 'tap';
import { MobilityError } from '../../src/errors.js';
import { ReplicaListing } from '../../src/server/replica-listing.js';
import { LocalBackend } from '../../src/target/local/local-backend.js';
import type { ReplicaBackend } from '../../src/target/replica-store.js';
import { tmpDir, waitFor } from '../helpers.js';

async function backendWith(t: Parameters<typeof tmpDir>[0], disks: string[]): Promise<{ backend: LocalBackend; dir: string }> {
  const dir = await tmpDir(t, 'listing-');
  const backend = new LocalBackend({ dir: path.join(dir, 'replicas'), imagesDir: dir });
  await backend.init();
  for (const d of disks) {
    const { store } = await backend.open('a1', d, 1 << 20);
    await store.close();
  }
  return { backend, dir };
}

/** The backend with some calls replaced (the rest go to the real one). */
function wrap(inner: ReplicaBackend, over: Partial<Record<keyof ReplicaBackend, (...a: never[]) => unknown>>): ReplicaBackend {
  return new Proxy(inner, {
    get(target, prop, recv) {
      const o = over[prop as keyof ReplicaBackend];
      if (o) return o;
      const v = Reflect.get(target, prop, recv) as unknown;
      return typeof v === 'function' ? (v as (...a: unknown[]) => unknown).bind(target) : v;
    },
  });
}

t.test('a damaged disk is listed with its error; the others are listed as usual', async (t) => {
  const { backend, dir } = await backendWith(t, ['d1', 'd2']);
  await fsp.writeFile(path.join(dir, 'replicas', 'a1', 'd2', 'state.json'), '{ not json');
  const r = await new ReplicaListing(backend, 60_000).get();
  t.equal(r.error, null, 'the store itself is fine');
  t.same(r.disks.map((d) => d.diskId).sort(), ['d1', 'd2'], 'both disks are listed');
  t.ok(r.disks.find((d) => d.diskId === 'd1')?.stat, 'd1 with its stat');
  const d2 = r.disks.find((d) => d.diskId === 'd2');
  t.equal(d2?.stat, null, 'd2 without a stat');
  t.equal(d2?.error?.code, 'MOB_ERR_STATE_CORRUPT', 'and with the reason');
});

t.test('a failing store: its code, and the last listing', async (t) => {
  const { backend } = await backendWith(t, ['d1']);
  let down = false;
  const b = wrap(backend, { agents: async () => { if (down) throw new MobilityError('MOB_ERR_TARGET_UNAVAILABLE', 'gave up after 3 attempts'); return backend.agents(); } });
  const listing = new ReplicaListing(b, 60_000);
  t.equal((await listing.get()).disks.length, 1);
  down = true;
  const r = await listing.get();
  t.equal(r.error?.code, 'MOB_ERR_TARGET_UNAVAILABLE', 'the store failure is reported');
  t.same(r.disks.map((d) => d.diskId), ['d1'], 'with the disks as last listed');
  t.ok(r.at !== null, 'and when they were listed');
  down = false;
  const back = await listing.get();
  t.equal(back.error, null, 'the error goes once the store answers again');
});

t.test('a slow store is not an outage; a hanging one gets one listing at a time', async (t) => {
  const { backend } = await backendWith(t, ['d1']);
  let release: (() => void) | null = null;
  let calls = 0;
  let slow = false;
  const b = wrap(backend, {
    agents: async () => {
      calls++;
      if (slow) await new Promise<void>((r) => { release = r; });
      return backend.agents();
    },
  });
  // waits that end on progress: a listing of the real backend completes (60 s is only a safety net);
  // 'slow' is a listing blocked until released, so a short wait always sees it pending
  const listing = new ReplicaListing(b, 60_000);
  await listing.get();
  slow = true;
  const r = await listing.get(20);
  t.equal(r.error, null, 'slow is not an error');
  t.ok(r.pending, 'but the listing is marked as still running');
  t.same(r.disks.map((d) => d.diskId), ['d1'], 'the last listing is shown');
  const before = calls;
  const r2 = await listing.get(20);
  t.equal(calls, before, 'no second listing while one is hanging');
  t.ok(r2.pending);
  slow = false;
  release!();
  await waitFor(() => !listing.state().pending, 60_000, 'the released listing to end');
  const r3 = await listing.get();
  t.notOk(r3.pending, 'once the store answers, listings are fresh again');
});
