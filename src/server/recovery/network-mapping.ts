/**
 * Network mapping: which network a recovered machine's NICs join at failover. A mapping
 * (JSON, version 1) lists source networks and the target network each maps to:
 *
 *   {
 *     "version": 1,
 *     "networks": [
 *       { "source": "10.0.0.0/24",
 *         "target": { "subnet": "192.168.50.0/24", "gateway": "192.168.50.1", "dns": ["192.168.50.53"], "mode": "static" } },
 *       { "source": "10.1.0.0/16", "target": { "mode": "dhcp" } }
 *     ],
 *     "nics": [ { "mac": "52:54:00:12:34:56", "name": "eth0", "source": "10.0.0.5/24", "address": "192.168.50.20" } ]
 *   }
 *
 * The NICs come from the machine's inventory (MAC, name, addresses with prefix) and from
 * `nics` (which adds a NIC the inventory lacks, such as a machine protected without
 * registration, or overrides its name, source address or target address). A NIC joins the
 * first network whose source subnet holds one of its IPv4 addresses. With mode "static" its
 * address in the target subnet is `address` when given, else the same host part as in the
 * source subnet (10.0.0.5 in 10.0.0.0/24 -> 192.168.50.5 in 192.168.50.0/24); with "dhcp" it
 * asks for one. Gateway and DNS come from the target network. NICs in no mapped network are
 * left as the guest has them. IPv4 only.
 *
 * Pure: parseNetworkMapping validates what an operator gave (MOB_ERR_NETWORK_MAP, with the
 * field), resolveNics computes the configuration of each NIC. Writing it into an image is
 * applyNetworkMapping (guest-network.ts formats, guest-image.ts mounts).
 */
import { MobilityError } from '../../errors.js';
import type { InventoryNic } from '../../agent/inventory.js';

export interface TargetNetwork {
  /** Required for static; with dhcp the guest learns it. */
  subnet: string | null;
  gateway: string | null;
  dns: string[];
  mode: 'static' | 'dhcp';
}
export interface NetworkRule { source: string; target: TargetNetwork }
export interface NicOverride { mac: string; name: string | null; source: string | null; address: string | null }
export interface NetworkMapping { version: 1; networks: NetworkRule[]; nics: NicOverride[] }

/** The configuration one NIC of the recovered guest gets. */
export interface GuestNicConfig {
  mac: string;
  /** The interface name the source machine had (ifupdown needs it), or null when unknown. */
  name: string | null;
  /** The source address (with prefix) that chose the network. */
  source: string;
  dhcp: boolean;
  /** Static address with prefix (192.168.50.5/24), null with dhcp. */
  address: string | null;
  gateway: string | null;
  dns: string[];
}

/** Most NICs a mapping may list (a machine with more is not a DR target we know). */
const MAX_ENTRIES = 64;

const MAC = /^[0-9a-f]{2}(:[0-9a-f]{2}){5}$/;

function fail(msg: string): never {
  throw new MobilityError('MOB_ERR_NETWORK_MAP', `network mapping: ${msg}`);
}

/** An IPv4 address as a 32-bit number, or null. */
export function ipv4ToInt(s: string): number | null {
  const m = /^(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})$/.exec(s);
  if (!m) return null;
  const o = m.slice(1).map(Number);
  if (o.some((x) => x > 255) || m.slice(1).some((x) => x.length > 1 && x.startsWith('0'))) return null;
  return ((o[0] << 24) | (o[1] << 16) | (o[2] << 8) | o[3]) >>> 0;
}

export function intToIpv4(n: number): string {
  return [n >>> 24, (n >>> 16) & 255, (n >>> 8) & 255, n & 255].join('.');
}

/** "a.b.c.d/len" as { addr, prefix }, or null. */
export function parseCidr(s: string): { addr: number; prefix: number } | null {
  const m = /^([^/]+)\/(\d{1,2})$/.exec(s);
  if (!m) return null;
  const addr = ipv4ToInt(m[1]);
  const prefix = Number(m[2]);
  if (addr === null || prefix > 32) return null;
  return { addr, prefix };
}

const maskOf = (prefix: number) => (prefix === 0 ? 0 : (0xffffffff << (32 - prefix)) >>> 0);

function subnetField(v: unknown, where: string): string {
  if (typeof v !== 'string') fail(`${where} must be a subnet such as "10.0.0.0/24", got ${JSON.stringify(v)}`);
  const c = parseCidr(v.trim());
  if (!c || c.prefix === 0 || c.prefix > 30) fail(`${where} ${JSON.stringify(v)} is not an IPv4 subnet with a prefix from /1 to /30`);
  if ((c.addr & ~maskOf(c.prefix)) >>> 0 !== 0) fail(`${where} ${JSON.stringify(v)} has host bits set (the subnet is ${intToIpv4((c.addr & maskOf(c.prefix)) >>> 0)}/${c.prefix})`);
  return `${intToIpv4(c.addr)}/${c.prefix}`;
}

function addressField(v: unknown, where: string): string {
  if (typeof v !== 'string' || ipv4ToInt(v.trim()) === null) fail(`${where} must be an IPv4 address, got ${JSON.stringify(v)}`);
  return v.trim();
}

function optional<T>(o: Record<string, unknown>, k: string, f: (v: unknown) => T): T | null {
  return o[k] === undefined || o[k] === null ? null : f(o[k]);
}

function objectAt(v: unknown, where: string): Record<string, unknown> {
  if (typeof v !== 'object' || v === null || Array.isArray(v)) fail(`${where} must be an object`);
  return v as Record<string, unknown>;
}

function onlyKeys(o: Record<string, unknown>, keys: string[], where: string): void {
  const extra = Object.keys(o).filter((k) => !keys.includes(k));
  if (extra.length) fail(`${where} has unknown field(s) ${extra.join(', ')} (known: ${keys.join(', ')})`);
}

/** Validates a mapping as an operator wrote it (parsed JSON). MOB_ERR_NETWORK_MAP names the first bad field. */
export function parseNetworkMapping(json: unknown): NetworkMapping {
  const o = objectAt(json, 'the mapping');
  onlyKeys(o, ['version', 'networks', 'nics'], 'the mapping');
  if (o.version !== 1) fail(`version must be 1, got ${JSON.stringify(o.version)}`);
  if (!Array.isArray(o.networks) || o.networks.length === 0) fail('networks must be a non-empty list');
  if (o.networks.length > MAX_ENTRIES) fail(`at most ${MAX_ENTRIES} networks`);
  const networks = o.networks.map((n: unknown, i: number): NetworkRule => {
    const w = `networks[${i}]`;
    const r = objectAt(n, w);
    onlyKeys(r, ['source', 'target'], w);
    const source = subnetField(r.source, `${w}.source`);
    const t = objectAt(r.target, `${w}.target`);
    onlyKeys(t, ['subnet', 'gateway', 'dns', 'mode'], `${w}.target`);
    const mode = t.mode ?? 'static';
    if (mode !== 'static' && mode !== 'dhcp') fail(`${w}.target.mode must be "static" or "dhcp", got ${JSON.stringify(t.mode)}`);
    const subnet = optional(t, 'subnet', (v) => subnetField(v, `${w}.target.subnet`));
    if (mode === 'static' && subnet === null) fail(`${w}.target.subnet is required with mode "static"`);
    const gateway = optional(t, 'gateway', (v) => addressField(v, `${w}.target.gateway`));
    if (gateway !== null && subnet !== null && !contains(subnet, gateway)) fail(`${w}.target.gateway ${gateway} is outside ${subnet}`);
    const dns = optional(t, 'dns', (v) => {
      if (!Array.isArray(v) || v.length > 8) fail(`${w}.target.dns must be a list of at most 8 IPv4 addresses`);
      return v.map((d: unknown, j: number) => addressField(d, `${w}.target.dns[${j}]`));
    }) ?? [];
    return { source, target: { subnet, gateway, dns, mode } };
  });
  const rawNics = o.nics ?? [];
  if (!Array.isArray(rawNics) || rawNics.length > MAX_ENTRIES) fail(`nics must be a list of at most ${MAX_ENTRIES} entries`);
  const nics = rawNics.map((n: unknown, i: number): NicOverride => {
    const w = `nics[${i}]`;
    const r = objectAt(n, w);
    onlyKeys(r, ['mac', 'name', 'source', 'address'], w);
    if (typeof r.mac !== 'string' || !MAC.test(r.mac.trim().toLowerCase())) fail(`${w}.mac must be a MAC address such as 52:54:00:12:34:56, got ${JSON.stringify(r.mac)}`);
    const name = optional(r, 'name', (v) => {
      if (typeof v !== 'string' || !/^[A-Za-z0-9._-]{1,15}$/.test(v)) fail(`${w}.name must be an interface name ([A-Za-z0-9._-], at most 15 characters), got ${JSON.stringify(v)}`);
      return v;
    });
    const source = optional(r, 'source', (v) => {
      if (typeof v !== 'string' || !parseCidr(v.trim())) fail(`${w}.source must be an IPv4 address with its prefix (10.0.0.5/24), got ${JSON.stringify(v)}`);
      return v.trim();
    });
    return { mac: r.mac.trim().toLowerCase(), name, source, address: optional(r, 'address', (v) => addressField(v, `${w}.address`)) };
  });
  const macs = new Set<string>();
  for (const n of nics) {
    if (macs.has(n.mac)) fail(`nics lists ${n.mac} twice`);
    macs.add(n.mac);
  }
  return { version: 1, networks, nics };
}

/** Whether the subnet (a.b.c.d/len) holds the address. */
export function contains(subnet: string, address: string): boolean {
  const c = parseCidr(subnet);
  const a = ipv4ToInt(address);
  if (!c || a === null) return false;
  const mask = maskOf(c.prefix);
  return ((a & mask) >>> 0) === ((c.addr & mask) >>> 0);
}

/** The same host part in the target subnet; MOB_ERR_NETWORK_MAP when it does not fit or lands on the network or broadcast address. */
function translate(address: string, from: string, to: string, mac: string): string {
  const a = ipv4ToInt(address)!;
  const f = parseCidr(from)!;
  const t = parseCidr(to)!;
  const host = (a & ~maskOf(f.prefix)) >>> 0;
  const tHostMask = (~maskOf(t.prefix)) >>> 0;
  if (host > tHostMask || host === 0 || host === tHostMask) {
    fail(`the host part of ${address} (in ${from}) does not make an address in ${to} for NIC ${mac}: give nics[].address for it`);
  }
  return intToIpv4((t.addr | host) >>> 0);
}

/**
 * The configuration of every NIC the mapping covers, in MAC order, and the NICs it leaves
 * alone (no MAC, or no IPv4 address in a mapped network). MOB_ERR_NETWORK_MAP when it covers none,
 * or a static address does not fit its target subnet.
 */
export function resolveNics(map: NetworkMapping, inventory: InventoryNic[]): { nics: GuestNicConfig[]; unmapped: { mac: string; name: string | null; addresses: string[] }[] } {
  const byMac = new Map<string, { name: string | null; sources: string[] }>();
  for (const n of inventory) {
    const mac = (n.mac ?? '').toLowerCase();
    if (!MAC.test(mac) || mac === '00:00:00:00:00:00') continue;
    // addresses with their prefix where the inventory has them (older agents: bare addresses)
    const cidrs = (n.cidrs ?? []).filter((c) => parseCidr(c));
    const sources = cidrs.length ? cidrs : (n.ipv4 ?? []).filter((a) => ipv4ToInt(a) !== null).map((a) => `${a}/32`);
    byMac.set(mac, { name: n.name || null, sources });
  }
  for (const o of map.nics) {
    const have = byMac.get(o.mac);
    byMac.set(o.mac, { name: o.name ?? have?.name ?? null, sources: o.source ? [o.source] : have?.sources ?? [] });
  }
  const nics: GuestNicConfig[] = [];
  const unmapped: { mac: string; name: string | null; addresses: string[] }[] = [];
  for (const mac of [...byMac.keys()].sort()) {
    const n = byMac.get(mac)!;
    const override = map.nics.find((o) => o.mac === mac);
    let chosen: { rule: NetworkRule; source: string } | null = null;
    for (const rule of map.networks) {
      const src = n.sources.find((s) => contains(rule.source, s.split('/')[0]));
      if (src) { chosen = { rule, source: src }; break; }
    }
    if (!chosen) { unmapped.push({ mac, name: n.name, addresses: n.sources }); continue; }
    const t = chosen.rule.target;
    let address: string | null = null;
    if (t.mode === 'static') {
      const subnet = t.subnet!;
      const prefix = subnet.split('/')[1];
      const ip = override?.address ?? translate(chosen.source.split('/')[0], chosen.rule.source, subnet, mac);
      if (!contains(subnet, ip)) fail(`nics[].address ${ip} of ${mac} is outside its target subnet ${subnet}`);
      address = `${ip}/${prefix}`;
    }
    nics.push({ mac, name: n.name, source: chosen.source, dhcp: t.mode === 'dhcp', address, gateway: t.gateway, dns: t.dns });
  }
  if (!nics.length) {
    const seen = [...byMac].map(([mac, n]) => `${mac}${n.name ? ` (${n.name})` : ''}: ${n.sources.join(', ') || 'no IPv4 address'}`);
    fail(`no NIC of the machine is in a mapped source network (${seen.length ? `its NICs: ${seen.join('; ')}` : 'the machine has no inventory of NICs: list them under "nics"'})`);
  }
  return { nics, unmapped };
}
