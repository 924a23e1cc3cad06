import t from 'tap';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { execFileSync } from 'node:child_process';
import si from 'systeminformation';
import {
  collectInventory, defaultGateways, disksFrom, formatMachines, nameservers, nicsFrom, readMachineId,
  type BlockRow, type Inventory, type SysNic,
} from '../../src/agent/inventory.js';
import { tmpDir, sleep } from '../helpers.js';

// The real-machine tests run as root against a real loop device, like the
// tracker tests: missing tools (losetup, sfdisk, mkfs.ext4) fail, never skip.

const MiB = 1024 * 1024;
const GiB = 1024 * MiB;

function run(cmd: string, args: string[], input?: string): string {
  return execFileSync(cmd, args, { encoding: 'utf8', input, stdio: [input === undefined ? 'ignore' : 'pipe', 'pipe', 'pipe'] });
}

async function siMachineId(): Promise<string> {
  return (await si.uuid()).os.trim().toLowerCase();
}

t.test('collectInventory describes this machine', async (t) => {
  const inv = await collectInventory();
  t.ok(inv.machineId.length > 0, 'machine id');
  if (fs.existsSync('/etc/machine-id')) {
    t.equal(inv.machineId, fs.readFileSync('/etc/machine-id', 'utf8').trim().toLowerCase(), 'machine id is /etc/machine-id');
  }
  t.equal(inv.hostname, os.hostname());
  t.equal(inv.os.kernel, os.release());
  t.equal(inv.os.platform, process.platform);
  t.equal(inv.os.arch, os.arch());
  if (fs.existsSync('/etc/os-release')) t.ok(inv.os.distro.length > 0, `distro from /etc/os-release (${inv.os.distro} ${inv.os.release})`);
  t.ok(Math.abs(inv.memoryBytes - os.totalmem()) <= os.totalmem() * 0.01, 'memory close to os.totalmem()');
  t.ok(inv.cpu.cores >= 1, 'at least one core');
  t.ok(inv.disks.length >= 1, 'at least one disk');
  for (const d of inv.disks) {
    t.equal(d.path, `/dev/${d.name}`, `${d.name}: path is the /dev path`);
    t.ok(d.sizeBytes > 0, `${d.name}: size > 0`);
    t.ok(d.type === 'disk' || d.type === 'loop', `${d.name}: type ${d.type}`);
  }
  t.ok(inv.nics.length >= 1, 'at least one nic');
  if (inv.nics.length > 1) t.notOk(inv.nics.some((n) => n.name === 'lo'), 'no loopback next to other interfaces');
  t.equal(new Date(inv.collectedAt).toISOString(), inv.collectedAt, 'collectedAt is ISO');
  t.ok(Number.isInteger(inv.collectMs) && inv.collectMs >= 0, 'collectMs recorded');
  t.same(JSON.parse(JSON.stringify(inv)), inv, 'survives JSON (it is sent to the server)');
});

t.test('collectInventory lists an attached loop device with its partition, filesystem and mount', async (t) => {
  const dir = await fsp.mkdtemp(path.join(os.tmpdir(), 'mobility-inventory-'));
  const mnt = path.join(dir, 'mnt');
  let dev = '';
  t.teardown(async () => { // in this order: unmount, detach, remove
    try { run('umount', ['-l', mnt]); } catch { /* not mounted */ }
    if (dev) try { run('losetup', ['-d', dev]); } catch { /* gone */ }
    await fsp.rm(dir, { recursive: true, force: true });
  });
  const img = path.join(dir, 'disk.img');
  await fsp.writeFile(img, '');
  await fsp.truncate(img, 64 * MiB);
  run('sfdisk', ['--quiet', img], 'start=2048, size=40960\n');
  dev = run('losetup', ['--find', '--show', '-P', img]).trim();
  const part = `${dev}p1`;
  let end = Date.now() + 1000;
  while (!fs.existsSync(part) && Date.now() < end) await sleep(50);
  if (!fs.existsSync(part)) run('partx', ['-a', dev]);
  end = Date.now() + 5000;
  while (!fs.existsSync(part)) {
    if (Date.now() > end) throw new Error(`${part} did not appear`);
    await sleep(50);
  }
  run('mkfs.ext4', ['-q', '-F', part]);
  await fsp.mkdir(mnt);
  run('mount', [part, mnt]);

  const inv = await collectInventory();
  const name = path.basename(dev);
  const disk = inv.disks.find((d) => d.name === name);
  if (!disk) throw new Error(`${name} missing from ${inv.disks.map((d) => d.name).join(', ')}`);
  t.equal(disk.path, dev);
  t.equal(disk.type, 'loop');
  t.equal(disk.sizeBytes, 64 * MiB);
  t.same(disk.partitions.map((p) => [p.name, p.path, p.sizeBytes]), [[`${name}p1`, part, 40960 * 512]]);
  t.equal(disk.partitions[0].mount, mnt, 'partition mount');
  t.same(disk.mounts, [mnt], 'the disk lists the mount on its partition');
  t.equal(disk.partitions[0].fsType, 'ext4', 'fsType (from lsblk, or from the mount table without udev)');
  t.notOk(inv.disks.some((d) => d.name === `${name}p1`), 'a partition is not a disk');
});

t.test('readMachineId trims and lower-cases the file', async (t) => {
  const dir = await tmpDir(t);
  const file = path.join(dir, 'machine-id');
  await fsp.writeFile(file, ' ABCDEF0123\n');
  t.equal(await readMachineId(file), 'abcdef0123');
});

t.test('readMachineId falls back to the systeminformation uuid', async (t) => {
  const dir = await tmpDir(t);
  const fallback = await siMachineId();
  t.ok(fallback.length > 0, 'this machine has an OS uuid');
  t.equal(await readMachineId(path.join(dir, 'missing')), fallback, 'missing file');
  const empty = path.join(dir, 'empty');
  await fsp.writeFile(empty, '\n');
  t.equal(await readMachineId(empty), fallback, 'empty file');
  const uninit = path.join(dir, 'uninit');
  await fsp.writeFile(uninit, 'uninitialized\n');
  t.equal(await readMachineId(uninit), fallback, 'systemd first-boot placeholder');
});

t.test('readMachineId throws MOB_ERR_CONFIG with neither a file nor a uuid', async (t) => {
  const dir = await tmpDir(t);
  const uuid = async () => ({ os: '', hardware: '', macs: [] });
  const mocked = await t.mockImport<typeof import('../../src/agent/inventory.js')>(new URL('../../src/agent/inventory.js', import.meta.url).href, {
    systeminformation: { default: { ...si, uuid } },
  });
  await t.rejects(mocked.readMachineId(path.join(dir, 'missing')), { code: 'MOB_ERR_CONFIG' });
  const empty = path.join(dir, 'empty');
  await fsp.writeFile(empty, '');
  await t.rejects(mocked.readMachineId(empty), { code: 'MOB_ERR_CONFIG', message: /is empty/ });
});

const row = (r: Partial<BlockRow> & { name: string; type: string }): BlockRow =>
  ({ size: 8 * GiB, fsType: '', mount: '', model: '', removable: false, ...r });

t.test('disksFrom: partitions, loop devices, models and mounts', async (t) => {
  const blocks = [
    row({ name: 'nvme0n1', type: 'disk', model: 'lsblk model' }),
    row({ name: 'nvme0n1p1', type: 'part', size: GiB, fsType: 'vfat', mount: '/boot/efi' }),
    row({ name: 'nvme0n1p2', type: 'part', size: 7 * GiB, fsType: 'LVM2_member' }),
    row({ name: 'sda', type: 'disk', removable: true }),
    row({ name: 'sda1', type: 'part', fsType: 'ext4', mount: '/data' }),
    row({ name: 'zram0', type: 'disk', size: 0 }),
    row({ name: 'loop1', type: 'loop', size: 64 * MiB }),
    row({ name: 'loop10', type: 'loop', size: 32 * MiB }),
    row({ name: 'loop1p1', type: 'part', size: 16 * MiB }),
    row({ name: 'loop2', type: 'loop', size: 0 }),
    row({ name: 'sr0', type: 'rom', size: GiB }),
    row({ name: 'vg-root', type: 'lvm', mount: '/' }),
  ];
  const layout = [{ device: '/dev/nvme0n1', name: 'Samsung SSD 980 ' }, { device: '/dev/sdz', name: 'other' }];
  const disks = disksFrom(blocks, layout, {
    mounts: new Map([['nvme0n1p2', ['/', '/home']], ['sda1', ['/data', '/srv']], ['loop1p1', ['/mnt/img']]]),
    fsTypes: new Map([['loop1p1', 'xfs'], ['sda1', 'btrfs']]),
  });
  t.same(disks.map((d) => d.name), ['nvme0n1', 'sda', 'loop1', 'loop10'], 'disks and attached loops only');
  const [nvme, sda, loop1, loop10] = disks;
  t.equal(nvme.path, '/dev/nvme0n1');
  t.equal(nvme.model, 'Samsung SSD 980', 'model from diskLayout');
  t.same(nvme.partitions, [
    { name: 'nvme0n1p1', path: '/dev/nvme0n1p1', sizeBytes: GiB, fsType: 'vfat', mount: '/boot/efi' },
    { name: 'nvme0n1p2', path: '/dev/nvme0n1p2', sizeBytes: 7 * GiB, fsType: 'LVM2_member', mount: '/' },
  ]);
  t.same(nvme.mounts, ['/', '/home', '/boot/efi'], 'mounts of the partitions and what is stacked on them');
  t.equal(sda.model, '', 'no model anywhere');
  t.equal(sda.removable, true);
  t.same(sda.mounts, ['/srv', '/data']);
  t.same(loop1.partitions, [{ name: 'loop1p1', path: '/dev/loop1p1', sizeBytes: 16 * MiB, fsType: 'xfs', mount: '/mnt/img' }],
    'loop1p1 belongs to loop1, not loop10; fsType from the mount table when lsblk has none');
  t.equal(sda.partitions[0].fsType, 'ext4', 'lsblk fsType wins');
  t.equal(loop1.type, 'loop');
  t.same(loop10.partitions, []);

  const byParent = disksFrom(blocks, [], { parents: new Map([['loop1p1', 'loop10']]) });
  t.same(byParent.find((d) => d.name === 'loop10')!.partitions.map((p) => p.name), ['loop1p1'], 'sysfs parent wins over the name');
});

t.test('nicsFrom: groups addresses, leaves loopback out, keeps unplugged physical NICs', async (t) => {
  const a = (address: string, family: string, mac: string, internal = false) => ({ address, family, mac, internal, cidr: `${address}/${family === 'IPv4' ? 24 : 64}` });
  const lo = [a('127.0.0.1', 'IPv4', '00:00:00:00:00:00', true), a('::1', 'IPv6', '00:00:00:00:00:00', true)];
  const eth0 = [a('10.0.0.5', 'IPv4', '02:00:00:00:00:01'), a('10.0.0.6', 'IPv4', '02:00:00:00:00:01'),
    a('fd00::5', 'IPv6', '02:00:00:00:00:01'), a('fe80::1', 'IPv6', '02:00:00:00:00:01')];
  const sys = new Map<string, SysNic>([
    ['lo', { operstate: 'unknown', flags: 0x9, address: '00:00:00:00:00:00', physical: false }],
    ['eth0', { operstate: 'up', flags: 0x1003, address: '02:00:00:00:00:01', physical: true }],
    ['eth1', { operstate: 'down', flags: 0x1002, address: '02:00:00:00:00:02', physical: true }],
    ['ifb0', { operstate: 'down', flags: 0x82, address: 'ba:4e:2c:cc:ab:96', physical: false }],
  ]);
  t.same(nicsFrom({ lo, eth0 }, sys, new Map([['eth0', ['10.0.0.1']]])), [
    { name: 'eth0', mac: '02:00:00:00:00:01', ipv4: ['10.0.0.5', '10.0.0.6'], ipv6: ['fd00::5', 'fe80::1'], up: true,
      cidrs: ['10.0.0.5/24', '10.0.0.6/24', 'fd00::5/64', 'fe80::1/64'], gateways: ['10.0.0.1'] },
    { name: 'eth1', mac: '02:00:00:00:00:02', ipv4: [], ipv6: [], up: false, cidrs: [], gateways: [] },
  ]);
  t.same(nicsFrom({ lo }, new Map([['lo', sys.get('lo')!]])), [
    { name: 'lo', mac: '00:00:00:00:00:00', ipv4: ['127.0.0.1'], ipv6: ['::1'], up: true, cidrs: ['127.0.0.1/24', '::1/64'], gateways: [] },
  ], 'loopback when it is the only interface');
  t.same(nicsFrom({ eth0 }, new Map()).map((n) => n.up), [true], 'no sysfs: listed with addresses means up');
});

t.test('defaultGateways and nameservers read /proc/net/route, /proc/net/ipv6_route and resolv.conf text', async (t) => {
  const route = 'Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n'
    + 'eth0\t00000000\t0100000A\t0003\t0\t0\t100\t00000000\t0\t0\t0\n'
    + 'eth0\t0000000A\t00000000\t0001\t0\t0\t100\t00FFFFFF\t0\t0\t0\n'
    + 'eth1\t00000000\t00000000\t0001\t0\t0\t0\t00000000\t0\t0\t0\n';
  const v6 = '00000000000000000000000000000000 00 00000000000000000000000000000000 00 fe800000000000000000000000000001 00000400 00000001 00000000 00000003 eth0\n'
    + 'fd000000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001 eth0\n'
    + '00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200 lo\n';
  t.same(Object.fromEntries(defaultGateways(route, v6)), { eth0: ['10.0.0.1', 'fe80::1'] }, 'default routes with a gateway only');
  t.same(nameservers('# generated\nsearch example.net\nnameserver 10.0.0.53\n nameserver fd00::53\nnameserver 10.0.0.53\n'), ['10.0.0.53', 'fd00::53']);
  const inv = await collectInventory();
  t.ok(Array.isArray(inv.dns), 'the inventory lists DNS servers');
  t.ok(inv.nics.every((n) => Array.isArray(n.cidrs) && Array.isArray(n.gateways)), 'and per NIC prefixes and gateways');
  t.ok(inv.nics.every((n) => n.cidrs!.length === n.ipv4.length + n.ipv6.length), 'one prefix per address');
});

function inventory(over: Partial<Inventory> = {}): Inventory {
  const disk = (name: string, sizeBytes: number) => ({ name, path: `/dev/${name}`, sizeBytes, model: '', type: 'disk', removable: false, partitions: [], mounts: [] });
  return {
    machineId: 'abcdef0123', hostname: 'web01',
    os: { platform: 'linux', distro: 'Ubuntu', release: '22.04', kernel: '5.15.0-91-generic', arch: 'x64' },
    cpu: { model: 'Intel Xeon', cores: 4 }, memoryBytes: 16 * GiB,
    disks: [disk('sda', 20 * GiB), disk('sdb', 10 * GiB), disk('loop0', 10 * GiB)],
    nics: [
      { name: 'lo', mac: '', ipv4: ['127.0.0.1'], ipv6: [], up: true },
      { name: 'eth0', mac: 'x', ipv4: ['10.0.0.5', '10.0.0.6', '10.0.0.7'], ipv6: ['fe80::1'], up: true },
    ],
    collectedAt: '2025-01-01T00:00:00.000Z', collectMs: 40, ...over,
  };
}

t.test('formatMachines: header, one aligned line per machine, "-" without inventory', async (t) => {
  const out = formatMachines([
    { agentId: 'web01-agent', hostname: 'web01', connected: true, lastSeen: '2025-01-01T00:00:05.000Z', inventory: inventory() },
    { agentId: 'db', hostname: 'db01', connected: false, lastSeen: null, inventory: null },
  ]);
  t.ok(out.endsWith('\n'), 'ends with a newline');
  const lines = out.slice(0, -1).split('\n');
  t.equal(lines.length, 3, 'header and one line per row');
  t.match(lines[0], /^AGENT\s+HOSTNAME\s+STATE\s+OS\s+KERNEL\s+CPU\s+MEM\s+DISKS\s+IPS\s+LAST SEEN$/);
  t.match(lines[1], /^web01-agent\s+web01\s+connected\s+Ubuntu 22\.04\s+5\.15\.0-91-generic\s+4\s+16\.0 GiB\s+3 \/ 40\.0 GiB\s+10\.0\.0\.5,10\.0\.0\.6\s+2025-01-01T00:00:05\.000Z$/);
  t.match(lines[2], /^db\s+db01\s+offline(\s+-){7}$/, 'offline, "-" in every inventory column and for last seen');
  for (const col of ['HOSTNAME', 'STATE', 'OS', 'KERNEL', 'LAST SEEN']) {
    const at = lines[0].search(new RegExp(`(?<= )${col}(?= |$)`));
    t.ok(lines.slice(1).every((l) => l[at - 1] === ' ' && l[at] !== ' '), `${col} column aligned`);
  }
  t.ok(lines.every((l) => !l.endsWith(' ')), 'no trailing spaces');

  const withPolicy = formatMachines([
    { agentId: 'a', hostname: 'h', connected: true, lastSeen: null, inventory: inventory(), policy: 'gold', disks: 2 },
    { agentId: 'b', hostname: 'h2', connected: false, lastSeen: null, inventory: null, policy: null, disks: 0 },
  ]).trimEnd().split('\n');
  t.match(withPolicy[0], /\sIPS\s+POLICY\s+PROTECTED\s+LAST SEEN$/, 'policy and protected-disk columns when given');
  t.match(withPolicy[1], /\sgold\s+2\s+-$/);
  t.match(withPolicy[2], /\s-\s+0\s+-$/);
  t.match(formatMachines([]), /^AGENT .*LAST SEEN\n$/, 'no machines: the header alone');
});
