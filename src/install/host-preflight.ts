/**
 * Preflight of host mode (QEMU): can this host protect these disks of a running QEMU process
 * with the QEMU change tracker (src/source/tracker/qemu.ts)? Each check gives a PreflightCheck
 * with a code and a fix, as the in-guest preflight does (src/install/preflight.ts):
 *
 *   qmp             the QMP socket answers (a monitor of its own: QEMU serves one client per socket)
 *   qemu-version    QEMU 6.0 or later (FUSE exports, persistent bitmaps, bitmap merge)
 *   fuse            QEMU was built with FUSE exports and /dev/fuse exists (how the agent reads data)
 *   nbdinfo         libnbd's nbdinfo runs (how the tracker reads dirty bitmaps)
 *   node:<name>     the block node exists, is a format node (qcow2: bitmaps survive a QEMU restart;
 *                   raw: tracked in memory only, a QEMU restart costs a checksum resync, said so),
 *                   is writable by the guest, and takes a dirty bitmap (a temporary one, added and
 *                   removed again)
 *   point-space     the run directory, where point-in-time views keep the old data the guest
 *                   overwrites while a point is read, has room (--min-free, default 1 GiB)
 *   guest-agent     (with a guest agent socket, for app-consistent points) the VM's QEMU guest
 *                   agent answers guest-ping within the bound
 *   guest-fsfreeze  and its guest-info lists guest-fsfreeze-freeze (or -freeze-list), -thaw and
 *                   -status as enabled (a guest configuration may block them)
 *
 * Never throws for a failing check. Side effects: one temporary dirty bitmap per node
 * (`mobility-preflight-<pid>`, non-persistent), removed before the check ends.
 */
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { promisify } from 'node:util';
import { GiB } from '../constants.js';
import { QmpClient } from '../source/qemu/qmp.js';
import { GuestAgentClient } from '../source/qemu/guest-agent.js';
import type { PreflightCheck } from './preflight.js';
import type { ErrorCode } from '../errors.js';

export interface HostPreflightOptions {
  qmpSocket: string;
  /** Node names of the disks' format nodes (query-named-block-nodes lists them). */
  nodes: string[];
  /** Where point-in-time views keep their temporary images (default: the QMP socket's directory). */
  runDir?: string;
  minFreeBytes?: number;
  timeoutMs?: number;
  /** The host side of the VM's guest agent channel: checked when given (app-consistent points). */
  guestAgentSocket?: string;
}

export const HOST_PREFLIGHT_DEFAULTS = { minFreeBytes: 1 * GiB, timeoutMs: 5_000, minQemu: [6, 0] as const };

interface NodeInfo { 'node-name': string; drv: string; ro: boolean; image?: { 'virtual-size'?: number } }

function check(id: string, started: number, ok: true, message: string): PreflightCheck;
function check(id: string, started: number, ok: false, message: string, code: ErrorCode, fix: string): PreflightCheck;
function check(id: string, started: number, ok: boolean, message: string, code?: ErrorCode, fix?: string): PreflightCheck {
  const ms = Math.round((performance.now() - started) * 10) / 10;
  return ok ? { id, ok, message, ms } : { id, ok, code, message, fix, ms };
}

export async function runHostPreflight(o: HostPreflightOptions): Promise<PreflightCheck[]> {
  const timeoutMs = o.timeoutMs ?? HOST_PREFLIGHT_DEFAULTS.timeoutMs;
  const out: PreflightCheck[] = [];
  let t = performance.now();
  let qmp: QmpClient;
  try {
    qmp = await QmpClient.connect(o.qmpSocket, { timeoutMs, commandTimeoutMs: timeoutMs });
    out.push(check('qmp', t, true, `QMP answers on ${o.qmpSocket}`));
  } catch (err) {
    out.push(check('qmp', t, false, `QMP on ${o.qmpSocket}: ${(err as Error).message}`, 'MOB_ERR_PRE_QEMU',
      'start QEMU with a QMP monitor of its own for the agent (-chardev socket,path=SOCK,server=on,wait=off,id=mob -mon chardev=mob,mode=control); a monitor serves one client at a time'));
    out.push(await checkNbdinfo(timeoutMs));
    if (o.guestAgentSocket !== undefined) out.push(...await checkGuestAgent(o.guestAgentSocket, timeoutMs));
    return out;
  }
  try {
    t = performance.now();
    try {
      const v = await qmp.execute<{ qemu: { major: number; minor: number; micro: number }; package?: string }>('query-version');
      const [maj, min] = HOST_PREFLIGHT_DEFAULTS.minQemu;
      const ver = `${v.qemu.major}.${v.qemu.minor}.${v.qemu.micro}`;
      out.push(v.qemu.major > maj || (v.qemu.major === maj && v.qemu.minor >= min)
        ? check('qemu-version', t, true, `QEMU ${ver}`)
        : check('qemu-version', t, false, `QEMU ${ver} is older than ${maj}.${min}`, 'MOB_ERR_PRE_QEMU', `upgrade QEMU to ${maj}.${min} or later (FUSE exports, persistent dirty bitmaps)`));
    } catch (err) {
      out.push(check('qemu-version', t, false, `query-version: ${(err as Error).message}`, 'MOB_ERR_PRE_QEMU', 'check that the socket is a QMP monitor of QEMU'));
    }

    t = performance.now();
    try {
      const schema = await qmp.execute<{ name: string; 'meta-type': string; values?: string[]; members?: { name: string }[] }[]>('query-qmp-schema');
      // the enum of export types (its name is mangled in the schema): lists nbd, unlike the
      // driver enum also lists nbd but with the image formats
      const valuesOf = (e: { values?: string[]; members?: { name: string }[] }) => e.values ?? e.members?.map((m) => m.name) ?? [];
      const exportEnums = schema.filter((e) => e['meta-type'] === 'enum' && valuesOf(e).includes('nbd') && !valuesOf(e).includes('qcow2') && !valuesOf(e).includes('raw'));
      const values = exportEnums.flatMap(valuesOf);
      const devFuse = fs.existsSync('/dev/fuse');
      if (!values.includes('fuse')) out.push(check('fuse', t, false, 'this QEMU has no FUSE export type', 'MOB_ERR_PRE_QEMU', 'use a QEMU built with FUSE export support (Debian\'s qemu-system packages are)'));
      else if (!devFuse) out.push(check('fuse', t, false, '/dev/fuse does not exist', 'MOB_ERR_PRE_QEMU', 'load the fuse module (modprobe fuse) or give the container /dev/fuse'));
      else out.push(check('fuse', t, true, 'FUSE exports available, /dev/fuse present'));
    } catch (err) {
      out.push(check('fuse', t, false, `query-qmp-schema: ${(err as Error).message}`, 'MOB_ERR_PRE_QEMU', 'check that the socket is a QMP monitor of QEMU'));
    }

    out.push(await checkNbdinfo(timeoutMs));

    let nodes: NodeInfo[] = [];
    t = performance.now();
    try {
      nodes = await qmp.execute<NodeInfo[]>('query-named-block-nodes');
    } catch (err) {
      for (const n of o.nodes) out.push(check(`node:${n}`, t, false, `query-named-block-nodes: ${(err as Error).message}`, 'MOB_ERR_PRE_QEMU', 'check that the socket is a QMP monitor of QEMU'));
      nodes = [];
    }
    for (const name of nodes.length ? o.nodes : []) {
      t = performance.now();
      const n = nodes.find((x) => x['node-name'] === name);
      const known = nodes.filter((x) => x.drv !== 'file' && x.drv !== 'host_device').map((x) => x['node-name']).sort().join(', ');
      if (!n) {
        out.push(check(`node:${name}`, t, false, `QEMU has no block node '${name}'`, 'MOB_ERR_PRE_QEMU', `name a format node (${known || 'none listed'})`));
        continue;
      }
      if (n.drv === 'file' || n.drv === 'host_device' || n.drv === 'host_cdrom') {
        out.push(check(`node:${name}`, t, false, `'${name}' is a protocol node (${n.drv}), not the disk's format node`, 'MOB_ERR_PRE_QEMU', `name the format node above it (${known || 'none listed'})`));
        continue;
      }
      if (n.ro) {
        out.push(check(`node:${name}`, t, false, `'${name}' is read-only: there is nothing to track`, 'MOB_ERR_PRE_QEMU', 'protect the disks the guest writes to'));
        continue;
      }
      const probe = `mobility-preflight-${process.pid}`;
      try {
        await qmp.execute('block-dirty-bitmap-add', { node: name, name: probe, persistent: false });
        await qmp.execute('block-dirty-bitmap-remove', { node: name, name: probe }).catch(() => undefined);
      } catch (err) {
        out.push(check(`node:${name}`, t, false, `'${name}' refuses a dirty bitmap: ${(err as Error).message}`, 'MOB_ERR_PRE_QEMU', 'use a qcow2 or raw format node that is not in use by another bitmap job'));
        continue;
      }
      const size = n.image?.['virtual-size'];
      const sized = size ? `, ${size} bytes` : '';
      out.push(n.drv === 'qcow2'
        ? check(`node:${name}`, t, true, `${name}: qcow2${sized}; persistent dirty bitmaps (tracking survives a QEMU restart)`)
        : check(`node:${name}`, t, true, `${name}: ${n.drv}${sized}; dirty bitmaps in memory only: a QEMU restart costs a checksum resync (convert to qcow2 to keep tracking across restarts)`));
    }
  } finally {
    qmp.close();
  }

  t = performance.now();
  const runDir = o.runDir ?? path.dirname(o.qmpSocket);
  const min = o.minFreeBytes ?? HOST_PREFLIGHT_DEFAULTS.minFreeBytes;
  try {
    const st = await fsp.statfs(runDir);
    const free = st.bavail * st.bsize;
    out.push(free >= min
      ? check('point-space', t, true, `${fmt(free)} free in ${runDir} for point-in-time views`)
      : check('point-space', t, false, `${fmt(free)} free in ${runDir}, below ${fmt(min)}`, 'MOB_ERR_PRE_LOW_DISK',
        `free space in ${runDir} or name another run directory: a point-in-time view keeps there the old data the guest overwrites while the point is read`));
  } catch (err) {
    out.push(check('point-space', t, false, `${runDir}: ${(err as Error).message}`, 'MOB_ERR_PRE_LOW_DISK', 'name an existing run directory'));
  }
  if (o.guestAgentSocket !== undefined) out.push(...await checkGuestAgent(o.guestAgentSocket, timeoutMs));
  return out;
}

const GUEST_AGENT_FIX = 'install and start the QEMU guest agent in the guest (Debian/Ubuntu: apt-get install qemu-guest-agent; systemctl enable --now qemu-guest-agent) and enable the VM\'s agent channel (Proxmox: qm set VMID --agent enabled=1, then stop and start the VM; libvirt: a unix channel with target org.qemu.guest_agent.0); only one client at a time may use it';

/** guest-ping within the bound, then the fsfreeze commands enabled in guest-info. */
async function checkGuestAgent(socket: string, timeoutMs: number): Promise<PreflightCheck[]> {
  let t = performance.now();
  let qga: GuestAgentClient | null = null;
  try {
    qga = await GuestAgentClient.connect(socket, { timeoutMs, commandTimeoutMs: timeoutMs });
    await qga.ping();
  } catch (err) {
    // the agent serves one client at a time: the slot is given back
    qga?.close();
    return [check('guest-agent', t, false, `guest agent on ${socket}: ${(err as Error).message}`, 'MOB_ERR_PRE_GUEST_AGENT', GUEST_AGENT_FIX)];
  }
  try {
    const out: PreflightCheck[] = [];
    t = performance.now();
    let info: Awaited<ReturnType<GuestAgentClient['info']>>;
    try {
      info = await qga.info();
    } catch (err) {
      return [check('guest-agent', t, false, `guest-info on ${socket}: ${(err as Error).message}`, 'MOB_ERR_PRE_GUEST_AGENT', GUEST_AGENT_FIX)];
    }
    out.push(check('guest-agent', t, true, `guest agent ${info.version} answers on ${socket}`));
    t = performance.now();
    const enabled = new Set(info.supported_commands.filter((c) => c.enabled).map((c) => c.name));
    const missing = ['guest-fsfreeze-status', 'guest-fsfreeze-thaw'].filter((c) => !enabled.has(c));
    if (!enabled.has('guest-fsfreeze-freeze') && !enabled.has('guest-fsfreeze-freeze-list')) missing.unshift('guest-fsfreeze-freeze');
    out.push(missing.length === 0
      ? check('guest-fsfreeze', t, true, `fsfreeze commands enabled${enabled.has('guest-fsfreeze-freeze') ? '' : ' (guest-fsfreeze-freeze-list only: name the mount points to freeze)'}`)
      : check('guest-fsfreeze', t, false, `the guest agent has ${missing.join(', ')} disabled or missing: it cannot freeze the guest for app-consistent points`, 'MOB_ERR_PRE_GUEST_AGENT',
        'allow the fsfreeze commands in the guest (remove them from block-rpcs, or add them to allow-rpcs, in /etc/qemu/qemu-ga.conf; restart qemu-guest-agent); a Windows guest needs the VSS provider of the guest agent installed'));
    return out;
  } finally {
    qga.close();
  }
}

async function checkNbdinfo(timeoutMs: number): Promise<PreflightCheck> {
  const t = performance.now();
  try {
    const { stdout } = await promisify(execFile)('nbdinfo', ['--version'], { timeout: timeoutMs });
    return check('nbdinfo', t, true, stdout.split('\n')[0]!.trim() || 'nbdinfo runs');
  } catch (err) {
    return check('nbdinfo', t, false, `nbdinfo: ${(err as Error).message}`, 'MOB_ERR_PRE_QEMU', 'install libnbd\'s tools (Debian: apt-get install libnbd-bin)');
  }
}

function fmt(n: number): string {
  return n >= GiB ? `${(n / GiB).toFixed(1)} GiB` : `${(n / (1024 * 1024)).toFixed(0)} MiB`;
}
