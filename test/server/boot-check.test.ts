/**
 * The boot check on its own: QEMU's command line per bus and network, then real boots under
 * TCG of the test disk built from Debian packages (test/boot-disk.ts): the marker is reached and
 * the console seen; a check aborted on a console line, a disk with nothing to boot that times
 * out, and a missing QEMU each give their result or coded error, and no QEMU is left running.
 *
 * Needs root, qemu-system-x86_64, apt-get (or the cached packages), dpkg-deb, sfdisk, losetup,
 * mkfs.ext4 and mount: a missing one fails the test.
 */
import t from 'tap';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { bootCheck, describeBootCheck, qemuArgs } from '../../src/server/recovery/boot-check.js';
import { bootParts, buildBootDisk, MARKER } from '../boot-disk.js';
import { cleanup } from '../cleanup.js';

/** Whether a QEMU process has the image on its command line (from /proc: no procps needed). */
const qemuRunning = (image: string) => fs.readdirSync('/proc').filter((d) => /^\d+$/.test(d)).some((pid) => {
  let cmd = '';
  try { cmd = fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8'); } catch { return false; }
  return cmd.includes('qemu-system') && cmd.includes(image);
});

t.test('QEMU command line: bus, network, acceleration, snapshot', async (t) => {
  const a = qemuArgs({ images: ['/srv/a,b.img', '/srv/c.img'], marker: 'x', timeoutMs: 1000, bus: 'nvme', network: { kind: 'isolated', macs: ['52:54:00:00:00:01'] } });
  const s = a.join(' ');
  t.match(s, /-accel kvm -accel tcg/, 'auto: KVM, falling back to TCG');
  t.match(s, /-drive file=\/srv\/a,,b\.img,format=raw,if=none,id=d0,snapshot=on -device nvme,drive=d0,serial=mobility0,bootindex=0/, 'commas doubled, guest writes discarded, first disk boots');
  t.match(s, /id=d1,snapshot=on -device nvme,drive=d1,serial=mobility1,bootindex=1/);
  t.match(s, /-nic user,restrict=on,model=virtio-net-pci,mac=52:54:00:00:00:01/, 'isolated: user-mode network with no way out, the NIC keeps its MAC');
  t.match(s, /-serial stdio/);
  t.match(s, /-no-reboot/);
  const b = qemuArgs({ images: ['/x.img'], marker: 'x', timeoutMs: 1000, accel: 'tcg' }).join(' ');
  t.match(b, /-accel tcg/);
  t.notMatch(b, /kvm/);
  t.match(b, /-nic none/, 'no network by default');
  t.match(b, /virtio-blk-pci,drive=d0/, 'virtio by default');
  t.match(qemuArgs({ images: ['/x.img'], marker: 'x', timeoutMs: 1000, bus: 'ide' }).join(' '), /ide-hd,drive=d0/);
});

t.test('real boots under TCG', async (t) => {
  try { execFileSync('sh', ['-c', 'command -v qemu-system-x86_64']); } catch { throw new Error('qemu-system-x86_64 is required for this test (Debian: qemu-system-x86)'); }
  const c = cleanup(t);
  const dir = c.dir('bootcheck-');
  const disk = await buildBootDisk(c, dir, bootParts());
  execFileSync('umount', [disk.mnt]);
  const lines: string[] = [];

  const ok = await bootCheck({ images: [disk.img], marker: `^${MARKER}$`, timeoutMs: 10 * 60_000, bus: 'nvme', accel: 'tcg', consoleLog: path.join(dir, 'console.log'), onLine: (l) => lines.push(l) });
  t.ok(ok.ok, `the disk boots to the marker: ${describeBootCheck(ok)}\n${ok.tail.join('\n')}`);
  t.equal(ok.reason, 'marker');
  t.equal(ok.accel, 'tcg');
  t.equal(ok.markerLine, MARKER);
  t.ok(lines.some((l) => /guest: init started/.test(l)), 'the console was followed line by line');
  t.ok(lines.some((l) => /Linux version \S+-cloud-amd64/.test(l)), 'the kernel from the image booted');
  t.ok(lines.some((l) => /guest: \| DHCP=yes/.test(l)), 'the guest printed its own network configuration');
  t.equal(fs.statSync(path.join(dir, 'console.log')).mode & 0o777, 0o600, 'console log 0600');
  t.ok((await fsp.readFile(path.join(dir, 'console.log'), 'utf8')).includes('guest: init started'), 'the console log holds the console');
  t.notOk(qemuRunning(disk.img), 'QEMU is gone');

  // auto: KVM when this host allows it, else TCG; either way the same disk boots
  const auto = await bootCheck({ images: [disk.img], marker: `^${MARKER}$`, timeoutMs: 10 * 60_000, bus: 'nvme' });
  t.ok(auto.ok, `auto acceleration boots too (${auto.accel}): ${auto.ok ? '' : auto.tail.join('\n')}`);
  t.ok(auto.accel === 'tcg' || fs.existsSync('/dev/kvm'), 'KVM reported only where /dev/kvm exists');
  t.notOk(qemuRunning(disk.img), 'no QEMU left (also none of a KVM attempt that failed)');
  // kvm forced: boots where KVM runs guests, else a coded refusal (no /dev/kvm, or a KVM that stops the guest)
  const kvm = await bootCheck({ images: [disk.img], marker: `^${MARKER}$`, timeoutMs: 10 * 60_000, bus: 'nvme', accel: 'kvm' })
    .catch((err: { code?: string; message?: string }) => err);
  if ('ok' in kvm) t.ok(kvm.ok && kvm.accel === 'kvm', `KVM boots here (${describeBootCheck(kvm)})`);
  else t.match(kvm, { code: 'MOB_ERR_BOOT_CHECK', message: /KVM could not run the guest|QEMU refused to start/ }, `KVM cannot run guests here: ${kvm.message}`);
  t.notOk(qemuRunning(disk.img), 'no QEMU left after the KVM attempt');

  const ac = new AbortController();
  const aborted = await bootCheck({ images: [disk.img], marker: 'never printed', timeoutMs: 10 * 60_000, bus: 'nvme', accel: 'tcg', signal: ac.signal,
    onLine: (l) => { if (l.includes('guest: init started')) ac.abort(); } });
  t.equal(aborted.reason, 'aborted', 'aborted on a console line');
  t.notOk(aborted.ok);
  t.ok(aborted.tail.some((l) => l.includes('guest: init started')), 'the tail holds the last lines');
  t.notOk(qemuRunning(disk.img), 'QEMU is gone after an abort');

  // nothing bootable: the firmware waits forever and the console stays silent
  const blank = path.join(dir, 'blank.img');
  await fsp.writeFile(blank, Buffer.alloc(1024 * 1024));
  const silent = await bootCheck({ images: [blank], marker: 'login:', timeoutMs: 3000, accel: 'tcg' });
  t.equal(silent.reason, 'timeout', 'no marker within the limit');
  t.same(silent.tail, [], 'and no console at all');
  t.notOk(qemuRunning(blank), 'QEMU is killed at the limit');

  await t.rejects(bootCheck({ images: [disk.img], marker: 'x', timeoutMs: 5000, qemu: path.join(dir, 'no-such-qemu') }), { code: 'MOB_ERR_BOOT_CHECK', message: /not installed/ });
  await t.rejects(bootCheck({ images: [path.join(dir, 'missing.img')], marker: 'x', timeoutMs: 5000 }), { code: 'MOB_ERR_BOOT_CHECK', message: /not a local image/ });
  await t.rejects(bootCheck({ images: [disk.img], marker: '(', timeoutMs: 5000 }), { code: 'MOB_ERR_USAGE', message: /not a regular expression/ });
});
