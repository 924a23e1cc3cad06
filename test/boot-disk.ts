/**
 * A bootable test disk built from Debian packages, for the boot check tests: an MBR disk with
 * one bootable ext4 partition holding extlinux (syslinux's bootloader, in the partition's boot
 * sector, with syslinux's MBR code in front), a Debian cloud kernel (linux-image-*-cloud-amd64:
 * NVMe and ext4 are built in, so no initramfs is needed), the virtio network modules, and a
 * minimal init: busybox-static and a shell script as /sbin/init that mounts /proc and /sys,
 * loads the network modules, prints the network configuration it finds under /etc and the
 * MAC of each NIC it sees, prints MARKER and powers off.
 *
 * The packages come with `apt-get download` (apt-get update once when apt has no lists) and are
 * unpacked with dpkg-deb -x; both are kept in $TMPDIR/mobility-test-debs so reruns are fast.
 * The guest's network stack is systemd-networkd (an enabled unit and a DHCP .network file of
 * its own), so a network mapping writes 05-mobility-MAC.network files.
 *
 * Needs root, apt-get, dpkg-deb, sfdisk, losetup, partx, mkfs.ext4 and mount.
 */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import type { Cleanup } from './cleanup.js';
import { sleep } from './helpers.js';

export const MARKER = 'mobility-e2e: boot complete';
/** The MBR disk signature: the root is PARTUUID=<it>-01 whatever bus the disk is on. */
const DISK_ID = '4d4f4231';

const sh = (cmd: string, args: string[], o: { cwd?: string; input?: string } = {}) =>
  execFileSync(cmd, args, { encoding: 'utf8', cwd: o.cwd, input: o.input, stdio: ['pipe', 'pipe', 'pipe'], maxBuffer: 64 * 1024 * 1024 });

export function debCache(): string {
  const d = path.join(os.tmpdir(), 'mobility-test-debs');
  fs.mkdirSync(d, { recursive: true });
  return d;
}

let updated = false;
function aptGet(args: string[], cwd: string): string {
  try { return sh('apt-get', args, { cwd }); } catch (err) {
    if (updated) throw err;
    // a fresh machine may have no package lists yet
    updated = true;
    sh('apt-get', ['update', '-q']);
    return sh('apt-get', args, { cwd });
  }
}

/** The package linux-image-cloud-amd64 depends on (the versioned kernel), as apt knows it. */
function cloudKernelPackage(cache: string): string {
  const have = fs.readdirSync(cache).find((f) => /^linux-image-\d.*-cloud-amd64_.*\.deb$/.test(f));
  if (have) return have.split('_')[0];
  const find = () => /Depends: (linux-image-\d\S*-cloud-amd64)/.exec(sh('apt-cache', ['depends', 'linux-image-cloud-amd64']));
  let m = find();
  if (!m && !updated) {
    updated = true;
    sh('apt-get', ['update', '-q']);
    m = find();
  }
  if (!m) throw new Error('apt knows no linux-image-*-cloud-amd64 that linux-image-cloud-amd64 depends on');
  return m[1];
}

/** Downloads (once) and unpacks (once) a package; returns the directory it was unpacked into. */
function unpacked(cache: string, pkg: string): string {
  const dir = path.join(cache, `x-${pkg}`);
  if (fs.existsSync(path.join(dir, '.done'))) return dir;
  let deb = fs.readdirSync(cache).find((f) => f.startsWith(`${pkg}_`) && f.endsWith('.deb'));
  if (!deb) {
    aptGet(['-q', 'download', pkg], cache);
    deb = fs.readdirSync(cache).find((f) => f.startsWith(`${pkg}_`) && f.endsWith('.deb'));
    if (!deb) throw new Error(`apt-get download ${pkg} left no .deb in ${cache}`);
  }
  fs.rmSync(dir, { recursive: true, force: true });
  sh('dpkg-deb', ['-x', path.join(cache, deb), dir]);
  fs.writeFileSync(path.join(dir, '.done'), '');
  return dir;
}

export interface BootParts { kernel: string; modulesDir: string; busybox: string; extlinux: string; mbr: string }

/** The files the disk is made of, from the Debian packages (downloaded and unpacked once). */
export function bootParts(): BootParts {
  for (const tool of ['apt-get', 'dpkg-deb', 'sfdisk', 'losetup', 'partx', 'mkfs.ext4', 'mount']) {
    try { sh('sh', ['-c', `command -v ${tool}`]); } catch { throw new Error(`${tool} is required for this test`); }
  }
  const cache = debCache();
  const kpkg = cloudKernelPackage(cache);
  const k = unpacked(cache, kpkg);
  const version = kpkg.replace(/^linux-image-/, '');
  const bb = unpacked(cache, 'busybox-static');
  const ext = unpacked(cache, 'extlinux');
  const parts = {
    kernel: path.join(k, 'boot', `vmlinuz-${version}`),
    modulesDir: path.join(k, 'lib', 'modules', version),
    busybox: path.join(bb, 'bin', 'busybox'),
    extlinux: path.join(ext, 'usr', 'bin', 'extlinux'),
    mbr: path.join(ext, 'usr', 'lib', 'EXTLINUX', 'mbr.bin'),
  };
  for (const [what, p] of Object.entries(parts)) if (!fs.existsSync(p)) throw new Error(`${what} not found at ${p} in the unpacked packages`);
  return parts;
}

/** Module name -> file, for every module of the kernel package. */
function moduleFiles(dir: string): Map<string, string> {
  const out = new Map<string, string>();
  const walk = (d: string) => {
    for (const e of fs.readdirSync(d, { withFileTypes: true })) {
      const p = path.join(d, e.name);
      if (e.isDirectory()) walk(p);
      else if (e.name.endsWith('.ko')) out.set(e.name.slice(0, -3).replaceAll('-', '_'), p);
    }
  };
  walk(dir);
  return out;
}

/** The modules with everything they depend on (from each module's depends= in .modinfo), dependencies first. */
export function moduleClosure(modulesDir: string, wanted: string[]): string[] {
  const files = moduleFiles(modulesDir);
  const order: string[] = [];
  const visit = (name: string, seen: Set<string>) => {
    if (order.includes(name)) return;
    if (seen.has(name)) throw new Error(`module dependency cycle at ${name}`);
    seen.add(name);
    const file = files.get(name);
    if (!file) throw new Error(`module ${name} is not in ${modulesDir}`);
    const m = /\0depends=([^\0]*)\0/.exec(fs.readFileSync(file).toString('latin1'));
    for (const d of (m?.[1] ?? '').split(',').filter(Boolean)) visit(d.replaceAll('-', '_'), seen);
    order.push(name);
  };
  for (const w of wanted) visit(w, new Set());
  return order.map((n) => files.get(n)!);
}

export interface BootDisk { img: string; loop: string; part: string; mnt: string }

const INIT = (modules: string[]) => `#!/bin/busybox sh
# minimal init of the boot-check test disk: show the network configuration, print the marker, power off
export PATH=/bin
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs dev /dev
echo "guest: init started"
${modules.map((m) => `/bin/busybox insmod /lib/modules/net/${path.basename(m)} 2>/dev/null`).join('\n')}
/bin/busybox sleep 1
echo "guest: network configuration under /etc:"
for f in /etc/systemd/network/*.network /etc/netplan/*.yaml /etc/network/interfaces; do
  [ -f "$f" ] || continue
  echo "guest: --- $f"
  /bin/busybox sed 's/^/guest: | /' "$f"
done
for n in /sys/class/net/*; do
  [ "$(/bin/busybox basename $n)" = lo ] && continue
  echo "guest: nic $(/bin/busybox basename $n) $(/bin/busybox cat $n/address)"
done
echo "${MARKER}"
/bin/busybox sync
/bin/busybox poweroff -f
`;

/**
 * Builds the disk on a new loop device (registered with the cleanup scope) and leaves its root
 * partition mounted at DIR/mnt (registered too), as a protected machine's disk would be.
 */
export async function buildBootDisk(c: Cleanup, dir: string, parts: BootParts, sizeMb = 128): Promise<BootDisk> {
  const img = path.join(dir, 'boot-disk.img');
  await fsp.writeFile(img, '');
  await fsp.truncate(img, sizeMb * 1024 * 1024);
  sh('sfdisk', ['--quiet', img], { input: `label: dos\nlabel-id: 0x${DISK_ID}\nstart=2048, type=83, bootable\n` });
  const loop = sh('losetup', ['--find', '--show', '-P', img]).trim();
  c.loop(loop);
  const part = `${loop}p1`;
  for (let i = 0; !fs.existsSync(part); i++) {
    if (i === 20) { try { sh('partx', ['-a', loop]); } catch { /* already known to the kernel */ } }
    if (i > 200) throw new Error(`${part} did not appear`);
    await sleep(50);
  }
  // no 64bit feature: extlinux reads the filesystem to find its files
  sh('mkfs.ext4', ['-q', '-F', '-O', '^64bit', '-E', 'lazy_itable_init=0,lazy_journal_init=0', '-L', 'root', part]);
  const mnt = path.join(dir, 'mnt');
  await fsp.mkdir(mnt);
  sh('mount', ['-o', 'noatime', part, mnt]);
  c.mount(mnt);
  for (const d of ['bin', 'sbin', 'proc', 'sys', 'dev', 'boot/extlinux', 'lib/modules/net', 'etc/systemd/network', 'etc/systemd/system/multi-user.target.wants']) {
    await fsp.mkdir(path.join(mnt, d), { recursive: true });
  }
  await fsp.copyFile(parts.busybox, path.join(mnt, 'bin/busybox'));
  await fsp.chmod(path.join(mnt, 'bin/busybox'), 0o755);
  await fsp.copyFile(parts.kernel, path.join(mnt, 'boot/vmlinuz'));
  const modules = moduleClosure(parts.modulesDir, ['virtio_pci', 'virtio_net']);
  for (const m of modules) await fsp.copyFile(m, path.join(mnt, 'lib/modules/net', path.basename(m)));
  await fsp.writeFile(path.join(mnt, 'sbin/init'), INIT(modules), { mode: 0o755 });
  // the guest's own network configuration (networkd, DHCP on every en*/eth* NIC)
  await fsp.writeFile(path.join(mnt, 'etc/systemd/network/50-dhcp.network'), '[Match]\nName=en* eth*\n\n[Network]\nDHCP=yes\n');
  await fsp.symlink('/lib/systemd/system/systemd-networkd.service', path.join(mnt, 'etc/systemd/system/multi-user.target.wants/systemd-networkd.service'));
  await fsp.writeFile(path.join(mnt, 'boot/extlinux/extlinux.conf'), [
    'SERIAL 0 115200', 'DEFAULT linux', 'TIMEOUT 1', 'LABEL linux', '  KERNEL /boot/vmlinuz',
    // panic=-1: a kernel that cannot start init reboots at once, which ends a boot check (-no-reboot)
    `  APPEND root=PARTUUID=${DISK_ID}-01 rootwait ro console=ttyS0,115200 panic=-1`, '',
  ].join('\n'));
  sh(parts.extlinux, ['--install', path.join(mnt, 'boot/extlinux')]);
  // syslinux's MBR code: the BIOS runs it, it chains to the active partition's boot sector
  const mbr = await fsp.readFile(parts.mbr);
  const fh = await fsp.open(loop, 'r+');
  try { await fh.write(mbr, 0, Math.min(440, mbr.length), 0); await fh.sync(); } finally { await fh.close(); }
  sh('sync', []);
  return { img, loop, part, mnt };
}
