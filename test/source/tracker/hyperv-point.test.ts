/**
 * Hyper-V host mode: points through recovery checkpoints (HyperVTracker.beginPoint) and the
 * disks' data read through PowerShell (HyperVVhdSource).
 *
 * A MOCK, by necessity (see ./hyperv-sim.ts): the scripts are checked as text (golden files) and
 * run against SimHost, which answers them as the WMI methods and storage cmdlets are documented
 * to and serves the bytes of local files standing for the VHDX files. Never run against a real
 * Hyper-V host: the README says so.
 */
import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import {
  HyperVTracker, buildConvertToReferencePointScript, buildCreateRecoveryCheckpointScript, buildDestroyRecoveryCheckpointScript,
  buildDescribeScript, buildChangesScript,
} from '../../../src/source/tracker/hyperv.js';
import { serialShell } from '../../../src/source/tracker/hyperv-script.js';
import { HyperVVhdSource, buildVhdDismountScript, buildVhdMountScript, buildVhdReadScript } from '../../../src/source/tracker/hyperv-vhd-source.js';
import type { HostModeTracker } from '../../../src/source/tracker/host-tracker.js';
import type { DirtyExtent } from '../../../src/source/tracker/change-tracker.js';
import { MobilityError } from '../../../src/errors.js';
import { tmpDir } from '../../helpers.js';
import { SimHost } from './hyperv-sim.js';

// compiled to dist/test/source/tracker/: the golden files live in the source tree
const GOLDEN = fileURLToPath(new URL('../../../../test/source/tracker/golden/', import.meta.url));
const MiB = 2 ** 20;

function merged(list: DirtyExtent[]): string {
  return list.map((e) => `${e.disk}:${e.offset}+${e.length}`).join(' ');
}

async function readAll(src: { size: number; read(b: Buffer, o: number, l: number): Promise<void> }): Promise<Buffer> {
  const b = Buffer.alloc(src.size);
  await src.read(b, 0, src.size);
  return b;
}

t.test('golden: the point and disk-reading scripts for fixed arguments', async (t) => {
  const cases: [string, string][] = [
    ['hyperv-create-recovery-checkpoint.ps1', buildCreateRecoveryCheckpointScript('app01', 'application')],
    ['hyperv-convert-to-reference-point.ps1', buildConvertToReferencePointScript('Microsoft:SNAP-1')],
    ['hyperv-destroy-recovery-checkpoint.ps1', buildDestroyRecoveryCheckpointScript('Microsoft:SNAP-1')],
    ['hyperv-vhd-mount.ps1', buildVhdMountScript('D:\\VMs\\app01\\disk0.vhdx')],
    ['hyperv-vhd-read.ps1', buildVhdReadScript('D:\\VMs\\app01\\disk0.vhdx', 3, [{ offset: 0, length: 4096 }, { offset: 1048576, length: 65536 }])],
    ['hyperv-vhd-dismount.ps1', buildVhdDismountScript('D:\\VMs\\app01\\disk0.vhdx')],
  ];
  for (const [file, text] of cases) {
    const f = path.join(GOLDEN, file);
    if (process.env.UPDATE_GOLDEN === '1') fs.writeFileSync(f, text);
    t.equal(text, fs.readFileSync(f, 'utf8'), `${file} matches (UPDATE_GOLDEN=1 rewrites it)`);
  }
  t.match(buildCreateRecoveryCheckpointScript('app01', 'crash'), /"consistencyLevel":2/, 'crash-consistent is ConsistencyLevel 2');
  t.match(buildCreateRecoveryCheckpointScript('app01', 'application'), /"consistencyLevel":1/, 'application-consistent is ConsistencyLevel 1');
});

t.test('a hostile VM name or path is data: only the arguments line differs, and it reaches the host intact', async (t) => {
  const hostile = "x' + $(Remove-Item C:\\ -Recurse) + `whoami` \u2019)\n; Stop-Computer #\r\n\"'";
  const builders: [string, (v: string) => string][] = [
    ['describe', (v) => buildDescribeScript(v, v)],
    ['changes', (v) => buildChangesScript([{ path: v, sizeBytes: 4096, since: v }])],
    ['create recovery checkpoint', (v) => buildCreateRecoveryCheckpointScript(v, 'crash')],
    ['convert', (v) => buildConvertToReferencePointScript(v)],
    ['destroy checkpoint', (v) => buildDestroyRecoveryCheckpointScript(v)],
    ['mount', (v) => buildVhdMountScript(v)],
    ['read', (v) => buildVhdReadScript(v, 3, [{ offset: 0, length: 4096 }])],
    ['dismount', (v) => buildVhdDismountScript(v)],
  ];
  for (const [what, build] of builders) {
    const plain = build('plain').split('\n');
    const evil = build(hostile).split('\n');
    t.equal(evil.length, plain.length, `${what}: the hostile value adds no line`);
    const differ = evil.map((l, i) => (l === plain[i] ? -1 : i)).filter((i) => i >= 0);
    t.same(differ.map((i) => evil[i]!.slice(0, 24)), ['$a = ConvertFrom-Json \'{'], `${what}: only the arguments line differs`);
    const line = evil[differ[0]!]!;
    t.match(line, /^\$a = ConvertFrom-Json '(?:[^'\u2018-\u201B\n\r]|''|\u2019\u2019)*'$/, `${what}: one single-quoted literal, every quote doubled, no raw newline`);
    const back = JSON.parse(line.slice("$a = ConvertFrom-Json '".length, -1).replace(/(['\u2018-\u201B])\1/g, '$1')) as Record<string, unknown>;
    t.ok(JSON.stringify(back).includes(JSON.stringify(hostile).slice(1, -1)), `${what}: the value decodes back unchanged`);
  }
  // and a tracker on a VM with that name takes a point end to end on the simulated host
  const dir = await tmpDir(t);
  const host = new SimHost(hostile).withData(dir, [64 * 1024]);
  host.disks[0]!.path = `D:\\VMs\\${hostile}.vhdx`;
  const tr = await HyperVTracker.open({ name: 'agent1', vm: hostile, stateDir: path.join(dir, 'state'), shell: host, minDrainIntervalMs: 0 });
  host.write(0, 4096, 4096, 0x5a);
  const p = await tr.beginPoint(dir);
  t.equal(merged(p.extents), '0:4096+4096');
  t.ok((await readAll(p.sources[0]!)).equals(host.live(0)), 'the point reads the disk through the hostile path');
  await p.end();
  await tr.close({ keep: false });
});

t.test('points: extents end at the checkpoint, sources read the frozen parents, end() moves the base', async (t) => {
  const dir = await tmpDir(t);
  const stateDir = path.join(dir, 'state');
  // the second disk's size is not a multiple of the 4096-byte read alignment
  const host = new SimHost().withData(dir, [4 * MiB, MiB + 512]);
  const tr = await HyperVTracker.open({ name: 'agent1', vm: 'app01', stateDir, shell: host, minDrainIntervalMs: 0, maxReadCallBytes: 256 * 1024 });
  const seam: HostModeTracker = tr; // the host-mode surface, checked by the compiler
  t.equal(seam.dataAccess, 'points');
  await t.rejects(tr.openSource(0, dir), { code: 'MOB_ERR_HYPERV', message: /cannot be read live.*inside a point/ }, 'the live disk cannot be read');

  host.write(0, 0, 8192, 1);
  t.equal(merged(await tr.drain()), '0:0+8192', 'a round before the point');
  host.write(0, 3 * MiB, 65536, 2);
  host.write(1, MiB - 4096, 4096 + 512, 3); // up to the last sector of the odd-sized disk
  const raw: Buffer[] = [];
  const journal = { beforeRead: () => undefined, afterRead: (b: Buffer) => { raw.push(b); } };
  const p = await tr.beginPoint(dir, journal, { consistency: 'application' });
  t.equal(p.consistency, 'application');
  t.equal([...host.snapshots.values()][0]!.consistencyLevel, 1, 'the host was asked for an application-consistent (VSS) checkpoint');
  const atPoint = [host.live(0), host.live(1)];
  t.equal(merged(p.extents), `0:${3 * MiB}+65536 1:${MiB - 4096}+4608`, 'the writes since the last round, up to the point');
  t.equal(merged(tr.parseText(Buffer.concat(raw).toString())), merged(p.extents), 'journaled as a drain is');
  t.equal(JSON.parse(fs.readFileSync(path.join(stateDir, 'hyperv-agent1.json'), 'utf8')).point, p.checkpoint, 'the checkpoint is recorded while it exists');

  // the guest writes on: into its differencing disks, not the frozen parents
  host.write(0, 3 * MiB, 4096, 9);
  host.write(1, 0, 4096, 9);
  const scriptsBefore = host.scripts.length;
  t.same(await tr.drain(), [], 'no round while a point is open');
  t.equal(host.scripts.length, scriptsBefore, '... and no script run for it');
  await t.rejects(tr.beginPoint(dir), { code: 'MOB_ERR_HYPERV', message: /already open/ });

  for (const i of [0, 1]) {
    const got = await readAll(p.sources[i]!);
    t.ok(got.equals(atPoint[i]!), `disk ${i} read through its source is the disk at the point`);
    t.notOk(got.equals(host.live(i)), `disk ${i} has changed since (the read was not of the live disk)`);
  }
  t.ok(host.readCalls.every((b) => b <= 256 * 1024), 'no read script returns more than maxReadCallBytes');
  t.equal(host.readCalls.reduce((s, b) => s + b, 0), 4 * MiB + MiB + 512, 'every byte read exactly once');
  t.equal(host.mounts.size, 2, 'both frozen parents are mounted');

  const bases = host.points.size;
  await p.end();
  t.equal(host.mounts.size, 0, 'end() dismounted the sources');
  t.equal(host.snapshots.size, 0, 'the checkpoint is merged away');
  t.equal(host.points.size, bases, 'one base: the converted checkpoint replaced the old one');
  t.equal(JSON.parse(fs.readFileSync(path.join(stateDir, 'hyperv-agent1.json'), 'utf8')).point, null, 'no checkpoint recorded');
  await p.end(); // idempotent
  t.equal(merged(await tr.drain()), `0:${3 * MiB}+4096 1:0+4096`, 'the next round lists exactly the writes after the point');
  await t.rejects(p.sources[0]!.read(Buffer.alloc(4096), 0, 4096), { code: 'MOB_ERR_HYPERV' }, 'a point\'s source is closed by end()');

  // crash-consistent is the default
  const p2 = await tr.beginPoint(dir);
  t.equal([...host.snapshots.values()][0]!.consistencyLevel, 2, 'crash-consistent checkpoint by default');
  t.same(p2.extents, []);
  await p2.end();
  t.equal(await tr.selfCheck(), null);
  await tr.close({ keep: false });
  t.equal(host.points.size, 0);
});

t.test('failures lose nothing: conversion refused, checkpoint stuck, agent killed inside a point', async (t) => {
  const dir = await tmpDir(t);
  const stateDir = path.join(dir, 'state');
  const host = new SimHost().withData(dir, [MiB]);
  const open = () => HyperVTracker.open({ name: 'agent1', vm: 'app01', stateDir, shell: host, minDrainIntervalMs: 0 });
  let tr = await open();

  // the conversion fails: the checkpoint is destroyed, the base stays, the changes come again
  host.write(0, 0, 4096, 1);
  let p = await tr.beginPoint(dir);
  t.equal(merged(p.extents), '0:0+4096');
  host.failNext = /Convert a recovery checkpoint/;
  await t.rejects(p.end(), { code: 'MOB_ERR_HYPERV', message: /without moving the base.*simulated/ });
  t.equal(host.snapshots.size, 0, 'the checkpoint was removed anyway');
  host.write(0, 8192, 4096, 2);
  t.equal(merged(await tr.drain()), '0:0+4096 0:8192+4096', 'the point\'s changes are listed again with the later ones');

  // creating the checkpoint fails: a coded error, nothing recorded
  host.failNext = /Create a recovery checkpoint/;
  await t.rejects(tr.beginPoint(dir), { code: 'MOB_ERR_HYPERV' });
  t.equal(JSON.parse(fs.readFileSync(path.join(stateDir, 'hyperv-agent1.json'), 'utf8')).point ?? null, null);

  // listing the point's changes fails: the checkpoint is removed, the error is coded
  host.write(0, 12288, 4096, 3);
  host.failNext = /List the changes/;
  await t.rejects(tr.beginPoint(dir), { code: 'MOB_ERR_HYPERV' });
  t.equal(host.snapshots.size, 0, 'a point that could not begin leaves no checkpoint');

  // the checkpoint can be neither converted nor destroyed: end() says so, it stays recorded
  p = await tr.beginPoint(dir);
  t.equal(merged(p.extents), '0:12288+4096', 'the failed point\'s changes come in the next one');
  host.failAlways = /Convert a recovery checkpoint|Destroy a recovery checkpoint/;
  await t.rejects(p.end(), { code: 'MOB_ERR_HYPERV', message: /stays recorded/ });
  t.equal(host.snapshots.size, 1);
  const recorded = JSON.parse(fs.readFileSync(path.join(stateDir, 'hyperv-agent1.json'), 'utf8')).point as string;
  t.equal(recorded, p.checkpoint, 'the stuck checkpoint is in the state file');
  await tr.close({ keep: true });
  host.failAlways = null;
  tr = await open();
  t.equal(host.snapshots.size, 0, 'the next open() removed the stuck checkpoint');

  t.equal(tr.resumed, true, 'the base survived all of the above');

  // the agent is killed inside a point (the tracker object is simply abandoned)
  host.write(0, 16384, 4096, 4);
  p = await tr.beginPoint(dir);
  await p.sources[0]!.read(Buffer.alloc(4096), 16384, 4096); // mounted
  t.equal(host.snapshots.size, 1);
  host.mounts.clear(); // the host dismounts what a dead process mounted... or an operator does
  const again = await open();
  t.equal(again.resumed, true, 'restart after a kill inside a point: resumed');
  t.equal(host.snapshots.size, 0, 'the dead agent\'s checkpoint is removed at open()');
  t.equal(merged(await again.drain()), '0:12288+8192', 'its changes are listed again, with the stuck point\'s (12288, never converted into the base)');
  await again.close({ keep: false });
});

t.test('the VHDX source: chunking, batching, offsets, short reads, decoding, errors, close', async (t) => {
  const dir = await tmpDir(t);
  const host = new SimHost();
  const file = path.join(dir, 'standalone.img');
  const size = 3 * 65536 + 512;
  const bytes = Buffer.alloc(size);
  for (let i = 0; i < size; i++) bytes[i] = (i * 7 + (i >> 9)) & 0xff;
  fs.writeFileSync(file, bytes);
  const vhdx = 'E:\\backup\\standalone.vhdx';
  host.files.set(vhdx, file);
  const src = new HyperVVhdSource({ name: 'agent1', shell: host, path: vhdx, size, maxCallBytes: 65536 });

  // an unaligned read across several call-sized pieces
  const buf = Buffer.alloc(150_000);
  await src.read(buf, 1000, 150_000);
  t.ok(buf.equals(bytes.subarray(1000, 151_000)), 'the bytes at an unaligned offset');
  t.ok(host.readCalls.length >= 3 && host.readCalls.every((b) => b <= 65536), `pieces of at most 64 KiB per call (${host.readCalls.join(', ')})`);
  t.equal(host.mounts.size, 1, 'mounted once');

  // concurrent small reads share calls
  host.readCalls = [];
  const offs = Array.from({ length: 12 }, (_, i) => i * 16384 + 100);
  const bufs = offs.map(() => Buffer.alloc(300));
  await Promise.all(offs.map((o, i) => src.read(bufs[i]!, o, 300)));
  offs.forEach((o, i) => t.ok(bufs[i]!.equals(bytes.subarray(o, o + 300)), `small read ${i}`));
  t.ok(host.readCalls.length <= 2, `12 concurrent reads took ${host.readCalls.length} script calls`);

  // across and past the end: zeros
  const tail = Buffer.alloc(8192, 0xff);
  await src.read(tail, size - 512, 8192);
  t.ok(tail.subarray(0, 512).equals(bytes.subarray(size - 512)), 'the last sector');
  t.ok(tail.subarray(512).equals(Buffer.alloc(8192 - 512)), 'zeros past the end');
  host.readCalls = [];
  const past = Buffer.alloc(4096, 0xff);
  await src.read(past, size + 4096, 4096);
  t.ok(past.equals(Buffer.alloc(4096)), 'a read wholly past the end is zeros');
  t.equal(host.readCalls.length, 0, '... without a script call');

  // a short read before the end, data that is not base64, a failed script, a dismounted disk
  host.shortBy = 512;
  await t.rejects(src.read(Buffer.alloc(4096), 0, 4096), { code: 'MOB_ERR_HYPERV', message: /before the end of the disk/ });
  host.corrupt = true;
  await t.rejects(src.read(Buffer.alloc(4096), 0, 4096), { code: 'MOB_ERR_HYPERV', message: /not base64/ });
  host.failNext = /Read ranges/;
  await t.rejects(src.read(Buffer.alloc(4096), 0, 4096), { code: 'MOB_ERR_HYPERV', message: /simulated/ });
  const okAfter = Buffer.alloc(4096);
  await src.read(okAfter, 4096, 4096);
  t.ok(okAfter.equals(bytes.subarray(4096, 8192)), 'reads go on after a failed one');
  const syncErr = (() => { try { src.readSync(); return null; } catch (e) { return e; } })();
  t.ok(syncErr instanceof MobilityError && syncErr.code === 'MOB_ERR_HYPERV', 'no synchronous reads over PowerShell');
  await t.rejects(src.read(Buffer.alloc(10), 0, 4096), { code: 'MOB_ERR_HYPERV', message: /bad range/ }, 'a length beyond the buffer is refused');

  host.mounts.set(vhdx, 99); // dismounted behind our back and mounted again as another disk
  await t.rejects(src.read(Buffer.alloc(4096), 0, 4096), { code: 'MOB_ERR_HYPERV', message: /no longer/ });
  host.mounts.delete(vhdx);

  // close dismounts; reads after close are refused; close is idempotent
  const again = new HyperVVhdSource({ name: 'agent1', shell: host, path: vhdx, size });
  await again.read(Buffer.alloc(512), 0, 512);
  t.equal(host.mounts.size, 1);
  await again.close();
  t.equal(host.mounts.size, 0, 'close() dismounted');
  await again.close();
  await t.rejects(again.read(Buffer.alloc(512), 0, 512), { code: 'MOB_ERR_HYPERV', message: /after close/ });
  // close() while a read is in flight: the read is served, then the disk is dismounted
  const busy = new HyperVVhdSource({ name: 'agent1', shell: host, path: vhdx, size, maxCallBytes: 65536 });
  const inflight = Buffer.alloc(2 * 65536);
  const reading = busy.read(inflight, 0, inflight.length);
  await busy.close();
  await reading;
  t.ok(inflight.equals(bytes.subarray(0, inflight.length)), 'the read in flight at close() got its bytes');
  t.equal(host.mounts.size, 0, '... and the disk was dismounted after it');
  const scripts = host.scripts.length;
  await new HyperVVhdSource({ name: 'agent1', shell: host, path: vhdx, size }).close();
  t.equal(host.scripts.length, scripts, 'a source never read closes without a script');

  // mounting what the host refuses, or a size that is not the disk's
  await t.rejects(new HyperVVhdSource({ name: 'agent1', shell: host, path: 'E:\\missing.vhdx', size }).read(Buffer.alloc(512), 0, 512), { code: 'MOB_ERR_HYPERV', message: /cannot find/ });
  const wrong = new HyperVVhdSource({ name: 'agent1', shell: host, path: vhdx, size: size + 512 });
  await t.rejects(wrong.read(Buffer.alloc(512), 0, 512), { code: 'MOB_ERR_HYPERV', message: /bytes mounted/ });
  await src.close();
  t.throws(() => new HyperVVhdSource({ name: 'agent1', shell: host, path: vhdx, size, maxCallBytes: 1000 }), { code: 'MOB_ERR_HYPERV' });
});

t.test('one PowerShell session runs one script at a time, in call order', async (t) => {
  let running = 0;
  let most = 0;
  const order: string[] = [];
  const inner = {
    async run(s: string) {
      running++;
      most = Math.max(most, running);
      await new Promise((r) => setImmediate(r));
      order.push(s);
      running--;
      if (s === 'bad') throw new Error('shell failed');
      return s;
    },
    async close() { order.push('close'); },
  };
  const shell = serialShell(inner);
  const runs = ['a', 'bad', 'b', 'c'].map((s) => shell.run(s).catch((e: Error) => e.message));
  const closing = shell.close();
  t.same(await Promise.all(runs), ['a', 'shell failed', 'b', 'c'], 'a failed script does not stop the next');
  await closing;
  t.equal(most, 1, 'never two scripts at once');
  t.same(order, ['a', 'bad', 'b', 'c', 'close']);
});
