import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { execFileSync } from 'node:child_process';
import { SHADOW_SUFFIX, TracefsTracker, type DirtyExtent } from '../../../src/source/tracker/tracefs.js';
import { DirtyJournal } from '../../../src/source/dirty-journal.js';
import type { DrainSource } from '../../../src/source/tracker/change-tracker.js';
import { tmpDir, sleep } from '../../helpers.js';

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
  t.teardown(() => { removeInstance(name); removeInstance(name + SHADOW_SUFFIX); });
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

t.test('self-check: anything that switches tracking off is named, and repair() makes it live again', async (t) => {
  const { dev } = await loopDevice(t);
  const name = instanceName();
  track(t, name);
  const tr = await TracefsTracker.open({ name, disks: [{ path: dev }], bufferKb: 1024 });
  t.teardown(() => tr.close());
  t.equal(tr.selfCheck(), null, 'live right after open');
  const ctl = (f: string, v: string) => fs.writeFileSync(path.join(tr.instanceDir, f), v + '\n');
  const cases: [string, string, RegExp][] = [
    ['events/block/block_rq_complete/enable', '0', /^events\/block\/block_rq_complete\/enable is 0$/],
    ['tracing_on', '0', /^tracing_on is 0$/],
    ['events/block/block_rq_complete/filter', '0', /filter is none \(set: dev == \d+\)/],
    ['options/overwrite', '1', /^options\/overwrite is 1$/],
    ['buffer_size_kb', '64', /^buffer_size_kb is \d+ \(set: \d+/],
    ['events/enable', '0', /enable is 0/],
    // CPU 0 only: on a machine with more than one CPU the others are left out
    ...(fs.readFileSync('/sys/devices/system/cpu/online', 'utf8').trim() === '0' ? [] : [['tracing_cpumask', '1', /^tracing_cpumask leaves out CPU \d/] as [string, string, RegExp]]),
    ['set_event_pid', String(process.pid), new RegExp(`^set_event_pid is ${process.pid} `)],
  ];
  for (const [file, value, want] of cases) {
    ctl(file, value);
    t.match(tr.selfCheck(), want, `${file} = ${value} is noticed: ${tr.selfCheck()}`);
    tr.repair();
    t.equal(tr.selfCheck(), null, `repair() re-arms it after ${file} = ${value}`);
    ddWrite(dev, 50, 1);
    t.same(await drainUntil(tr, [{ disk: 0, offset: 204800, length: 4096 }]), [{ disk: 0, offset: 204800, length: 4096 }], 'and writes are recorded again');
  }
});

t.test('self-check notices a removed or recreated instance (fake tracefs root), repair recreates it', async (t) => {
  const { dev } = await loopDevice(t);
  const root = await tmpDir(t);
  const name = instanceName();
  const lockDir = path.join(root, 'locks');
  // a tracefs look-alike the tracker resumes (real tracefs refuses rmdir while trace_pipe is open)
  const dev0 = fs.statSync(dev, { bigint: true }).rdev;
  const major = Number(((dev0 >> 8n) & 0xfffn) | ((dev0 >> 32n) & ~0xfffn));
  const minor = Number((dev0 & 0xffn) | ((dev0 >> 12n) & ~0xffn));
  const make = (n = name) => {
    const d = path.join(root, 'instances', n);
    fs.mkdirSync(path.join(d, 'events/block/block_rq_complete'), { recursive: true });
    fs.mkdirSync(path.join(d, 'options'), { recursive: true });
    fs.mkdirSync(path.join(d, 'per_cpu'), { recursive: true });
    fs.writeFileSync(path.join(d, 'events/block/block_rq_complete/filter'), `dev == ${major * 2 ** 20 + minor}\n`);
    fs.writeFileSync(path.join(d, 'events/block/block_rq_complete/enable'), '1\n');
    fs.writeFileSync(path.join(d, 'tracing_on'), '1\n');
    fs.writeFileSync(path.join(d, 'options/overwrite'), '0\n');
    fs.writeFileSync(path.join(d, 'buffer_size_kb'), '8192\n');
    fs.writeFileSync(path.join(d, 'trace_pipe'), '');
    return d;
  };
  const dir = make();
  make(name + SHADOW_SUFFIX);
  const tr = await TracefsTracker.open({ name, disks: [{ path: dev }], tracefsRoot: root, lockDir });
  t.teardown(() => tr.close({ keep: true }));
  t.equal(tr.resumed, true);
  t.equal(tr.selfCheck(), null);
  fs.rmSync(dir, { recursive: true });
  t.match(tr.selfCheck(), /was removed$/, 'removal noticed');
  make();
  t.match(tr.selfCheck(), /was removed and recreated$/, 'a look-alike recreated under the same name is noticed (inode)');
  tr.close({ keep: true });
  // the same for the shadow instance, named as such
  const again = await TracefsTracker.open({ name, disks: [{ path: dev }], tracefsRoot: root, lockDir });
  t.teardown(() => again.close({ keep: true }));
  t.equal(again.selfCheck(), null);
  fs.rmSync(path.join(root, 'instances', name + SHADOW_SUFFIX), { recursive: true });
  t.match(again.selfCheck(), /^the shadow trace instance .*\.shadow was removed$/, 'removal of the shadow noticed');
});

t.test('instances are owned: another process can neither use nor remove one in use; rmdir never leaves it disabled', async (t) => {
  const { dev } = await loopDevice(t);
  const name = instanceName();
  track(t, name);
  const tr = await TracefsTracker.open({ name, disks: [{ path: dev }] });
  t.teardown(() => tr.close());
  const mod = path.resolve('dist/src/source/tracker/tracefs.js');
  const other = (code: string) => execFileSync(process.execPath, ['--input-type=module', '-e',
    `import { TracefsTracker } from ${JSON.stringify(mod)};\ntry { ${code}; console.log('ok'); } catch (e) { console.log(e.code, e.message); }`], { encoding: 'utf8' });
  t.match(other(`TracefsTracker.remove(${JSON.stringify(name)})`), /^MOB_ERR_TRACKER_BUSY .*in use by process \d+/, 'remove() from another process: MOB_ERR_TRACKER_BUSY');
  t.match(other(`TracefsTracker.remove(${JSON.stringify(name + SHADOW_SUFFIX)})`), /^MOB_ERR_TRACKER_BUSY/, 'its shadow named alone neither');
  t.match(other(`await TracefsTracker.open({ name: ${JSON.stringify(name)}, disks: [{ path: ${JSON.stringify(dev)} }] })`), /^MOB_ERR_TRACKER_BUSY/, 'open() from another process: MOB_ERR_TRACKER_BUSY');
  t.equal(tr.selfCheck(), null, 'still live after both attempts');
  // a raw rmdir (what uninstall.sh does) is refused while trace_pipe is open and changes nothing
  t.throws(() => fs.rmdirSync(tr.instanceDir), /EBUSY/);
  t.equal(tr.selfCheck(), null, 'still enabled after a refused rmdir');
  tr.close({ keep: true });
  t.match(other(`TracefsTracker.remove(${JSON.stringify(name)})`), /^ok/, 'once the user closed it, remove() works');
  t.equal(fs.existsSync(tr.instanceDir), false);
  // a lock left by a dead process is stale and taken over
  fs.mkdirSync('/run/mobility/trace-locks', { recursive: true });
  fs.writeFileSync(`/run/mobility/trace-locks/${name}.lock`, '999999999 1\n');
  const again = await TracefsTracker.open({ name, disks: [{ path: dev }] });
  t.equal(again.selfCheck(), null, 'a stale lock does not block');
  again.close();
});

/** A journal that dies (throws, as a kill would stop it) right after the kernel handed over the events of a read of `copy`. */
function dyingJournal(j: DirtyJournal, copy: string): DirtyJournal {
  let reading: DrainSource | undefined;
  return Object.assign(Object.create(j) as DirtyJournal, {
    beforeRead(source?: DrainSource) { reading = source; j.beforeRead(source); },
    afterRead(raw: Buffer) {
      if (reading?.name === copy && raw.length > 0) throw new Error(`killed after a read of ${copy} took ${raw.length} bytes`);
      j.afterRead(raw);
    },
    soleHolder(name: string) { j.soleHolder(name); },
  });
}

t.test('a read of trace_pipe cut short (events consumed, not journaled) is recovered from the shadow instance after a restart', async (t) => {
  const { dev } = await loopDevice(t);
  const name = instanceName();
  track(t, name);
  const state = await tmpDir(t);
  const disks = [{ id: 'd0', sizeBytes: 64 * MiB, blockSize: 4096 }];
  const a = await TracefsTracker.open({ name, disks: [{ path: dev }], bufferKb: 1024 });
  t.teardown(() => a.close({ keep: true }));
  t.ok(fs.existsSync(path.join(TRACEFS, 'instances', name + SHADOW_SUFFIX)), 'a shadow instance next to the instance');
  const j1 = DirtyJournal.open(state, disks, (x) => a.parseText(x)).journal;
  j1.snapshot()();
  t.same(j1.soleHolders, []);
  a.drain(j1); // tells the journal the shadow was created first (its head start is its alone)
  ddWrite(dev, 100, 1);
  ddWrite(dev, 300, 2);
  // dd (O_DIRECT) returns after its request completed: both events are in both instances
  j1.beginDrain();
  t.throws(() => a.drain(dyingJournal(j1, 'p')), /killed after a read of p/);
  j1.close();
  a.close({ keep: true });
  t.match(fs.readdirSync(state).filter((f) => f.startsWith('dirty.log')).map((f) => fs.readFileSync(path.join(state, f), 'utf8')).join(''), /R p s\n$/,
    'the journal ends inside a read of the instance');

  const b = await TracefsTracker.open({ name, disks: [{ path: dev }] });
  t.teardown(() => b.close({ keep: true }));
  t.equal(b.resumed, true);
  const r = DirtyJournal.open(state, disks, (x) => b.parseText(x));
  t.equal(r.torn, false, 'not torn: the shadow still holds what the cut-short read took');
  t.same(r.journal.soleHolders, ['s']);
  const n = r.journal.beginDrain();
  const got = b.drain(r.journal);
  r.journal.addExtents(got);
  r.journal.endDrain(n);
  t.same(got, [{ disk: 0, offset: 409600, length: 4096 }, { disk: 0, offset: 1228800, length: 8192 }], 'the first drain after the restart delivers both writes, from the shadow');
  t.same([...r.journal.disks[0].dirty.keys()].sort((x, y) => x - y), [100, 300, 301], 'and they are in the journal');
  t.same(r.journal.soleHolders, [], 'both copies read empty: nothing is held by one copy alone');

  // a second kill inside the read of the only holder (before it was read empty) is reported torn
  ddWrite(dev, 500, 1);
  r.journal.close();
  b.close({ keep: true });
  const c = await TracefsTracker.open({ name, disks: [{ path: dev }] });
  t.teardown(() => c.close());
  const j3 = DirtyJournal.open(state, disks, (x) => c.parseText(x)).journal;
  j3.beginDrain();
  t.throws(() => c.drain(dyingJournal(j3, 'p')), /killed/);
  j3.close();
  const j4 = DirtyJournal.open(state, disks, (x) => c.parseText(x));
  t.equal(j4.torn, false, 'p cut short again: recoverable');
  j4.journal.beginDrain();
  t.throws(() => c.drain(dyingJournal(j4.journal, 's')), /killed after a read of s/);
  j4.journal.close();
  const j5 = DirtyJournal.open(state, disks, (x) => c.parseText(x));
  t.equal(j5.torn, true, 'then s cut short before it was read empty: its events are in no copy any more, torn (the caller scans)');
  j5.journal.close();
});

t.test('a shadow instance missing at a resume is recreated (resumed stays true) and the journal learns the instance alone holds older events', async (t) => {
  const { dev } = await loopDevice(t);
  const name = instanceName();
  track(t, name);
  const state = await tmpDir(t);
  const a = await TracefsTracker.open({ name, disks: [{ path: dev }], bufferKb: 1024 });
  a.close({ keep: true });
  fs.rmdirSync(path.join(TRACEFS, 'instances', name + SHADOW_SUFFIX));
  ddWrite(dev, 7, 1);
  const b = await TracefsTracker.open({ name, disks: [{ path: dev }] });
  t.teardown(() => b.close());
  t.equal(b.resumed, true, 'the instance itself kept recording');
  t.ok(fs.existsSync(path.join(TRACEFS, 'instances', name + SHADOW_SUFFIX)), 'shadow recreated');
  const j = DirtyJournal.open(state, [{ id: 'd0', sizeBytes: 64 * MiB, blockSize: 4096 }], (x) => b.parseText(x)).journal;
  t.teardown(() => j.close());
  j.beginDrain();
  t.throws(() => b.drain(dyingJournal(j, 'p')), /killed/);
  j.close();
  const r = DirtyJournal.open(state, [{ id: 'd0', sizeBytes: 64 * MiB, blockSize: 4096 }], (x) => b.parseText(x));
  t.equal(r.torn, true, 'the write made before the shadow existed was only in the instance: its read cut short is torn');
  r.journal.close();
  // the profiler opens without a shadow, and removes one left behind
  b.close({ keep: true });
  const p = await TracefsTracker.open({ name, disks: [{ path: dev }], shadow: false });
  t.teardown(() => p.close());
  t.notOk(fs.existsSync(path.join(TRACEFS, 'instances', name + SHADOW_SUFFIX)), 'shadow: false removes the shadow');
  p.close();
  t.notOk(fs.existsSync(path.join(TRACEFS, 'instances', name)), 'close() removes the instance');
});

t.test('a shadow switched off is named by the self-check; after repair the journal learns the instance alone holds what the shadow missed', async (t) => {
  const { dev } = await loopDevice(t);
  const name = instanceName();
  track(t, name);
  const state = await tmpDir(t);
  const tr = await TracefsTracker.open({ name, disks: [{ path: dev }], bufferKb: 1024 });
  t.teardown(() => tr.close());
  const j = DirtyJournal.open(state, [{ id: 'd0', sizeBytes: 64 * MiB, blockSize: 4096 }], (x) => tr.parseText(x)).journal;
  t.teardown(() => j.close());
  tr.drain(j);
  t.same(j.soleHolders, [], 'both copies read empty after the first drain');
  fs.writeFileSync(path.join(TRACEFS, 'instances', name + SHADOW_SUFFIX, 'tracing_on'), '0\n');
  t.match(tr.selfCheck(), /^tracing_on is 0 \(shadow trace instance .*\.shadow\)$/, 'the self-check names the shadow');
  ddWrite(dev, 9, 1); // recorded by the instance only
  tr.repair();
  t.equal(tr.selfCheck(), null, 'repaired');
  const told: string[] = [];
  const spy = Object.assign(Object.create(j) as DirtyJournal, {
    beforeRead: (s?: DrainSource) => j.beforeRead(s),
    afterRead: (raw: Buffer) => j.afterRead(raw),
    soleHolder: (x: string) => { told.push(x); j.soleHolder(x); },
  });
  t.same(tr.drain(spy), [{ disk: 0, offset: 9 * 4096, length: 4096 }], 'the write is delivered (by the instance)');
  t.same(told, ['p'], 'the journal was told the instance alone held events');
  t.same(j.soleHolders, [], 'and the instance was read empty in that drain');
});
