import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { execFileSync } from 'node:child_process';
import { TracefsTracker, type DirtyExtent } from '../../src/replication/tracefs-tracker.js';
import { tmpDir, sleep } from '../helpers.js';

// Runs as root against real loop devices and the real kernel tracefs. Missing
// tools (losetup, sfdisk, fio) or tracefs make these tests fail, never skip.

const TRACEFS = '/sys/kernel/tracing';
const MiB = 1024 * 1024;
let seq = 0;
const instanceName = () => `mobtest-${process.pid}-${++seq}`;

type Teardown = { teardown(fn: () => unknown): void };

function run(cmd: string, args: string[], input?: string): string {
  return execFileSync(cmd, args, { encoding: 'utf8', input, stdio: [input === undefined ? 'ignore' : 'pipe', 'pipe', 'pipe'] });
}

/** Removes an instance left behind by a failed test. */
function removeInstance(name: string): void {
  const dir = path.join(TRACEFS, 'instances', name);
  if (!fs.existsSync(dir)) return;
  try { fs.writeFileSync(path.join(dir, 'events/block/block_rq_complete/enable'), '0\n'); } catch { /* ignore */ }
  try { fs.rmdirSync(dir); } catch { /* ignore */ }
}

function track(t: Teardown, name: string): void {
  t.teardown(() => removeInstance(name));
}

/** A 64 MiB loop device (optionally with one partition start=2048 size=40960 sectors). */
async function loopDevice(t: Teardown, withPartition = false): Promise<{ dev: string; part: string }> {
  const dir = await tmpDir(t, 'mobility-tracefs-');
  const img = path.join(dir, 'disk.img');
  fs.writeFileSync(img, '');
  fs.truncateSync(img, 64 * MiB);
  if (withPartition) run('sfdisk', ['--quiet', img], 'start=2048, size=40960\n');
  const dev = run('losetup', ['--find', '--show', '-P', img]).trim();
  t.teardown(() => { try { run('losetup', ['-d', dev]); } catch { /* ignore */ } });
  const part = `${dev}p1`;
  if (withPartition) {
    // some kernels (no MSDOS_PARTITION) do not scan the table themselves: add it with BLKPG (partx)
    let end = Date.now() + 1000;
    while (!fs.existsSync(part) && Date.now() < end) await sleep(50);
    if (!fs.existsSync(part)) run('partx', ['-a', dev]);
    end = Date.now() + 5000;
    while (!fs.existsSync(part)) {
      if (Date.now() > end) throw new Error(`${part} did not appear`);
      await sleep(50);
    }
  }
  return { dev, part };
}

function ddWrite(target: string, seek4k: number, count4k: number): void {
  run('dd', ['if=/dev/urandom', `of=${target}`, 'bs=4k', `seek=${seek4k}`, `count=${count4k}`, 'oflag=direct', 'conv=notrunc', 'status=none']);
}

function union(list: DirtyExtent[]): DirtyExtent[] {
  const s = [...list].sort((a, b) => a.disk - b.disk || a.offset - b.offset);
  const out: DirtyExtent[] = [];
  for (const e of s) {
    const last = out[out.length - 1];
    if (last && last.disk === e.disk && e.offset <= last.offset + last.length) {
      last.length = Math.max(last.length, e.offset + e.length - last.offset);
    } else out.push({ ...e });
  }
  return out;
}

/** Drains until the union of everything seen equals `expected` (or 5 s pass); returns the union seen. */
async function drainUntil(tr: TracefsTracker, expected: DirtyExtent[]): Promise<DirtyExtent[]> {
  const want = JSON.stringify(union(expected));
  const seen: DirtyExtent[] = [];
  const end = Date.now() + 5000;
  for (;;) {
    seen.push(...tr.drain());
    if (JSON.stringify(union(seen)) === want || Date.now() > end) break;
    await sleep(100);
  }
  // anything late (a stray extra write) would show up here
  await sleep(200);
  seen.push(...tr.drain());
  return union(seen);
}

t.test('whole disk and partition writes give exact byte extents', async (t) => {
  const { dev, part } = await loopDevice(t, true);
  const name = instanceName();
  track(t, name);
  const tr = await TracefsTracker.open({ name, disks: [{ path: dev }, { path: part }] });
  t.teardown(() => tr.close());
  t.equal(tr.resumed, false, 'a new instance is not resumed');
  t.equal(tr.instanceDir, path.join(TRACEFS, 'instances', name));
  t.equal(fs.readFileSync(path.join(tr.instanceDir, 'options/overwrite'), 'utf8').trim(), '0', 'full buffer drops new events');
  t.same(tr.drain().length, 0, 'nothing written yet');

  ddWrite(dev, 7680, 3); // 30 MiB, outside the partition
  ddWrite(dev, 255, 2); // straddles the partition start (1 MiB)
  ddWrite(part, 10, 3); // inside the partition
  const want = [
    { disk: 0, offset: MiB - 4096, length: 8192 },
    { disk: 0, offset: MiB + 40960, length: 12288 },
    { disk: 0, offset: 30 * MiB, length: 12288 },
    { disk: 1, offset: 0, length: 4096 },
    { disk: 1, offset: 40960, length: 12288 },
  ];
  t.same(await drainUntil(tr, want), want, 'extents clipped to each spec, partition offsets relative to the partition');

  // a read changes nothing; a discard and a write-zeroes are modifying
  run('dd', [`if=${dev}`, 'of=/dev/null', 'bs=4k', 'count=16', 'iflag=direct', 'status=none']);
  run('blkdiscard', ['-o', String(40 * MiB), '-l', '65536', dev]);
  run('blkdiscard', ['-z', '-o', String(2 * MiB), '-l', '65536', part]);
  const want2 = [
    { disk: 0, offset: MiB + 2 * MiB, length: 65536 },
    { disk: 0, offset: 40 * MiB, length: 65536 },
    { disk: 1, offset: 2 * MiB, length: 65536 },
  ];
  t.same(await drainUntil(tr, want2), want2, 'discard and write-zeroes tracked, reads ignored');
  t.same(tr.counters(), { overrun: 0, dropped: 0, lostNotices: 0 }, 'no loss');
  tr.close();
  t.equal(fs.existsSync(tr.instanceDir), false, 'close() removes the instance');
  t.throws(() => tr.drain(), { code: 'MOB_ERR_TRACKER' }, 'drain after close is a coded error');
});

t.test('close({keep:true}) keeps recording; reopening resumes and delivers what was written meanwhile', async (t) => {
  const { dev } = await loopDevice(t);
  const { dev: other } = await loopDevice(t);
  const name = instanceName();
  track(t, name);
  const a = await TracefsTracker.open({ name, disks: [{ path: dev }], bufferKb: 1024 });
  t.teardown(() => a.close({ keep: true }));
  t.equal(a.resumed, false);
  ddWrite(dev, 100, 1);
  t.same(await drainUntil(a, [{ disk: 0, offset: 409600, length: 4096 }]), [{ disk: 0, offset: 409600, length: 4096 }]);
  a.close({ keep: true });
  t.ok(fs.existsSync(a.instanceDir), 'instance kept');

  ddWrite(dev, 200, 2); // written while no tracker is open
  const b = await TracefsTracker.open({ name, disks: [{ path: dev }] });
  t.teardown(() => b.close({ keep: true }));
  t.equal(b.resumed, true, 'same filter and enabled: resumed');
  t.same(await drainUntil(b, [{ disk: 0, offset: 819200, length: 8192 }]), [{ disk: 0, offset: 819200, length: 8192 }],
    'writes made while closed are delivered after reopen');
  b.close({ keep: true });

  // a different disk set: the instance is recreated, not resumed
  ddWrite(dev, 300, 1);
  const c = await TracefsTracker.open({ name, disks: [{ path: dev }, { path: other }] });
  t.teardown(() => c.close());
  t.equal(c.resumed, false, 'different filter: recreated');
  t.same(c.drain(), [], 'the old recording is gone with the old instance');
  ddWrite(other, 1, 1);
  t.same(await drainUntil(c, [{ disk: 1, offset: 4096, length: 4096 }]), [{ disk: 1, offset: 4096, length: 4096 }]);
  c.close();
  t.equal(fs.existsSync(c.instanceDir), false);
});

t.test('a tiny buffer under a burst of writes reports loss', async (t) => {
  const { dev } = await loopDevice(t);
  const name = instanceName();
  track(t, name);
  const tr = await TracefsTracker.open({ name, disks: [{ path: dev }], bufferKb: 1 });
  t.teardown(() => tr.close());
  t.same(tr.counters(), { overrun: 0, dropped: 0, lostNotices: 0 });
  run('fio', ['--name=burst', `--filename=${dev}`, '--rw=randwrite', '--bs=4k', '--size=32M', '--direct=1',
    '--ioengine=libaio', '--iodepth=16', '--output-format=terse']);
  const c = tr.counters();
  t.ok(c.overrun + c.dropped > 0, `loss counted (overrun ${c.overrun}, dropped ${c.dropped})`);
  const got = tr.drain();
  t.ok(got.length > 0, 'what fitted is still delivered');
  t.ok(got.every((e) => e.disk === 0 && e.offset >= 0 && e.offset + e.length <= 32 * MiB && e.length % 4096 === 0), 'extents within the written range');
});

t.test('bad inputs are MOB_ERR_TRACKER', async (t) => {
  const dir = await tmpDir(t);
  const file = path.join(dir, 'plain');
  fs.writeFileSync(file, 'x');
  const { dev } = await loopDevice(t);
  const name = instanceName();
  track(t, name);
  await t.rejects(TracefsTracker.open({ name, disks: [{ path: file }] }), { code: 'MOB_ERR_TRACKER', message: /not a block device/ });
  await t.rejects(TracefsTracker.open({ name, disks: [{ path: path.join(dir, 'missing') }] }), { code: 'MOB_ERR_TRACKER' });
  await t.rejects(TracefsTracker.open({ name: 'bad/name', disks: [{ path: dev }] }), { code: 'MOB_ERR_TRACKER' });
  await t.rejects(TracefsTracker.open({ name: '..', disks: [{ path: dev }] }), { code: 'MOB_ERR_TRACKER' });
  await t.rejects(TracefsTracker.open({ name, disks: [] }), { code: 'MOB_ERR_TRACKER' });
  await t.rejects(TracefsTracker.open({ name, disks: [{ path: dev }], tracefsRoot: dir }), { code: 'MOB_ERR_TRACKER', message: new RegExp(name) },
    'no tracefs at the given root');
  t.equal(fs.existsSync(path.join(TRACEFS, 'instances', name)), false, 'nothing created');
});
