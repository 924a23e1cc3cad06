/**
 * The change-tracker conformance suite (src/source/tracker/change-tracker.ts), written once and
 * run against every implementation with real peers:
 *   - tracefs: a private instance of the real kernel tracefs, two loop devices, writes with dd
 *     (O_DIRECT);
 *   - qemu: a real qemu-storage-daemon serving two qcow2 disks, guest writes with qemu-io over
 *     the daemon's NBD exports.
 * A third backend is one more entry in BACKENDS. Missing tools fail the suite, never skip it.
 *
 * What every tracker must do: start unresumed; deliver every write (extents cover it, sorted,
 * merged, per disk) once; deliver nothing when nothing was written; record what it takes in the
 * caller's journal in a form parseText() turns back into the same extents; keep recording across
 * close({ keep: true }) and resume; name anything that switched tracking off, and record again
 * after repair(); forget everything at close({ keep: false }).
 */
import t, { type Test } from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { execFileSync } from 'node:child_process';
import { TracefsTracker } from '../../../src/source/tracker/tracefs.js';
import { QemuTracker } from '../../../src/source/tracker/qemu.js';
import { QmpClient } from '../../../src/source/qemu/qmp.js';
import type { ChangeTracker, DirtyExtent } from '../../../src/source/tracker/change-tracker.js';
import { cleanup, type Cleanup } from '../../cleanup.js';
import { sleep } from '../../helpers.js';
import { QemuDaemon, createImage, requireQemuTools } from '../qemu/qemu-daemon.js';

const KiB = 1024;
const MiB = 1024 * KiB;
/** Writes are 64 KiB-aligned multiples of 64 KiB: whole granules for every backend, so extents are exact. */
const U = 64 * KiB;

interface Rig {
  open(): Promise<ChangeTracker>;
  /** A write that has completed when the promise resolves. */
  write(disk: number, offset: number, length: number): Promise<void>;
  /** Something switches tracking off under the tracker (root on the machine, or on QEMU). */
  switchOff(tr: ChangeTracker): Promise<void>;
}

interface Backend { name: string; setup(t: Test, c: Cleanup): Promise<Rig> }

const run = (cmd: string, args: string[]) => execFileSync(cmd, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });

const BACKENDS: Backend[] = [
  {
    name: 'tracefs',
    async setup(t, c) {
      if (!fs.existsSync('/sys/kernel/tracing/instances')) throw new Error('tracefs (/sys/kernel/tracing/instances) is required');
      const dir = c.dir('conf-tracefs-');
      const devs = [0, 1].map((i) => {
        const img = path.join(dir, `d${i}.img`);
        fs.writeFileSync(img, '');
        fs.truncateSync(img, 32 * MiB);
        const dev = run('losetup', ['--find', '--show', img]).trim();
        c.loop(dev);
        return dev;
      });
      const name = `mobconf-${process.pid}-${Math.random().toString(16).slice(2, 8)}`;
      t.teardown(() => {
        const inst = path.join('/sys/kernel/tracing/instances', name);
        try { fs.writeFileSync(path.join(inst, 'events/block/block_rq_complete/enable'), '0\n'); } catch { /* gone */ }
        try { fs.rmdirSync(inst); } catch { /* gone */ }
      });
      return {
        open: () => TracefsTracker.open({ name, disks: devs.map((p) => ({ path: p })), bufferKb: 2048 }),
        async write(disk, offset, length) {
          run('dd', ['if=/dev/urandom', `of=${devs[disk]}`, `bs=${U}`, `seek=${offset / U}`, `count=${length / U}`, 'oflag=direct', 'conv=notrunc', 'status=none']);
        },
        async switchOff(tr) {
          fs.writeFileSync(path.join((tr as TracefsTracker).instanceDir, 'events/block/block_rq_complete/enable'), '0\n');
        },
      };
    },
  },
  {
    name: 'qemu',
    async setup(_t, c) {
      requireQemuTools();
      const dir = c.dir('conf-qemu-');
      const disks = [0, 1].map((i) => {
        const image = path.join(dir, `d${i}.qcow2`);
        createImage(image, 'qcow2', '32M');
        return { image, format: 'qcow2' as const };
      });
      const daemon = new QemuDaemon(c, dir, disks);
      await daemon.start();
      return {
        open: () => QemuTracker.open({ name: 'mobconf', qmpSocket: daemon.qmpSocket, nbdSocket: daemon.nbdSocket, disks: [{ node: 'disk0' }, { node: 'disk1' }] }),
        async write(disk, offset, length) { daemon.write(disk, offset, length); },
        async switchOff(tr) {
          const q = await QmpClient.connect(daemon.testQmpSocket);
          try {
            await q.execute('block-dirty-bitmap-disable', { node: 'disk0', name: (tr as QemuTracker).activeBitmap });
          } finally {
            q.close();
          }
        },
      };
    },
  },
];

function union(list: DirtyExtent[]): DirtyExtent[] {
  const s = [...list].sort((a, b) => a.disk - b.disk || a.offset - b.offset);
  const out: DirtyExtent[] = [];
  for (const e of s) {
    const last = out[out.length - 1];
    if (last && last.disk === e.disk && e.offset <= last.offset + last.length) last.length = Math.max(last.length, e.offset + e.length - last.offset);
    else out.push({ ...e });
  }
  return out;
}

/**
 * Drains until everything written shows up (tracefs delivers completions asynchronously), then
 * once more to catch anything extra. Bounded by rounds, not by time. Each drain's answer must
 * be sorted and merged already.
 */
async function drainAll(tt: Test, tr: ChangeTracker, want: DirtyExtent[]): Promise<DirtyExtent[]> {
  const seen: DirtyExtent[] = [];
  const goal = JSON.stringify(union(want));
  for (let i = 0; i < 200 && JSON.stringify(union(seen)) !== goal; i++) {
    const got = await tr.drain();
    tt.same(got, union(got), 'a drain answers sorted, merged extents') || tt.comment(JSON.stringify(got));
    seen.push(...got);
    if (JSON.stringify(union(seen)) !== goal) await sleep(50);
  }
  await sleep(100);
  seen.push(...await tr.drain());
  return union(seen);
}

for (const b of BACKENDS) {
  t.test(`${b.name}: the change-tracker contract`, async (tt) => {
    const c = cleanup(tt);
    const rig = await b.setup(tt, c);
    let tr = await rig.open();
    let closed = false;
    tt.teardown(async () => { if (!closed) await tr.close({ keep: false }); });
    tt.equal(tr.resumed, false, 'a first open is not resumed: the caller must scan');
    tt.equal(await tr.selfCheck(), null, 'live after open');
    await drainAll(tt, tr, []);

    const writes = [{ disk: 0, offset: U, length: 2 * U }, { disk: 0, offset: 3 * U, length: U }, { disk: 1, offset: 10 * U, length: U }, { disk: 0, offset: 100 * U, length: U }];
    for (const w of writes) await rig.write(w.disk, w.offset, w.length);
    tt.same(await drainAll(tt, tr, writes), union(writes), 'every write is delivered, exactly its range, on its disk');
    tt.same(await drainAll(tt, tr, []), [], 'and only once: nothing more without new writes');

    // the journal: what a drain takes, recorded, parses back into the same extents
    await rig.write(1, 5 * U, U);
    let raw = Buffer.alloc(0);
    let reads = 0;
    const got: DirtyExtent[] = [];
    for (let i = 0; i < 200 && !got.length; i++) {
      got.push(...await tr.drain({ beforeRead: () => { reads++; }, afterRead: (r) => { raw = Buffer.concat([raw, r]); } }));
      if (!got.length) await sleep(50);
    }
    tt.same(union(got), [{ disk: 1, offset: 5 * U, length: U }], 'the write is delivered with a journal');
    tt.ok(reads > 0, 'beforeRead is called before changes leave the tracker');
    tt.same(union(tr.parseText(raw.toString('utf8'))), union(got), 'parseText() of what the journal recorded gives the same extents');

    // keep across a close: writes while nobody holds the tracker are delivered after reopening
    await tr.close({ keep: true });
    await rig.write(0, 20 * U, U);
    tr = await rig.open();
    tt.equal(tr.resumed, true, 'reopened after close({ keep: true }): resumed');
    tt.same(await drainAll(tt, tr, [{ disk: 0, offset: 20 * U, length: U }]), [{ disk: 0, offset: 20 * U, length: U }], 'a write made while closed is delivered');

    // switched off under the tracker: named; repaired: records again
    await rig.switchOff(tr);
    const problem = await tr.selfCheck();
    tt.type(problem, 'string', `switching tracking off is noticed: ${problem}`);
    await tr.repair();
    tt.equal(await tr.selfCheck(), null, 'repair() makes it live again');
    await rig.write(1, 30 * U, U);
    tt.same(await drainAll(tt, tr, [{ disk: 1, offset: 30 * U, length: U }]), [{ disk: 1, offset: 30 * U, length: U }], 'writes after the repair are recorded');

    // keep: false forgets everything
    await tr.close({ keep: false });
    tr = await rig.open();
    tt.equal(tr.resumed, false, 'after close({ keep: false }) the next open is not resumed');
    await tr.close({ keep: false });
    closed = true;
  });
}
