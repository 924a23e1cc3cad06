/**
 * Conformance of every Quiescer (src/agent/quiesce.ts) against a real ext4 on a loop device:
 * freeze blocks writers, thaw releases them, thaw is idempotent (and harmless before any
 * freeze), a second freeze after a thaw works, and a freeze that fails part-way (a target that
 * cannot be frozen after one that was) rejects coded and leaves nothing frozen.
 *
 *   fsfreeze     FsfreezeQuiescer: FIFREEZE/FITHAW on the mount points (in-guest cuts)
 *   guest agent  GuestAgentQuiescer: a real qemu-ga (test/qemu-ga.ts: own mount namespace, only
 *                guest-fsfreeze-freeze-list) freezing the same kind of filesystem
 *
 * A new implementation is one more entry in IMPLEMENTATIONS.
 */
import t, { type Test } from 'tap';
import path from 'node:path';
import { FsfreezeQuiescer, type Quiescer } from '../../src/agent/quiesce.js';
import { GuestAgentQuiescer } from '../../src/agent/guest-agent-quiescer.js';
import { MobilityError } from '../../src/errors.js';
import { tmpDir } from '../helpers.js';
import { mountExt4 } from '../mount-helpers.js';
import { startQemuGa } from '../qemu-ga.js';
import { startWriter, writerBlocks } from '../frozen-writer.js';

interface Implementation {
  name: string;
  /** A quiescer of these mount points (mounts[0] is a real filesystem; later ones may be bogus). */
  make(t: Test, mounts: string[]): Promise<Quiescer>;
  /** The codes its failed freeze may carry. */
  codes: string[];
}

const IMPLEMENTATIONS: Implementation[] = [
  {
    name: 'fsfreeze', codes: ['MOB_ERR_FREEZE'], make: async (_t, mounts) => new FsfreezeQuiescer(() => mounts),
  },
  {
    name: 'guest agent', codes: ['MOB_ERR_GUEST_AGENT'], make: async (t, mounts) => {
      const ga = await startQemuGa(t, { dir: await tmpDir(t, 'qga-'), mounts: [mounts[0]!] });
      return new GuestAgentQuiescer({ socket: ga.socket, mountpoints: mounts });
    },
  },
];

/** Freezes here are bounded generously: the bound is not what is tested, and the machine is busy. */
const BOUND_MS = 60_000;

for (const impl of IMPLEMENTATIONS) {
  t.test(`${impl.name}: freeze blocks writers, thaw releases them, thaw is idempotent`, async (t) => {
    const mnt = await mountExt4(t, { sizeMb: 16 });
    const q = await impl.make(t, [mnt]);
    t.ok(q.targets().includes(mnt), `targets name the filesystem: ${q.targets().join(' ')}`);
    t.same(await q.thaw(), [], 'thaw before any freeze: harmless, nothing failed');

    await q.freeze(BOUND_MS);
    const w = startWriter(t, path.join(mnt, 'a'));
    t.equal(await writerBlocks(w), true, 'frozen: a writer blocks');
    t.same(await q.thaw(), [], 'thaw: nothing failed');
    t.equal(await w.done, 0, 'the writer finished after the thaw');
    t.same(await q.thaw(), [], 'a second thaw: harmless');

    await q.freeze(BOUND_MS);
    const w2 = startWriter(t, path.join(mnt, 'b'));
    t.equal(await writerBlocks(w2), true, 'a second freeze after a thaw: frozen again');
    t.same(await q.thaw(), [], 'thawed');
    t.equal(await w2.done, 0, 'the writer finished');
  });

  t.test(`${impl.name}: a freeze that fails part-way rejects coded and leaves nothing frozen`, async (t) => {
    const mnt = await mountExt4(t, { sizeMb: 16 });
    // the real filesystem first (it gets frozen), then a directory that is no mount point
    const q = await impl.make(t, [mnt, path.join(mnt, 'not-a-mount')]);
    try {
      await q.freeze(BOUND_MS);
      t.fail('the freeze resolved');
    } catch (err) {
      t.ok(err instanceof MobilityError, 'a MobilityError');
      t.ok(impl.codes.includes((err as MobilityError).code), `coded: ${(err as MobilityError).code}: ${(err as Error).message}`);
    }
    const w = startWriter(t, path.join(mnt, 'c'));
    t.equal(await writerBlocks(w), false, 'nothing is left frozen: a writer goes through');
    t.equal(await w.done, 0);
    t.same(await q.thaw(), [], 'thaw after the failed freeze: harmless, nothing reported');
  });
}
