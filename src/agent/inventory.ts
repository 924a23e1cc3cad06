/**
 * The machine inventory an agent reports to the configuration server: machine
 * id, OS, CPU, memory, disks (with partitions and mount points) and network
 * interfaces.
 *
 * Who calls: the agent, at registration and each time it (re)connects; the CLI
 * (`mobility machines`) formats what the server stored with formatMachines.
 * collectInventory only reads (sysfs, /proc, lsblk through systeminformation),
 * so it is safe to call at any time and from several places at once.
 *
 * Cost: about 40-70 ms on a small (2-core) VM. The systeminformation calls that stay
 * (cpu, blockDevices, diskLayout, uuid) run in parallel; diskLayout (which runs
 * smartctl on every disk) is only used for disk models and is cut off after
 * DISK_LAYOUT_TIMEOUT_MS. Two calls are avoided on Linux because they run
 * child processes with execSync, which blocks the event loop (Promise.all
 * cannot overlap them, and heartbeats stall meanwhile):
 *  - si.osInfo() runs `hostname -f`, a DNS lookup when the hostname is not in
 *    /etc/hosts: with an unreachable resolver it blocked 2 s per resolver
 *    timeout. Distro and release come from /etc/os-release instead.
 *  - si.networkInterfaces() runs a shell script per interface (about 30 ms
 *    each, plus nmcli when NetworkManager is installed) and reports only one
 *    IPv4 and one IPv6 address per interface. os.networkInterfaces() plus
 *    /sys/class/net gives every address without a child process.
 */
import fsp from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import si from 'systeminformation';
import { MobilityError } from '../errors.js';

export const MACHINE_ID_FILE = '/etc/machine-id';
/** diskLayout runs smartctl per disk (slow on USB bridges and sleeping disks); past this, models come from lsblk only. */
export const DISK_LAYOUT_TIMEOUT_MS = 5000;

export interface InventoryPartition { name: string; path: string; sizeBytes: number; fsType: string; mount: string }
export interface InventoryDisk {
  name: string; path: string; sizeBytes: number; model: string;
  /** 'disk' or 'loop' (lsblk TYPE). */
  type: string;
  removable: boolean; partitions: InventoryPartition[];
  /** Every mount point on the disk, its partitions and the devices stacked on them (LVM, dm-crypt), shortest first. */
  mounts: string[];
}
export interface InventoryNic {
  name: string; mac: string; ipv4: string[]; ipv6: string[]; up: boolean;
  /** Every address with its prefix length (10.0.0.5/24, fe80::1/64). Absent in inventories of older agents. */
  cidrs?: string[];
  /** Default gateways reached through this NIC (IPv4 from /proc/net/route, IPv6 from /proc/net/ipv6_route). Absent in older inventories. */
  gateways?: string[];
}
export interface Inventory {
  machineId: string; hostname: string;
  os: { platform: string; distro: string; release: string; kernel: string; arch: string };
  cpu: { model: string; cores: number }; memoryBytes: number;
  disks: InventoryDisk[]; nics: InventoryNic[];
  /** DNS servers of the machine (/etc/resolv.conf, or systemd-resolved's upstream list). Absent in older inventories. */
  dns?: string[];
  /** ISO time at which collection started. */
  collectedAt: string;
  collectMs: number;
}

// systemd writes "uninitialized" during first boot: only hex counts as an id.
const HEX_ID = /^[0-9a-f]{8,64}$/;
// the fallback may be a dashed UUID (dbus machine id, or MachineGuid / IOPlatformUUID elsewhere)
const FALLBACK_ID = /^[0-9a-f][0-9a-f-]{6,62}[0-9a-f]$/;

/**
 * The machine id: `file` (default /etc/machine-id) trimmed and lower-cased. When
 * the file is missing, unreadable, empty or not hex, falls back to
 * systeminformation's uuid().os; when that is empty too, throws MOB_ERR_CONFIG.
 */
export async function readMachineId(file: string = MACHINE_ID_FILE): Promise<string> {
  let why: string;
  try {
    const id = (await fsp.readFile(file, 'utf8')).trim().toLowerCase();
    if (HEX_ID.test(id)) return id;
    why = id ? `${file} does not hold a hex machine id` : `${file} is empty`;
  } catch (err) {
    why = `cannot read ${file} (${(err as NodeJS.ErrnoException).code ?? String(err)})`;
  }
  const uuid = await si.uuid().catch(() => null);
  const id = (uuid?.os ?? '').trim().toLowerCase();
  if (FALLBACK_ID.test(id)) return id;
  throw new MobilityError('MOB_ERR_CONFIG', `no machine id: ${why}, and the system reports no OS uuid (run systemd-machine-id-setup)`);
}

/** Collects the inventory of this machine. Rejects only when there is no machine id (MOB_ERR_CONFIG). */
export async function collectInventory(opts: { machineIdFile?: string } = {}): Promise<Inventory> {
  const started = performance.now();
  const collectedAt = new Date().toISOString();
  const [machineId, osInfo, cpu, blocks, layout, nics, dns] = await Promise.all([
    readMachineId(opts.machineIdFile),
    readOsRelease(),
    si.cpu().catch(() => null),
    si.blockDevices().catch(() => []),
    bounded(si.diskLayout(), DISK_LAYOUT_TIMEOUT_MS, []),
    collectNics(),
    readDns(),
  ]);
  const names = blocks.map((b) => b.name);
  const [parents, { mounts, fsTypes }] = await Promise.all([readParents(names), readDeviceMounts(names)]);
  const cpus = os.cpus();
  return {
    machineId,
    hostname: os.hostname(),
    os: {
      platform: process.platform,
      distro: osInfo.distro,
      release: osInfo.release,
      kernel: os.release(),
      arch: os.arch(),
    },
    cpu: {
      model: [cpu?.manufacturer, cpu?.brand].filter(Boolean).join(' ') || cpus[0]?.model.trim() || '',
      cores: cpu?.cores || cpus.length,
    },
    memoryBytes: os.totalmem(),
    disks: disksFrom(blocks, layout, { parents, mounts, fsTypes }),
    nics,
    dns,
    collectedAt,
    collectMs: Math.round(performance.now() - started),
  };
}

/**
 * Distro name and version: /etc/os-release (NAME, VERSION_ID) on Linux, as
 * systeminformation reads them but without its `hostname -f`; si.osInfo() elsewhere.
 */
async function readOsRelease(): Promise<{ distro: string; release: string }> {
  if (process.platform === 'linux') {
    for (const file of ['/etc/os-release', '/usr/lib/os-release']) {
      let text: string;
      try { text = await fsp.readFile(file, 'utf8'); } catch { continue; }
      const v = new Map<string, string>();
      for (const line of text.split('\n')) {
        const m = /^([A-Z0-9_]+)=(.*)$/.exec(line.trim());
        if (m) v.set(m[1], m[2].replace(/^(["'])(.*)\1$/, '$2'));
      }
      return { distro: v.get('NAME') ?? v.get('ID') ?? '', release: v.get('VERSION_ID') ?? '' };
    }
  }
  const info = await si.osInfo().catch(() => null);
  return { distro: info?.distro ?? '', release: info?.release ?? '' };
}

/** The lsblk fields disksFrom reads (a subset of si.Systeminformation.BlockDevicesData). */
export interface BlockRow { name: string; type: string; size: number; fsType: string; mount: string; model: string; removable: boolean }
/** The diskLayout fields disksFrom reads. */
export interface LayoutRow { device: string; name: string }

/**
 * Disks (type 'disk' or 'loop', size > 0: a detached loop device or an empty
 * zram has size 0) with their partitions. `parents` maps a partition to its
 * disk (from sysfs); a partition missing from it is matched by name (sda1,
 * nvme0n1p1, loop3p2). `mounts` maps a device name to the mount points on it
 * and on the devices stacked on it; `fsTypes` to the type it is mounted as,
 * used when lsblk has none (no udev database, as in containers). Pure:
 * exported for tests.
 */
export function disksFrom(
  blocks: BlockRow[], layout: LayoutRow[],
  sys: { parents?: Map<string, string>; mounts?: Map<string, string[]>; fsTypes?: Map<string, string> } = {},
): InventoryDisk[] {
  const diskRows = blocks.filter((b) => (b.type === 'disk' || b.type === 'loop') && b.size > 0);
  const diskNames = diskRows.map((d) => d.name);
  const parts = blocks.filter((b) => b.type === 'part');
  const mountsOf = (b: BlockRow) => [b.mount, ...(sys.mounts?.get(b.name) ?? [])].filter((m) => m !== '');
  return diskRows.map((d) => {
    const mine = parts.filter((p) => (sys.parents?.get(p.name) ?? parentByName(p.name, diskNames)) === d.name);
    const model = layout.find((l) => l.device === `/dev/${d.name}`)?.name.trim() || d.model.trim();
    const partitions = mine.map((p) => ({
      name: p.name, path: `/dev/${p.name}`, sizeBytes: p.size, fsType: p.fsType || (sys.fsTypes?.get(p.name) ?? ''), mount: mountsOf(p)[0] ?? '',
    }));
    const mounts = [...new Set([d, ...mine].flatMap(mountsOf))].sort((a, b) => a.length - b.length || a.localeCompare(b));
    return { name: d.name, path: `/dev/${d.name}`, sizeBytes: d.size, model, type: d.type, removable: d.removable, partitions, mounts };
  });
}

function parentByName(part: string, disks: string[]): string | null {
  let best: string | null = null;
  for (const d of disks) {
    if (part.startsWith(d) && /^p?\d+$/.test(part.slice(d.length)) && (best === null || d.length > best.length)) best = d;
  }
  return best;
}

/** The os.networkInterfaces() fields nicsFrom reads. */
export interface OsAddress { address: string; family: string | number; mac: string; internal: boolean; cidr?: string | null }
/** What /sys/class/net/<name> says: operstate, flags (hex), address, and whether a `device` link exists. */
export interface SysNic { operstate: string; flags: number; address: string; physical: boolean }

/**
 * Network interfaces: those with an address (os.networkInterfaces(), which on
 * Linux lists only interfaces that are up and running) and physical ones
 * without (a NIC with its cable out). Loopback is left out unless it is the
 * only interface. Pure: exported for tests.
 */
export function nicsFrom(addrs: NodeJS.Dict<OsAddress[]>, sys: Map<string, SysNic>, gateways: Map<string, string[]> = new Map()): InventoryNic[] {
  const names = [...new Set([...Object.keys(addrs), ...[...sys].filter(([, s]) => s.physical).map(([n]) => n)])];
  const nics = names.map((name) => {
    const list = addrs[name] ?? [];
    const s = sys.get(name);
    const v4 = list.filter((a) => a.family === 'IPv4' || a.family === 4).map((a) => a.address);
    const v6 = list.filter((a) => a.family === 'IPv6' || a.family === 6).map((a) => a.address);
    // operstate "unknown": drivers that do not report it (lo, tun, some virtual NICs): go by IFF_UP
    const up = s ? s.operstate === 'up' || (s.operstate === 'unknown' && (s.flags & 1) === 1) : list.length > 0;
    return {
      nic: {
        name, mac: list[0]?.mac ?? s?.address ?? '', ipv4: [...new Set(v4)], ipv6: [...new Set(v6)], up,
        cidrs: [...new Set(list.map((a) => a.cidr).filter((c): c is string => typeof c === 'string' && c !== ''))],
        gateways: gateways.get(name) ?? [],
      },
      loopback: name === 'lo' || (list.length > 0 && list.every((a) => a.internal)),
    };
  });
  const outside = nics.filter((n) => !n.loopback);
  return (outside.length > 0 ? outside : nics).map((n) => n.nic);
}

async function collectNics(): Promise<InventoryNic[]> {
  const sys = new Map<string, SysNic>();
  const dir = '/sys/class/net';
  const entries = await fsp.readdir(dir).catch(() => [] as string[]);
  await Promise.all(entries.map(async (name) => {
    const read = (f: string) => fsp.readFile(path.join(dir, name, f), 'utf8').then((s) => s.trim(), () => '');
    const [operstate, flags, address, physical] = await Promise.all([
      read('operstate'), read('flags'), read('address'),
      fsp.access(path.join(dir, name, 'device')).then(() => true, () => false),
    ]);
    sys.set(name, { operstate, flags: Number.parseInt(flags, 16) || 0, address, physical });
  }));
  const [v4, v6] = await Promise.all([
    fsp.readFile('/proc/net/route', 'utf8').catch(() => ''),
    fsp.readFile('/proc/net/ipv6_route', 'utf8').catch(() => ''),
  ]);
  return nicsFrom(os.networkInterfaces(), sys, defaultGateways(v4, v6));
}

/**
 * NIC name -> its default gateways, from the text of /proc/net/route (IPv4: destination and
 * mask 0, the RTF_GATEWAY flag, addresses in host byte order of a little-endian machine) and
 * /proc/net/ipv6_route (destination ::/0 with a next hop). Pure: exported for tests.
 */
export function defaultGateways(route: string, ipv6Route: string): Map<string, string[]> {
  const out = new Map<string, string[]>();
  const add = (nic: string, gw: string) => { const l = out.get(nic) ?? []; if (!l.includes(gw)) l.push(gw); out.set(nic, l); };
  for (const line of route.split('\n').slice(1)) {
    const f = line.trim().split(/\s+/);
    if (f.length < 8) continue;
    const [iface, dest, gw, flags, , , , mask] = f;
    if (dest !== '00000000' || mask !== '00000000' || (Number.parseInt(flags, 16) & 0x2) === 0 || !/^[0-9A-Fa-f]{8}$/.test(gw)) continue;
    const n = Number.parseInt(gw, 16);
    add(iface, [n & 255, (n >>> 8) & 255, (n >>> 16) & 255, n >>> 24].join('.'));
  }
  for (const line of ipv6Route.split('\n')) {
    const f = line.trim().split(/\s+/);
    if (f.length < 10) continue;
    const [dest, plen, , , hop, , , , , iface] = f;
    if (!/^0{32}$/.test(dest) || plen !== '00' || /^0{32}$/.test(hop) || !/^[0-9a-f]{32}$/i.test(hop) || iface === 'lo') continue;
    // the WHATWG URL parser writes an IPv6 address in its canonical compressed form
    add(iface, new URL(`http://[${hop.match(/.{4}/g)!.join(':')}]/`).hostname.slice(1, -1));
  }
  return out;
}

/** systemd-resolved's stub: the upstream servers are in its own file. */
const RESOLVED_STUB = '127.0.0.53';

/** The DNS servers this machine uses: nameserver lines of resolv.conf text. Pure: exported for tests. */
export function nameservers(resolvConf: string): string[] {
  const out: string[] = [];
  for (const line of resolvConf.split('\n')) {
    const m = /^\s*nameserver\s+(\S+)/.exec(line);
    if (m && !out.includes(m[1])) out.push(m[1]);
  }
  return out;
}

async function readDns(): Promise<string[]> {
  const main = nameservers(await fsp.readFile('/etc/resolv.conf', 'utf8').catch(() => ''));
  if (main.length === 1 && main[0] === RESOLVED_STUB) {
    const upstream = nameservers(await fsp.readFile('/run/systemd/resolve/resolv.conf', 'utf8').catch(() => ''));
    if (upstream.length) return upstream;
  }
  return main;
}

/** Partition name -> disk name, from /sys/class/block/<part> (its parent directory is the disk). */
async function readParents(names: string[]): Promise<Map<string, string>> {
  const out = new Map<string, string>();
  await Promise.all(names.map(async (name) => {
    try {
      const dir = `/sys/class/block/${name}`;
      await fsp.access(path.join(dir, 'partition'));
      out.set(name, path.basename(path.dirname(await fsp.realpath(dir))));
    } catch { /* not a partition, or no sysfs: matched by name */ }
  }));
  return out;
}

interface MountLine { dev: string; mount: string; fsType: string; source: string }

/**
 * Device name -> mount points on it or on devices stacked on it (holders:
 * LVM, dm-crypt, md), from /proc/self/mountinfo, matched by major:minor or, for
 * filesystems with an anonymous device number (btrfs), by mount source; and
 * device name -> the filesystem type it is itself mounted as.
 */
async function readDeviceMounts(names: string[]): Promise<{ mounts: Map<string, string[]>; fsTypes: Map<string, string> }> {
  const byDev = new Map<string, MountLine[]>();
  const bySource = new Map<string, MountLine[]>();
  const add = (m: Map<string, MountLine[]>, k: string, v: MountLine) => { const l = m.get(k); if (l) l.push(v); else m.set(k, [v]); };
  const mounts = new Map<string, string[]>();
  const fsTypes = new Map<string, string>();
  let info = '';
  try { info = await fsp.readFile('/proc/self/mountinfo', 'utf8'); } catch { return { mounts, fsTypes }; }
  const sources = new Set<string>();
  const lines: MountLine[] = [];
  for (const line of info.split('\n')) {
    const f = line.split(' ');
    const sep = f.indexOf('-', 6);
    if (sep < 0 || f.length < sep + 3) continue;
    const mount = unescapeMount(f[4]);
    const source = unescapeMount(f[sep + 2]);
    lines.push({ dev: f[2], mount, fsType: f[sep + 1], source });
    if (source.startsWith('/dev/')) sources.add(source);
  }
  const kname = new Map<string, string>();
  await Promise.all([...sources].map(async (s) => {
    try { kname.set(s, path.basename(await fsp.realpath(s))); } catch { /* gone */ }
  }));
  for (const l of lines) {
    add(byDev, l.dev, l);
    const k = kname.get(l.source);
    if (k) add(bySource, k, l);
  }

  const sysRead = (name: string, f: string) => fsp.readFile(`/sys/class/block/${name}/${f}`, 'utf8').then((s) => s.trim(), () => '');
  const holders = (name: string) => fsp.readdir(`/sys/class/block/${name}/holders`).catch(() => [] as string[]);
  async function mountsOf(name: string, seen: Set<string>): Promise<string[]> {
    if (seen.has(name)) return [];
    seen.add(name);
    const dev = await sysRead(name, 'dev');
    const own = [...(dev ? byDev.get(dev) ?? [] : []), ...(bySource.get(name) ?? [])];
    if (own.length > 0 && seen.size === 1) fsTypes.set(name, own[0].fsType);
    const above = await Promise.all((await holders(name)).map((h) => mountsOf(h, seen)));
    return [...own.map((l) => l.mount), ...above.flat()];
  }
  await Promise.all(names.map(async (n) => {
    const m = [...new Set(await mountsOf(n, new Set()))];
    if (m.length > 0) mounts.set(n, m);
  }));
  return { mounts, fsTypes };
}

function unescapeMount(s: string): string {
  return s.replace(/\\(\d{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8)));
}

/** p, or `fallback` if p rejects or has not settled after ms (p keeps running; its result is dropped). */
function bounded<T>(p: Promise<T>, ms: number, fallback: T): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise<T>((resolve) => {
    timer = setTimeout(() => resolve(fallback), ms);
    timer.unref();
  });
  return Promise.race([p.catch(() => fallback), late]).finally(() => clearTimeout(timer));
}

const GiB = 1024 ** 3;
const gib = (n: number) => `${(n / GiB).toFixed(1)} GiB`;

export interface MachineRow {
  agentId: string; hostname: string; connected: boolean; lastSeen: string | null;
  inventory: Inventory | null;
  /** Replication policy name; a POLICY column appears when any row has this field. */
  policy?: string | null;
  /** Number of protected (enabled) disks; a PROTECTED column appears when any row has this field. */
  disks?: number;
}

/**
 * A fixed-width table, header line first, one line per row, each line ending in "\n":
 * AGENT HOSTNAME STATE OS KERNEL CPU MEM DISKS IPS [POLICY] [PROTECTED] LAST SEEN.
 * Inventory columns show "-" for a row without inventory. The inventory is JSON
 * an agent sent, so fields it lacks show "-" rather than throwing.
 */
export function formatMachines(rows: MachineRow[]): string {
  const withPolicy = rows.some((r) => r.policy !== undefined);
  const withProtected = rows.some((r) => r.disks !== undefined);
  const header = ['AGENT', 'HOSTNAME', 'STATE', 'OS', 'KERNEL', 'CPU', 'MEM', 'DISKS', 'IPS',
    ...(withPolicy ? ['POLICY'] : []), ...(withProtected ? ['PROTECTED'] : []), 'LAST SEEN'];
  const table = rows.map((r) => {
    const inv = r.inventory;
    const disks = Array.isArray(inv?.disks) ? inv.disks : null;
    const nics = Array.isArray(inv?.nics) ? inv.nics : null;
    const ips = nics?.flatMap((n) => n.ipv4 ?? []).filter((ip) => !ip.startsWith('127.')).slice(0, 2) ?? [];
    const osName = [inv?.os?.distro, inv?.os?.release].filter(Boolean).join(' ');
    return [
      r.agentId,
      r.hostname || '-',
      r.connected ? 'connected' : 'offline',
      osName || '-',
      inv?.os?.kernel || '-',
      typeof inv?.cpu?.cores === 'number' ? String(inv.cpu.cores) : '-',
      typeof inv?.memoryBytes === 'number' ? gib(inv.memoryBytes) : '-',
      disks ? `${disks.length} / ${gib(disks.reduce((s, d) => s + (d.sizeBytes || 0), 0))}` : '-',
      ips.length > 0 ? ips.join(',') : '-',
      ...(withPolicy ? [r.policy ?? '-'] : []),
      ...(withProtected ? [r.disks === undefined ? '-' : String(r.disks)] : []),
      r.lastSeen ?? '-',
    ];
  });
  const all = [header, ...table];
  const widths = header.map((_, i) => Math.max(...all.map((cells) => cells[i].length)));
  return all.map((cells) => cells.map((c, i) => (i === cells.length - 1 ? c : c.padEnd(widths[i]))).join('  ') + '\n').join('');
}
