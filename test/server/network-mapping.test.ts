/**
 * Network mapping: validation (coded errors naming the field), NIC resolution (subnet
 * translation, explicit address, DHCP, NICs left alone), the three guest formats against golden
 * files (UPDATE_GOLDEN=1 rewrites them), and the whole step on real ext4 images (a partition
 * table and a bare filesystem, built with mke2fs -d, mounted by the code under test).
 *
 * Needs root, mke2fs, sfdisk and mount: a missing one fails the test.
 */
import t, { type Test } from 'tap';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { cleanup } from '../cleanup.js';
import {
  applyNetworkMapping, disableIfupdownStanzas, renderIfupdownBlock, renderNetplan, renderNetworkd,
} from '../../src/server/recovery/guest-network.js';
import { parseNetworkMapping, resolveNics, type NetworkMapping } from '../../src/server/recovery/network-mapping.js';
import type { InventoryNic } from '../../src/agent/inventory.js';

const GOLDEN_DIR = fileURLToPath(new URL('../../../test/server/golden', import.meta.url));

const sh = (cmd: string, args: string[], input?: string) => execFileSync(cmd, args, { encoding: 'utf8', input, stdio: ['pipe', 'pipe', 'pipe'] });

const MAP = {
  version: 1,
  networks: [
    { source: '10.0.0.0/24', target: { subnet: '192.168.50.0/24', gateway: '192.168.50.1', dns: ['192.168.50.53', '192.168.50.54'], mode: 'static' } },
    { source: '10.9.0.0/16', target: { mode: 'dhcp' } },
  ],
  nics: [{ mac: '52:54:00:00:00:03', name: 'ens5', source: '10.9.4.7/16' }],
};

const INVENTORY: InventoryNic[] = [
  { name: 'eth0', mac: '52:54:00:00:00:01', ipv4: ['10.0.0.5'], ipv6: [], up: true, cidrs: ['10.0.0.5/24', 'fe80::1/64'], gateways: ['10.0.0.1'] },
  { name: 'eth1', mac: '52:54:00:00:00:02', ipv4: ['172.16.0.9'], ipv6: [], up: true, cidrs: ['172.16.0.9/24'], gateways: [] },
];

async function golden(t: Test, name: string, text: string): Promise<void> {
  const file = path.join(GOLDEN_DIR, name);
  if (process.env.UPDATE_GOLDEN === '1') { await fsp.mkdir(GOLDEN_DIR, { recursive: true }); await fsp.writeFile(file, text); }
  t.equal(text, await fsp.readFile(file, 'utf8'), `equals test/server/golden/${name} (UPDATE_GOLDEN=1 rewrites it)`);
}

t.test('a mapping is validated field by field, with MOB_ERR_NETWORK_MAP naming the field', async (t) => {
  const bad: [unknown, RegExp][] = [
    [null, /must be an object/],
    [{ ...MAP, version: 2 }, /version must be 1/],
    [{ version: 1, networks: [] }, /networks must be a non-empty list/],
    [{ ...MAP, extra: 1 }, /unknown field\(s\) extra/],
    [{ version: 1, networks: [{ source: '10.0.0.1/24', target: { mode: 'dhcp' } }] }, /networks\[0\]\.source .* host bits set/],
    [{ version: 1, networks: [{ source: '10.0.0.0/33', target: { mode: 'dhcp' } }] }, /networks\[0\]\.source/],
    [{ version: 1, networks: [{ source: '10.0.0.0/24', target: { mode: 'static' } }] }, /target\.subnet is required/],
    [{ version: 1, networks: [{ source: '10.0.0.0/24', target: { subnet: '192.168.1.0/24', gateway: '192.168.2.1' } }] }, /gateway 192\.168\.2\.1 is outside/],
    [{ version: 1, networks: [{ source: '10.0.0.0/24', target: { subnet: '192.168.1.0/24', dns: ['x'] } }] }, /dns\[0\] must be an IPv4 address/],
    [{ version: 1, networks: [{ source: '10.0.0.0/24', target: { mode: 'bridge' } }] }, /mode must be "static" or "dhcp"/],
    [{ ...MAP, nics: [{ mac: 'nope' }] }, /nics\[0\]\.mac/],
    [{ ...MAP, nics: [{ mac: '52:54:00:00:00:01' }, { mac: '52:54:00:00:00:01' }] }, /lists 52:54:00:00:00:01 twice/],
    [{ ...MAP, nics: [{ mac: '52:54:00:00:00:01', name: 'a name with spaces' }] }, /nics\[0\]\.name/],
  ];
  for (const [j, re] of bad) {
    t.throws(() => parseNetworkMapping(j), { code: 'MOB_ERR_NETWORK_MAP', message: re }, JSON.stringify(j)?.slice(0, 100));
  }
  const m = parseNetworkMapping(MAP);
  t.same(m.networks[1].target, { subnet: null, gateway: null, dns: [], mode: 'dhcp' }, 'defaults filled in');
});

t.test('NICs are resolved from the inventory and the mapping\'s nics', async (t) => {
  const m = parseNetworkMapping(MAP);
  const r = resolveNics(m, INVENTORY);
  t.same(r.nics, [
    { mac: '52:54:00:00:00:01', name: 'eth0', source: '10.0.0.5/24', dhcp: false, address: '192.168.50.5/24', gateway: '192.168.50.1', dns: ['192.168.50.53', '192.168.50.54'] },
    { mac: '52:54:00:00:00:03', name: 'ens5', source: '10.9.4.7/16', dhcp: true, address: null, gateway: null, dns: [] },
  ], 'static by host part, DHCP, a NIC only the mapping knows');
  t.same(r.unmapped, [{ mac: '52:54:00:00:00:02', name: 'eth1', addresses: ['172.16.0.9/24'] }], 'a NIC in no mapped network is left alone');
  const explicit = resolveNics(parseNetworkMapping({ ...MAP, nics: [{ mac: '52:54:00:00:00:01', address: '192.168.50.200' }] }), INVENTORY);
  t.equal(explicit.nics[0].address, '192.168.50.200/24', 'nics[].address wins over the host part');
  t.throws(() => resolveNics(parseNetworkMapping({ ...MAP, nics: [{ mac: '52:54:00:00:00:01', address: '192.168.51.2' }] }), INVENTORY),
    { code: 'MOB_ERR_NETWORK_MAP', message: /outside its target subnet/ });
  const narrow = { version: 1, networks: [{ source: '10.0.0.0/16', target: { subnet: '192.168.50.0/24', mode: 'static' } }] };
  t.throws(() => resolveNics(parseNetworkMapping(narrow), [{ ...INVENTORY[0], cidrs: ['10.0.7.5/16'] }]),
    { code: 'MOB_ERR_NETWORK_MAP', message: /host part of 10\.0\.7\.5 .* give nics\[\]\.address/ });
  t.throws(() => resolveNics(parseNetworkMapping({ version: 1, networks: [{ source: '10.200.0.0/24', target: { mode: 'dhcp' } }] }), INVENTORY),
    { code: 'MOB_ERR_NETWORK_MAP', message: /no NIC of the machine is in a mapped source network .*52:54:00:00:00:01 \(eth0\): 10\.0\.0\.5\/24/ });
  t.throws(() => resolveNics(parseNetworkMapping({ version: 1, networks: [{ source: '10.200.0.0/24', target: { mode: 'dhcp' } }] }), []),
    { code: 'MOB_ERR_NETWORK_MAP', message: /no inventory of NICs: list them under "nics"/ });
  const old = resolveNics(parseNetworkMapping(MAP), [{ name: 'eth0', mac: '52:54:00:00:00:01', ipv4: ['10.0.0.5'], ipv6: [], up: true }]);
  t.equal(old.nics[0].address, '192.168.50.5/24', 'an inventory of an older agent (no prefixes) still maps');
});

t.test('the three formats (golden)', async (t) => {
  const { nics } = resolveNics(parseNetworkMapping(MAP), INVENTORY);
  await golden(t, 'networkd-static.network', renderNetworkd(nics[0]).text);
  await golden(t, 'networkd-dhcp.network', renderNetworkd(nics[1]).text);
  t.equal(renderNetworkd(nics[0]).name, '05-mobility-525400000001.network', 'networkd file sorts before the guest\'s own');
  await golden(t, 'netplan.yaml', renderNetplan(nics));
  const before = 'auto lo eth0\niface lo inet loopback\n\nallow-hotplug ens5\niface ens5 inet dhcp\n    hostname web1\n\niface eth9 inet manual\n\nsource /etc/network/interfaces.d/*\n';
  const after = disableIfupdownStanzas(before, ['eth0', 'ens5']) + '\n' + renderIfupdownBlock(nics);
  await golden(t, 'ifupdown-interfaces', after);
  t.equal(disableIfupdownStanzas(disableIfupdownStanzas(after, ['eth0', 'ens5']) + '\n' + renderIfupdownBlock(nics), ['eth0', 'ens5']) + '\n' + renderIfupdownBlock(nics),
    disableIfupdownStanzas(after, ['eth0', 'ens5']) + '\n' + renderIfupdownBlock(nics), 'applying twice gives what applying once more gives (the old block is replaced)');
  t.throws(() => renderIfupdownBlock([{ ...nics[0], name: null }]), { code: 'MOB_ERR_GUEST_NETWORK', message: /by name.*nics\[\]\.name/ });
});

/** An ext4 filesystem image holding the files given (mke2fs -d: no mount needed to build it). */
function ext4Image(dir: string, name: string, files: Record<string, string>, sizeMb = 16): string {
  const root = path.join(dir, `${name}-root`);
  for (const [p, text] of Object.entries(files)) {
    fs.mkdirSync(path.dirname(path.join(root, p)), { recursive: true });
    if (text.startsWith('->')) fs.symlinkSync(text.slice(2), path.join(root, p));
    else fs.writeFileSync(path.join(root, p), text);
  }
  fs.mkdirSync(path.join(root, 'etc'), { recursive: true });
  const img = path.join(dir, `${name}.fs`);
  sh('mke2fs', ['-q', '-F', '-t', 'ext4', '-d', root, img, `${sizeMb}M`]);
  return img;
}

/** A disk image: an MBR with a small first partition (vfat-less, empty), then the root filesystem as partition 2. */
function partitioned(dir: string, name: string, fsImage: string): string {
  const img = path.join(dir, `${name}.img`);
  const fsBytes = fs.statSync(fsImage).size;
  fs.writeFileSync(img, '');
  fs.truncateSync(img, 4 * 1024 * 1024 + fsBytes + 1024 * 1024);
  sh('sfdisk', ['--quiet', img], `label: dos\nstart=2048, size=4096, type=82\nstart=8192, size=${fsBytes / 512}, type=83\n`);
  sh('dd', [`if=${fsImage}`, `of=${img}`, 'bs=1M', 'seek=4', 'conv=notrunc,sparse', 'status=none']);
  return img;
}

function noResidue(t: Test, image: string, scratch: string): void {
  t.notOk(fs.readFileSync('/proc/mounts', 'utf8').includes(scratch), 'nothing stays mounted');
  t.equal(sh('losetup', ['-j', image]).trim(), '', 'no loop device stays attached to the image');
  t.same(fs.readdirSync(scratch).filter((f) => f.startsWith('mobility-guest-')), [], 'the mount directory is removed');
}

t.test('on real ext4 images: detect the stack, write the mapping, unmount', async (t) => {
  for (const tool of ['mke2fs', 'sfdisk', 'mount', 'losetup']) {
    try { sh('sh', ['-c', `command -v ${tool}`]); } catch { throw new Error(`${tool} is required for this test`); }
  }
  if (process.getuid?.() !== 0) throw new Error('this test needs root (it mounts images)');
  const c = cleanup(t);
  const dir = c.dir('netmap-');
  const scratch = c.dir('netmap-mnt-');
  const map = parseNetworkMapping(MAP);
  const read = (img: string, p: string, offset = 0) => {
    const m = path.join(dir, 'check');
    fs.mkdirSync(m, { recursive: true });
    sh('mount', ['-o', `ro,loop,offset=${offset}`, img, m]);
    try { return fs.readFileSync(path.join(m, p), 'utf8'); } finally { sh('umount', [m]); }
  };
  const ls = (img: string, p: string, offset = 0) => {
    const m = path.join(dir, 'check');
    fs.mkdirSync(m, { recursive: true });
    sh('mount', ['-o', `ro,loop,offset=${offset}`, img, m]);
    try { return fs.readdirSync(path.join(m, p)).sort(); } finally { sh('umount', [m]); }
  };

  await t.test('ifupdown on partition 2 of an MBR disk (swap partition 1 skipped)', async (t) => {
    const fsImg = ext4Image(dir, 'ifupdown', {
      'etc/network/interfaces': 'auto lo eth0\niface lo inet loopback\niface eth0 inet dhcp\nsource /etc/network/interfaces.d/*\n',
      'etc/network/interfaces.d/ens5': 'allow-hotplug ens5\niface ens5 inet static\n    address 10.9.4.7/16\n',
      'etc/resolv.conf': 'nameserver 10.0.0.53\n',
    });
    const img = partitioned(dir, 'ifupdown', fsImg);
    const r = await applyNetworkMapping(img, map, INVENTORY, { scratch });
    t.equal(r.stack, 'ifupdown');
    t.equal(r.partition, 2, 'the root is partition 2');
    t.same(r.files, ['/etc/network/interfaces.d/ens5', '/etc/network/interfaces', '/etc/resolv.conf']);
    const off = 8192 * 512;
    const main = read(img, 'etc/network/interfaces', off);
    t.match(main, /^#mobility# auto lo eth0\nauto lo\n/m, 'eth0 leaves the auto line, lo stays');
    t.match(main, /^#mobility# iface eth0 inet dhcp$/m, 'the guest\'s own eth0 stanza is disabled');
    t.match(main, /iface eth0 inet static\n    address 192\.168\.50\.5\/24\n    gateway 192\.168\.50\.1\n    dns-nameservers 192\.168\.50\.53 192\.168\.50\.54\n/);
    t.match(main, /iface ens5 inet dhcp/);
    t.match(read(img, 'etc/network/interfaces.d/ens5', off), /^#mobility# iface ens5 inet static\n#mobility#     address 10\.9\.4\.7\/16$/m);
    t.equal(read(img, 'etc/resolv.conf', off), '# Written by Mobility\'s network mapping at recovery\nnameserver 192.168.50.53\nnameserver 192.168.50.54\n');
    noResidue(t, img, scratch);
    const again = await applyNetworkMapping(img, map, INVENTORY, { scratch });
    t.equal(again.stack, 'ifupdown');
    t.equal(read(img, 'etc/network/interfaces', off).match(/BEGIN mobility/g)?.length, 1, 'applied twice: one block');
  });

  await t.test('systemd-networkd on a bare filesystem (enabled unit, guest files kept)', async (t) => {
    const img = ext4Image(dir, 'networkd', {
      'etc/systemd/system/multi-user.target.wants/systemd-networkd.service': '->/lib/systemd/system/systemd-networkd.service',
      'etc/systemd/network/50-dhcp.network': '[Match]\nName=e*\n\n[Network]\nDHCP=yes\n',
      'etc/network/interfaces': 'auto lo\niface lo inet loopback\n',
    });
    const r = await applyNetworkMapping(img, map, INVENTORY, { scratch });
    t.equal(r.stack, 'systemd-networkd', 'networkd wins over a leftover interfaces file');
    t.equal(r.partition, null, 'a bare filesystem');
    t.same(ls(img, 'etc/systemd/network'), ['05-mobility-525400000001.network', '05-mobility-525400000003.network', '50-dhcp.network']);
    t.equal(read(img, 'etc/systemd/network/05-mobility-525400000001.network'), await fsp.readFile(path.join(GOLDEN_DIR, 'networkd-static.network'), 'utf8'), 'the golden file, in the image');
    noResidue(t, img, scratch);
  });

  await t.test('netplan: the guest\'s files are set aside, ours is 0600', async (t) => {
    const img = ext4Image(dir, 'netplan', {
      'etc/netplan/50-cloud-init.yaml': 'network:\n  version: 2\n  ethernets:\n    eth0:\n      dhcp4: true\n',
      'etc/systemd/network/10-x.network': '[Match]\nName=x\n',
    });
    const r = await applyNetworkMapping(img, map, INVENTORY, { scratch });
    t.equal(r.stack, 'netplan');
    t.same(ls(img, 'etc/netplan'), ['50-cloud-init.yaml.mobility-disabled', '90-mobility.yaml']);
    t.equal(read(img, 'etc/netplan/90-mobility.yaml'), await fsp.readFile(path.join(GOLDEN_DIR, 'netplan.yaml'), 'utf8'));
    const m = path.join(dir, 'check');
    sh('mount', ['-o', 'ro,loop', img, m]);
    try { t.equal(fs.statSync(path.join(m, 'etc/netplan/90-mobility.yaml')).mode & 0o777, 0o600); } finally { sh('umount', [m]); }
    noResidue(t, img, scratch);
  });

  await t.test('no network stack, no root filesystem, no file: coded errors and nothing left behind', async (t) => {
    const none = ext4Image(dir, 'none', { 'etc/hostname': 'web1\n' });
    await t.rejects(applyNetworkMapping(none, map, INVENTORY, { scratch }), { code: 'MOB_ERR_GUEST_NETWORK', message: /no network stack/ });
    noResidue(t, none, scratch);
    const noEtc = path.join(dir, 'noetc.fs');
    sh('mke2fs', ['-q', '-F', '-t', 'ext4', noEtc, '8M']);
    await t.rejects(applyNetworkMapping(noEtc, map, INVENTORY, { scratch }), { code: 'MOB_ERR_IMAGE_MOUNT', message: /holds no \/etc/ });
    const junk = path.join(dir, 'junk.img');
    fs.writeFileSync(junk, Buffer.alloc(4 * 1024 * 1024, 0x5a));
    await t.rejects(applyNetworkMapping(junk, map, INVENTORY, { scratch }), { code: 'MOB_ERR_IMAGE_MOUNT', message: /no root filesystem found in recovered image .*the whole image:/ });
    noResidue(t, junk, scratch);
    await t.rejects(applyNetworkMapping(path.join(dir, 'missing.img'), map, INVENTORY, { scratch }), { code: 'MOB_ERR_IMAGE_MOUNT', message: /cannot be opened: ENOENT/ });
    // a guest whose configuration directory is a link to the server's own files: refused, host untouched
    const hostDir = path.join(dir, 'host-netplan');
    fs.mkdirSync(hostDir);
    fs.writeFileSync(path.join(hostDir, '01-host.yaml'), 'network: {}\n');
    const evil = ext4Image(dir, 'evil', { 'etc/netplan': `->${hostDir}`, 'etc/network/interfaces': 'auto lo\n' });
    await t.rejects(applyNetworkMapping(evil, map, INVENTORY, { scratch }), { code: 'MOB_ERR_GUEST_NETWORK', message: /\/etc\/netplan .* symbolic link/ });
    t.same(fs.readdirSync(hostDir), ['01-host.yaml'], 'the server\'s files were neither renamed nor written');
    noResidue(t, evil, scratch);
    const unmapped: NetworkMapping = parseNetworkMapping({ version: 1, networks: [{ source: '10.200.0.0/24', target: { mode: 'dhcp' } }] });
    await t.rejects(applyNetworkMapping(none, unmapped, INVENTORY, { scratch }), { code: 'MOB_ERR_NETWORK_MAP' }, 'a mapping that covers nothing fails before mounting');
  });
});
