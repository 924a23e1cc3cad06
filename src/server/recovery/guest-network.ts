/**
 * Writing a network mapping into a recovered guest, in the format of the network stack the
 * guest uses, before it boots.
 *
 * Detection, in this order (the first that matches wins, as the guest's own boot would):
 *  - netplan: /etc/netplan holds a *.yaml / *.yml file. Mobility writes
 *    /etc/netplan/90-mobility.yaml (mode 0600) and renames the guest's other netplan files to
 *    NAME.mobility-disabled, since two netplan definitions matching one NIC conflict.
 *  - systemd-networkd: systemd-networkd.service is enabled (a link in an /etc/systemd/system/
 *    *.wants directory) or /etc/systemd/network holds a *.network file. Mobility writes
 *    /etc/systemd/network/05-mobility-MAC.network per NIC, matched by MAC; networkd applies the
 *    first file (in name order) that matches a link, so the guest's own files no longer apply
 *    to the mapped NICs and still apply to the others.
 *  - ifupdown: /etc/network/interfaces exists. ifupdown names interfaces rather than matching
 *    MACs, so every mapped NIC needs the name it had (inventory or nics[].name); the guest's
 *    stanzas for those names (in interfaces and interfaces.d/*) are commented out with a
 *    "#mobility# " prefix and a marked block is appended to /etc/network/interfaces; DNS servers
 *    also go to /etc/resolv.conf unless it is a link (resolvconf, systemd-resolved).
 * Writing twice gives the same result (marked blocks and own files are replaced).
 *
 * The render* functions are pure (golden-file tests); writeGuestNetwork changes a mounted
 * root; applyNetworkMapping mounts an image, writes, unmounts.
 */
import fsp from 'node:fs/promises';
import path from 'node:path';
import { MobilityError } from '../../errors.js';
import type { InventoryNic } from '../../agent/inventory.js';
import { mountGuestRoot } from './guest-image.js';
import { resolveNics, type GuestNicConfig, type NetworkMapping } from './network-mapping.js';

export type NetworkStack = 'netplan' | 'systemd-networkd' | 'ifupdown';

export interface NetworkMappingResult {
  stack: NetworkStack;
  /** The partition the root filesystem is on (null: a bare filesystem). */
  partition: number | null;
  nics: GuestNicConfig[];
  unmapped: { mac: string; name: string | null; addresses: string[] }[];
  /** Files written, renamed or edited in the guest (paths inside the guest). */
  files: string[];
}

const BEGIN = '# BEGIN mobility network mapping';
const END = '# END mobility network mapping';
const DISABLED = '#mobility# ';

async function exists(p: string): Promise<boolean> {
  return fsp.lstat(p).then(() => true, () => false);
}

/**
 * The host path of a directory inside the guest (rel like 'etc/netplan'), with every component
 * checked to be a real directory, never a link: the image's contents are the protected machine's,
 * and a link such as etc/netplan -> /etc must not make the server read or change its own files.
 * Null when a component does not exist; MOB_ERR_GUEST_NETWORK when one is a link or not a directory.
 */
async function guestDir(root: string, rel: string): Promise<string | null> {
  let p = root;
  for (const part of rel.split('/').filter(Boolean)) {
    p = path.join(p, part);
    const st = await fsp.lstat(p).catch(() => null);
    if (!st) return null;
    if (st.isSymbolicLink() || !st.isDirectory()) {
      throw new MobilityError('MOB_ERR_GUEST_NETWORK', `/${rel} in the recovered guest goes through /${path.relative(root, p)}, which is ${st.isSymbolicLink() ? 'a symbolic link' : 'not a directory'}: Mobility does not follow links out of the guest's network configuration`);
    }
  }
  return p;
}

/** The entries of a guest directory (see guestDir), [] when it does not exist. */
async function list(root: string, rel: string): Promise<string[]> {
  const dir = await guestDir(root, rel);
  return dir ? fsp.readdir(dir) : [];
}

/** The network stack of the guest mounted at root (see the file comment); MOB_ERR_GUEST_NETWORK when none is found. */
export async function detectStack(root: string): Promise<NetworkStack> {
  if ((await list(root, 'etc/netplan')).some((f) => /\.ya?ml$/.test(f))) return 'netplan';
  const sysd = path.join(root, 'etc/systemd/system');
  for (const d of await list(root, 'etc/systemd/system')) {
    // a .wants that is a symbolic link (to a directory of the server's, through the mount) is not followed
    if (d.endsWith('.wants') && (await fsp.lstat(path.join(sysd, d)).catch(() => null))?.isDirectory() && await exists(path.join(sysd, d, 'systemd-networkd.service'))) return 'systemd-networkd';
  }
  if ((await list(root, 'etc/systemd/network')).some((f) => f.endsWith('.network'))) return 'systemd-networkd';
  if (await guestDir(root, 'etc/network') && await exists(path.join(root, 'etc/network/interfaces'))) return 'ifupdown';
  throw new MobilityError('MOB_ERR_GUEST_NETWORK', 'the recovered guest has no network stack Mobility can configure: no netplan file in /etc/netplan, '
    + 'no enabled systemd-networkd and no /etc/systemd/network/*.network, no /etc/network/interfaces');
}

const header = (what: string) => `# Written by Mobility's network mapping at recovery (${what}); the guest's own configuration no longer applies to the NICs matched here.\n`;

/** The systemd-networkd file of one NIC: its name in /etc/systemd/network and its text. */
export function renderNetworkd(n: GuestNicConfig): { name: string; text: string } {
  const lines = [header(`source ${n.source}`), '[Match]', `MACAddress=${n.mac}`, '', '[Network]'];
  if (n.dhcp) lines.push('DHCP=ipv4');
  if (n.address) lines.push(`Address=${n.address}`);
  if (n.gateway) lines.push(`Gateway=${n.gateway}`);
  for (const d of n.dns) lines.push(`DNS=${d}`);
  return { name: `05-mobility-${n.mac.replaceAll(':', '')}.network`, text: lines.join('\n') + '\n' };
}

/** The netplan file (/etc/netplan/90-mobility.yaml) of all mapped NICs. */
export function renderNetplan(nics: GuestNicConfig[]): string {
  const q = (s: string) => JSON.stringify(s);
  const out = [header(nics.map((n) => `${n.mac}: source ${n.source}`).join(', ')).trimEnd(), 'network:', '  version: 2', '  ethernets:'];
  nics.forEach((n, i) => {
    out.push(`    mobility${i}:`, '      match:', `        macaddress: ${q(n.mac)}`);
    if (n.name) out.push(`      set-name: ${q(n.name)}`);
    out.push(`      dhcp4: ${n.dhcp ? 'true' : 'false'}`);
    if (n.address) out.push('      addresses:', `        - ${q(n.address)}`);
    if (n.gateway) out.push('      routes:', '        - to: default', `          via: ${q(n.gateway)}`);
    if (n.dns.length) out.push('      nameservers:', '        addresses:', ...n.dns.map((d) => `          - ${q(d)}`));
  });
  return out.join('\n') + '\n';
}

function needName(n: GuestNicConfig): string {
  if (!n.name) throw new MobilityError('MOB_ERR_GUEST_NETWORK', `the guest uses ifupdown, which configures interfaces by name, and the name of NIC ${n.mac} is unknown: give it as nics[].name in the mapping`);
  return n.name;
}

/** The marked block appended to /etc/network/interfaces. */
export function renderIfupdownBlock(nics: GuestNicConfig[]): string {
  const out = [BEGIN];
  for (const n of nics) {
    const name = needName(n);
    out.push(`# ${n.mac}: source ${n.source}`, `auto ${name}`);
    if (n.dhcp) out.push(`iface ${name} inet dhcp`);
    else {
      out.push(`iface ${name} inet static`, `    address ${n.address!}`);
      if (n.gateway) out.push(`    gateway ${n.gateway}`);
      if (n.dns.length) out.push(`    dns-nameservers ${n.dns.join(' ')}`);
    }
  }
  out.push(END);
  return out.join('\n') + '\n';
}

/**
 * An ifupdown file with the stanzas of `names` commented out ("#mobility# ") and a previous
 * Mobility block removed; `auto`/`allow-*` lines naming several interfaces keep the others.
 */
export function disableIfupdownStanzas(text: string, names: string[]): string {
  const out: string[] = [];
  let inBlock = false;
  let inStanza = false;
  const lines = text.replace(/\n$/, '').split('\n');
  for (const line of lines) {
    if (line.startsWith(BEGIN)) { inBlock = true; continue; }
    if (inBlock) { if (line.startsWith(END)) inBlock = false; continue; }
    const f = line.trim().split(/\s+/);
    const kw = f[0] ?? '';
    if (kw === 'iface' || kw === 'mapping') {
      inStanza = names.includes(f[1] ?? '');
      out.push(inStanza ? DISABLED + line : line);
      continue;
    }
    if (kw === 'auto' || kw.startsWith('allow-')) {
      inStanza = false;
      const keep = f.slice(1).filter((n) => !names.includes(n));
      if (keep.length === f.length - 1) out.push(line);
      else {
        out.push(DISABLED + line);
        if (keep.length) out.push(`${kw} ${keep.join(' ')}`);
      }
      continue;
    }
    if (kw === 'source' || kw === 'source-directory') inStanza = false;
    out.push(inStanza && line.trim() !== '' ? DISABLED + line : line);
  }
  while (out.length && out[out.length - 1] === '') out.pop();
  return out.join('\n') + '\n';
}

/** Writes the NICs' configuration into the guest mounted at root; returns the files touched (guest paths). */
export async function writeGuestNetwork(root: string, stack: NetworkStack, nics: GuestNicConfig[]): Promise<string[]> {
  const files: string[] = [];
  const write = async (guestPath: string, text: string, mode = 0o644) => {
    const rel = path.posix.dirname(guestPath).slice(1);
    // existing components must be real directories (guestDir throws on a link); missing ones are made
    let dir = root;
    for (const part of rel.split('/').filter(Boolean)) {
      dir = path.join(dir, part);
      if (!(await guestDir(root, path.relative(root, dir)))) await fsp.mkdir(dir, { mode: 0o755 });
    }
    const p = path.join(dir, path.posix.basename(guestPath));
    await fsp.rm(p, { force: true }); // a link in the guest is replaced, never followed
    await fsp.writeFile(p, text, { mode, flag: 'wx' });
    await fsp.chmod(p, mode);
    files.push(guestPath);
  };
  if (stack === 'systemd-networkd') {
    const dir = 'etc/systemd/network';
    for (const f of await list(root, dir)) {
      if (/^05-mobility-[0-9a-f]{12}\.network$/.test(f)) await fsp.rm(path.join(root, dir, f), { force: true });
    }
    for (const n of nics) {
      const r = renderNetworkd(n);
      await write(`/${dir}/${r.name}`, r.text);
    }
  } else if (stack === 'netplan') {
    const dir = 'etc/netplan';
    for (const f of await list(root, dir)) {
      if (/\.ya?ml$/.test(f) && f !== '90-mobility.yaml') {
        await fsp.rename(path.join(root, dir, f), path.join(root, dir, `${f}.mobility-disabled`));
        files.push(`/${dir}/${f} -> ${f}.mobility-disabled`);
      }
    }
    await write(`/${dir}/90-mobility.yaml`, renderNetplan(nics), 0o600);
  } else {
    const block = renderIfupdownBlock(nics);
    const names = nics.map(needName);
    const main = path.join(root, 'etc/network/interfaces');
    const edit = async (p: string, guestPath: string, append: string) => {
      const st = await fsp.lstat(p).catch(() => null);
      if (!st?.isFile()) return;
      const before = await fsp.readFile(p, 'utf8');
      const after = disableIfupdownStanzas(before, names) + append;
      if (after !== before) await write(guestPath, after, st.mode & 0o7777);
    };
    for (const f of await list(root, 'etc/network/interfaces.d')) {
      await edit(path.join(root, 'etc/network/interfaces.d', f), `/etc/network/interfaces.d/${f}`, '');
    }
    await edit(main, '/etc/network/interfaces', '\n' + block);
    const dns = [...new Set(nics.flatMap((n) => n.dns))];
    const resolv = await fsp.lstat(path.join(root, 'etc/resolv.conf')).catch(() => null);
    if (dns.length && (!resolv || resolv.isFile())) {
      await write('/etc/resolv.conf', `# Written by Mobility's network mapping at recovery\n${dns.map((d) => `nameserver ${d}`).join('\n')}\n`);
    }
  }
  return files;
}

/**
 * Mounts the recovered image, detects its network stack, writes the mapping for the NICs it
 * covers, and unmounts (also on failure). Errors: MOB_ERR_NETWORK_MAP (covers no NIC, an
 * address that does not fit), MOB_ERR_IMAGE_MOUNT, MOB_ERR_GUEST_NETWORK. The image must not be
 * in use (not while it boots).
 */
export async function applyNetworkMapping(image: string, map: NetworkMapping, inventory: InventoryNic[], o: { scratch?: string } = {}): Promise<NetworkMappingResult> {
  const { nics, unmapped } = resolveNics(map, inventory);
  const guest = await mountGuestRoot(image, o);
  try {
    const stack = await detectStack(guest.dir);
    const files = await writeGuestNetwork(guest.dir, stack, nics);
    return { stack, partition: guest.partition, nics, unmapped, files };
  } finally {
    await guest.unmount();
  }
}
