/**
 * Host mode: the VMs of a KVM host, found through their QMP sockets.
 *
 * A host agent is configured with a glob of QMP unix sockets (agent.json `vmSockets`):
 * `/var/run/qemu-server/*.qmp` on Proxmox; with libvirt a second monitor per domain (libvirt
 * holds its own monitor.sock, and QEMU serves one client per monitor). The glob has `*` inside
 * path segments only, never `**`. Each socket that
 * exists is asked, over its own short QMP connection:
 *
 *   query-name                the VM's name (QEMU -name); when QEMU has no name (or no such
 *                             command: qemu-storage-daemon), the socket file's name without
 *                             its extension (Proxmox: the VM id, 100.qmp -> 100)
 *   query-status              running, paused, ... ('unknown' when QEMU has no such command)
 *   query-block               the guest's drives: device (the -drive id, else the qdev id),
 *                             the node the guest writes (inserted.node-name), file, format,
 *                             virtual size. Removable drives (CD-ROM, floppy) and empty ones are
 *                             skipped: nothing to protect.
 *   query-named-block-nodes   only when query-block lists no drive (qemu-storage-daemon, or
 *                             -blockdev without a guest device): every format node that no
 *                             other node sits on, by node name (its device name is then its
 *                             node name)
 *
 * The VM's guest agent socket is `<socket without extension>.qga` next to the QMP socket when
 * it exists (Proxmox's convention), else none.
 *
 * Contract: discoverVms never rejects for a VM: a socket that is refused, closed, silent or
 * answers nonsense is reported with its error (VmProbe.error), and each socket is bounded by
 * timeoutMs as a whole, so a hung QEMU never hangs the inventory. Sockets are probed in
 * parallel. Read only: nothing is changed in QEMU. QEMU serves one client per monitor socket,
 * so the caller must not probe a socket another connection of ours holds (the host daemon
 * reports a protected VM from its last probe instead).
 */
import fsp from 'node:fs/promises';
import path from 'node:path';
import { MobilityError, toMobilityError } from '../../errors.js';
import { QmpClient } from './qmp.js';

/** How long one socket may take as a whole (connect, greeting, every query). */
export const VM_PROBE_TIMEOUT_MS = 5_000;
/** The most sockets one glob may match (a wrong glob must not open thousands of connections). */
export const MAX_VM_SOCKETS = 512;
/** The longest machine id (ID_PATTERN). */
const MAX_ID = 64;

export interface InventoryVmDisk {
  /** The guest's drive: -drive id (Proxmox: drive-scsi0), else the qdev id (libvirt: virtio-disk0), else the node name. */
  device: string;
  /** The block node the guest writes (what the QEMU tracker follows). */
  node: string;
  /** The image file (or device) behind it. */
  file: string;
  /** Format driver of the node: qcow2, raw, ... */
  format: string;
  sizeBytes: number;
  /** qcow2 keeps dirty bitmaps across a QEMU restart; anything else is tracked in memory only. */
  persistentTracking: boolean;
}

export interface InventoryVm {
  name: string;
  /** The VM's machine id at the configuration server: vmMachineId(host, name). */
  machineId: string;
  qmpSocket: string;
  guestAgentSocket: string | null;
  /** query-status: running, paused, shutdown, ...; 'unknown' when QEMU has no run state; 'unreachable' when the socket failed. */
  status: string;
  disks: InventoryVmDisk[];
  /** Why the socket could not be inspected (code and message); absent when it could. */
  error?: { code: string; message: string };
  /** Set when this entry is the last probe of a VM whose QMP socket the agent holds (a VM under protection): ISO time of that probe. */
  probedAt?: string;
}

/**
 * The machine id of a VM of host `hostId`: `<hostId>.<name>`, the name's characters outside
 * [A-Za-z0-9_-] replaced by `_`, truncated so the whole id is at most 64 characters.
 */
export function vmMachineId(hostId: string, name: string): string {
  const clean = name.replace(/[^A-Za-z0-9_-]/g, '_') || 'vm';
  return `${hostId}.${clean}`.slice(0, MAX_ID);
}

/** A disk id from a drive's device name: characters outside [A-Za-z0-9_-] become `_`, at most 64. */
export function vmDiskId(device: string): string {
  return (device.replace(/[^A-Za-z0-9_-]/g, '_') || 'disk').slice(0, MAX_ID);
}

function segmentRegex(seg: string): RegExp {
  return new RegExp(`^${seg.split('*').map((s) => s.replace(/[.+?^${}()|[\]\\]/g, '\\$&')).join('[^/]*')}$`);
}

/**
 * The unix sockets matching an absolute glob whose only wildcard is `*` (any characters within
 * one path segment, dot files excluded), sorted. Entries that are not sockets are left out.
 * Throws MOB_ERR_CONFIG for a relative pattern or one with `**`; more than MAX_VM_SOCKETS
 * matches is MOB_ERR_CONFIG too.
 */
export async function expandSocketGlob(pattern: string): Promise<string[]> {
  if (!path.isAbsolute(pattern)) throw new MobilityError('MOB_ERR_CONFIG', `vmSockets must be an absolute path glob, not ${JSON.stringify(pattern)}`);
  if (pattern.includes('**')) throw new MobilityError('MOB_ERR_CONFIG', `vmSockets: "**" is not supported (use * within one path segment): ${JSON.stringify(pattern)}`);
  const segs = pattern.split('/').filter((s) => s !== '');
  let paths = ['/'];
  for (const seg of segs) {
    const next: string[] = [];
    if (!seg.includes('*')) {
      for (const p of paths) next.push(path.join(p, seg));
    } else {
      const re = segmentRegex(seg);
      for (const p of paths) {
        const names = await fsp.readdir(p).catch(() => [] as string[]);
        for (const n of names) if (!n.startsWith('.') && re.test(n)) next.push(path.join(p, n));
      }
    }
    paths = next;
    if (paths.length > MAX_VM_SOCKETS) break;
  }
  const sockets: string[] = [];
  for (const p of paths) {
    const st = await fsp.stat(p).catch(() => null);
    if (st?.isSocket()) sockets.push(p);
  }
  if (sockets.length > MAX_VM_SOCKETS) throw new MobilityError('MOB_ERR_CONFIG', `vmSockets ${JSON.stringify(pattern)} matches ${sockets.length} sockets, more than ${MAX_VM_SOCKETS}`);
  return sockets.sort();
}

/** The guest agent socket of a VM: `<qmp socket without extension>.qga` when it exists. */
export async function guestAgentSocketOf(qmpSocket: string): Promise<string | null> {
  const ext = path.extname(qmpSocket);
  const qga = `${ext ? qmpSocket.slice(0, -ext.length) : qmpSocket}.qga`;
  const st = await fsp.stat(qga).catch(() => null);
  return st?.isSocket() ? qga : null;
}

/** The VM name to use when QEMU has none: the socket file's name without its extension. */
export function nameFromSocket(qmpSocket: string): string {
  const base = path.basename(qmpSocket);
  const ext = path.extname(base);
  return (ext ? base.slice(0, -ext.length) : base) || base;
}

const PROTOCOL_DRIVERS = new Set(['file', 'host_device', 'host_cdrom', 'nbd', 'iscsi', 'rbd', 'gluster', 'nfs', 'ssh', 'http', 'https', 'ftp', 'ftps', 'null-co', 'null-aio', 'nvme', 'io_uring', 'vvfat']);
/** Filter drivers: they sit on top of the format node; their child is what we describe. */
const FILTER_DRIVERS = new Set(['throttle', 'copy-on-read', 'preallocate', 'compress', 'blklogwrites', 'blkverify', 'copy-before-write', 'snapshot-access']);

interface BlockInfo {
  device?: string; qdev?: string; removable?: boolean; type?: string;
  inserted?: { 'node-name'?: string; file?: string; drv?: string; image?: { 'virtual-size'?: number; filename?: string; format?: string } };
}
interface NodeInfo { 'node-name'?: string; drv?: string; file?: string; image?: { 'virtual-size'?: number; filename?: string; format?: string; 'backing-image'?: unknown }; backing_file?: string }

/** The device name of a drive: its -drive id, else the qdev id (/machine/peripheral/ID/virtio-backend -> ID). */
function deviceName(b: BlockInfo): string {
  if (b.device) return b.device;
  const q = b.qdev ?? '';
  const m = /\/machine\/peripheral(?:-anon)?\/([^/]+)/.exec(q);
  return m ? m[1] : q.split('/').filter(Boolean)[0] ?? '';
}

function diskOf(device: string, node: string, n: NodeInfo | undefined, fallback: BlockInfo['inserted']): InventoryVmDisk {
  const format = n?.drv ?? fallback?.drv ?? '';
  const size = n?.image?.['virtual-size'] ?? fallback?.image?.['virtual-size'] ?? 0;
  return {
    device: device || node, node, file: n?.file ?? fallback?.file ?? '', format, sizeBytes: typeof size === 'number' ? size : 0,
    persistentTracking: format === 'qcow2',
  };
}

/** The disks of a VM from query-block and query-named-block-nodes. Pure: exported for tests. */
export function vmDisksFrom(blocks: unknown, nodes: unknown): InventoryVmDisk[] {
  const nodeList = (Array.isArray(nodes) ? nodes : []) as NodeInfo[];
  const byName = new Map<string, NodeInfo>();
  for (const n of nodeList) if (typeof n['node-name'] === 'string') byName.set(n['node-name'], n);
  const drives = ((Array.isArray(blocks) ? blocks : []) as BlockInfo[]).filter((b) => b && typeof b === 'object');
  const out: InventoryVmDisk[] = [];
  for (const b of drives) {
    if (!b.inserted || b.removable === true || b.type === 'cdrom') continue;
    const node = b.inserted['node-name'];
    if (typeof node !== 'string' || !node) continue;
    out.push(diskOf(deviceName(b), node, byName.get(node), b.inserted));
  }
  if (drives.length > 0) return out;
  // no guest drive (qemu-storage-daemon, -blockdev only): the top format nodes
  const children = new Set<string>();
  const fileOf = new Map<string, string>();
  for (const n of nodeList) if (n.file) fileOf.set(n['node-name'] ?? '', n.file);
  for (const n of nodeList) {
    const name = n['node-name'] ?? '';
    if (!name || PROTOCOL_DRIVERS.has(n.drv ?? '') || FILTER_DRIVERS.has(n.drv ?? '')) continue;
    // a format node's backing chain is under it (the backing nodes are formats too): the one
    // whose file is another format node's backing file is not a top node
    for (const m of nodeList) if (m !== n && m.backing_file && m.backing_file === n.file && !PROTOCOL_DRIVERS.has(m.drv ?? '')) children.add(name);
  }
  for (const n of nodeList) {
    const name = n['node-name'] ?? '';
    if (!name || name.startsWith('#') || children.has(name) || PROTOCOL_DRIVERS.has(n.drv ?? '') || FILTER_DRIVERS.has(n.drv ?? '')) continue;
    out.push(diskOf(name, name, n, undefined));
  }
  // QEMU lists nodes newest first: by name, so the order does not depend on how they were added
  return out.sort((x, y) => x.node.localeCompare(y.node));
}

/** What one socket answered, with QEMU's own errors for commands it lacks turned into fallbacks. */
async function inspect(qmpSocket: string, hostId: string, timeoutMs: number, abort: AbortSignal): Promise<InventoryVm> {
  const deadline = Date.now() + timeoutMs;
  const left = () => Math.max(1, deadline - Date.now());
  const qmp = await QmpClient.connect(qmpSocket, { timeoutMs: left(), commandTimeoutMs: timeoutMs });
  const onAbort = () => qmp.close();
  abort.addEventListener('abort', onAbort);
  try {
    const optional = async <T>(cmd: string, args?: Record<string, unknown>): Promise<T | null> => {
      try {
        return await qmp.execute<T>(cmd, args, { timeoutMs: left() });
      } catch (err) {
        if ((err as { qmpClass?: string }).qmpClass === 'CommandNotFound') return null;
        throw err;
      }
    };
    const named = await optional<{ name?: string }>('query-name');
    const status = await optional<{ status?: string }>('query-status');
    const blocks = await optional<unknown[]>('query-block');
    const nodes = await optional<unknown[]>('query-named-block-nodes', { flat: true });
    const name = typeof named?.name === 'string' && named.name ? named.name : nameFromSocket(qmpSocket);
    return {
      name, machineId: vmMachineId(hostId, name), qmpSocket, guestAgentSocket: await guestAgentSocketOf(qmpSocket),
      status: typeof status?.status === 'string' ? status.status : 'unknown', disks: vmDisksFrom(blocks, nodes),
    };
  } finally {
    abort.removeEventListener('abort', onAbort);
    qmp.close();
  }
}

/** One socket, bounded by timeoutMs; never rejects. */
export async function probeVm(qmpSocket: string, hostId: string, timeoutMs = VM_PROBE_TIMEOUT_MS): Promise<InventoryVm> {
  const ac = new AbortController();
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise<never>((_, reject) => {
    timer = setTimeout(() => {
      ac.abort();
      reject(new MobilityError('MOB_ERR_QMP', `${qmpSocket} did not answer within ${timeoutMs} ms`, { retryable: true }));
    }, timeoutMs);
  });
  try {
    return await Promise.race([inspect(qmpSocket, hostId, timeoutMs, ac.signal), late]);
  } catch (err) {
    const e = toMobilityError(err);
    const name = nameFromSocket(qmpSocket);
    return {
      name, machineId: vmMachineId(hostId, name), qmpSocket, guestAgentSocket: await guestAgentSocketOf(qmpSocket),
      status: 'unreachable', disks: [], error: { code: e.code, message: e.message },
    };
  } finally {
    clearTimeout(timer);
  }
}

/**
 * Every VM whose QMP socket matches the glob, sorted by socket path. `held` names sockets a
 * connection of ours holds (QEMU serves one client per monitor): they are not probed, and
 * `previous` gives their last entry (with probedAt), else they are reported unreachable.
 */
export async function discoverVms(pattern: string, hostId: string, o: { timeoutMs?: number; held?: ReadonlySet<string>; previous?: ReadonlyMap<string, InventoryVm> } = {}): Promise<InventoryVm[]> {
  const sockets = await expandSocketGlob(pattern);
  return Promise.all(sockets.map(async (s) => {
    if (o.held?.has(s)) {
      const prev = o.previous?.get(s);
      if (prev) return { ...prev, probedAt: prev.probedAt ?? new Date().toISOString() };
      const name = nameFromSocket(s);
      return {
        name, machineId: vmMachineId(hostId, name), qmpSocket: s, guestAgentSocket: await guestAgentSocketOf(s), status: 'unknown', disks: [],
        error: { code: 'MOB_ERR_QMP', message: `${s} is held by the agent's protection of this VM and was never probed before` },
      };
    }
    return probeVm(s, hostId, o.timeoutMs);
  }));
}
