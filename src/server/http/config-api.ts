/**
 * Configuration-server endpoints of the operator API (bearer token):
 *
 *   GET  /v1/machines                     registered machines, inventory, connection, policy, disks
 *   GET  /v1/policies                     replication policies
 *   POST /v1/policies                     {name, rpoThresholdMs?, retentionMs?, crashIntervalMs?, appIntervalMs?, compress? (auto, always,
 *                                          never; true = auto, false = never), bandwidthBytes?,
 *                                          freezeLimitMs?, spoolBudgetBytes?}
 *   POST /v1/policies/assign              {machine, policy}
 *   POST /v1/enable                       {machine, disk (device path on the machine), diskId?, policy?, profileOnly?}: profileOnly
 *                                         profiles the disk (tracks writes, reports churn, never replicates)
 *   POST /v1/disable                      {machine, disk (disk id or device), keepReplica?, dryRun?}: dryRun answers what
 *                                         would be deleted and changes nothing
 *   POST /v1/cut                          {machine, kind?, timeoutMs?}: an on-demand cut; answers its recovery point
 *   POST /v1/tokens                       {label?, ttlMs?}: a one-time registration token
 *   GET  /v1/groups                       consistency groups: members, interval, bound, kind, connection of each member
 *   POST /v1/groups                       {name, members: [machine], intervalMs?, boundMs?, kind?}: create or replace a group (at most 16 machines)
 *   POST /v1/groups/delete                {name}: remove a group (its points keep their group labels)
 *   POST /v1/groups/cut                   {group, kind?}: a group cut now; answers the group point, or the error naming the machine
 *   GET  /v1/group-points?group=G         the group's points (complete when every member recorded its part)
 *   GET  /v1/capacity?machine=&rpo=&retention=&bandwidth=&psThroughput=&window=
 *                                         capacity plan from the measured churn (server/capacity.ts)
 */
import fsp from 'node:fs/promises';
import path from 'node:path';
import type { IncomingMessage, ServerResponse } from 'node:http';
import { ID_PATTERN } from '../../constants.js';
import { MobilityError, isErrorCode } from '../../errors.js';
import type { CompressMode } from '../../protocol/block-codec.js';
import type { RecoveryPoint } from '../../target/catalog.js';
import { readBody, send } from './http-util.js';
import type { AgentRow, ConfigDb, ConsistencyGroup, DiskRow, Policy, VmMachineRow } from '../config-db.js';
import { QEMU_DEVICE_PREFIX, type PreflightReply } from '../control.js';
import { vmDiskId, vmMachineId, type InventoryVm, type InventoryVmDisk } from '../../source/qemu/vm-discovery.js';
import type { ServerContext } from '../context.js';
import { allocatedBytes } from '../../target/local/local-backend.js';
import { TOKEN_TTL_MS } from '../registry.js';
import { DEFAULT_GROUP_BOUND_MS, MAX_GROUP_MEMBERS, groupPoints } from '../group-cut.js';

/** A group's bound: at least 100 ms, at most 10 minutes. */
const MIN_GROUP_BOUND_MS = 100;
const MAX_GROUP_BOUND_MS = 600_000;

/**
 * The members of group `name` as a request gives them (agent ids or host names): resolved,
 * deduplicated, at most MAX_GROUP_MEMBERS (MOB_ERR_GROUP_TOO_LARGE), each a registered machine
 * (MOB_ERR_UNKNOWN_MACHINE) in no other group (MOB_ERR_CONFIG).
 */
export function groupMembers(db: Pick<ConfigDb, 'findAgent' | 'groupOf'>, name: string, given: unknown): string[] {
  if (!Array.isArray(given) || given.length === 0 || !given.every((m) => typeof m === 'string' && m)) throw new MobilityError('MOB_ERR_USAGE', 'members must be a non-empty list of machines (agent ids or hostnames)');
  const members = [...new Set((given as string[]).map((m) => db.findAgent(m).id))];
  if (members.length > MAX_GROUP_MEMBERS) throw new MobilityError('MOB_ERR_GROUP_TOO_LARGE', `a consistency group holds at most ${MAX_GROUP_MEMBERS} machines; ${name} would hold ${members.length}`);
  for (const m of members) {
    const other = db.groupOf(m);
    if (other !== null && other !== name) throw new MobilityError('MOB_ERR_CONFIG', `machine ${m} is already in group ${other}; a machine is in at most one group (remove it there first)`);
  }
  return members;
}

/** The group points of a group, from its members' catalogs (and any machine whose points name the group). */
export async function listGroupPoints(server: ServerContext, name: string): Promise<ReturnType<typeof groupPoints>> {
  const g = server.db.getGroup(name);
  const agents = new Set(g.members);
  const catalogs = new Map<string, readonly RecoveryPoint[]>();
  for (const a of agents) {
    try { catalogs.set(a, (await server.catalog(a)).list()); } catch { catalogs.set(a, []); }
  }
  return groupPoints(g.name, catalogs);
}
import { planFromDb } from '../capacity.js';

const MIN_CRASH_INTERVAL_MS = 15_000;
export const DEFAULT_CUT_TIMEOUT_MS = 120_000;
const MAX_CUT_TIMEOUT_MS = 3_600_000;

function str(v: unknown, what: string): string {
  if (typeof v !== 'string' || !v) throw new MobilityError('MOB_ERR_USAGE', `${what} is required`);
  return v;
}

function ms(v: unknown, what: string, fallback: number, min = 0): number {
  if (v === undefined || v === null) return fallback;
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < min) throw new MobilityError('MOB_ERR_USAGE', `${what} must be an integer >= ${min}`);
  return v;
}

/** The compress setting of a policy body: compressMode, or compress (a mode, or a boolean as older clients send it); both must agree. */
function policyCompress(b: Record<string, unknown>, fallback: CompressMode): CompressMode {
  const fromMode = b.compressMode === undefined || b.compressMode === null ? undefined : compressOpt(b.compressMode, fallback);
  if (fromMode !== undefined && typeof b.compressMode === 'boolean') throw new MobilityError('MOB_ERR_USAGE', 'compressMode must be auto, always or never');
  const fromCompress = b.compress === undefined || b.compress === null ? undefined : compressOpt(b.compress, fallback);
  if (fromMode !== undefined && fromCompress !== undefined && fromMode !== fromCompress
    // compress true (a client that also sends compressMode, or a GET body posted back) stands for any mode but never
    && !(b.compress === true && fromMode !== 'never')) {
    throw new MobilityError('MOB_ERR_USAGE', `compress (${JSON.stringify(b.compress)}) contradicts compressMode (${JSON.stringify(b.compressMode)})`);
  }
  return fromMode ?? fromCompress ?? fallback;
}

/** A policy's compress setting: a mode, or a boolean as older clients send it (true = auto). */
function compressOpt(v: unknown, fallback: CompressMode): CompressMode {
  if (v === undefined || v === null) return fallback;
  if (typeof v === 'boolean') return v ? 'auto' : 'never';
  if (v === 'auto' || v === 'always' || v === 'never') return v;
  throw new MobilityError('MOB_ERR_USAGE', `compress must be auto, always or never (or a boolean), got ${JSON.stringify(v)}`);
}

export function diskIdFor(device: string): string {
  return path.basename(device).replace(/[^A-Za-z0-9._-]/g, '_').slice(0, 64) || 'disk';
}

/** Waits until no session holds the disk (the agent stopped replicating it). */
async function waitReleased(server: ServerContext, agentId: string, diskId: string, timeoutMs: number): Promise<boolean> {
  const end = Date.now() + timeoutMs;
  while (server.diskBusy(agentId, diskId)) {
    if (Date.now() > end) return false;
    await new Promise((r) => setTimeout(r, 100));
  }
  return true;
}

export interface DisablePlan {
  /** The machine's last enabled disk: every replica and recovery point of the machine goes. */
  lastDisk: boolean;
  /** Replicas deleted: disk id, disk size, bytes on the server's disk (replica, WAL, undo journals). */
  /** allocatedBytes: what the replica and its points occupy in the store (null: not counted yet). */
  replicas: { diskId: string; sizeBytes: number; allocatedBytes: number | null }[];
  /** Recovery points deleted (all of the machine's when lastDisk). */
  points: number;
  /** Points kept that name the disk (not lastDisk): they can no longer be materialised for it. */
  pointsNamingDisk: number;
  /** Test-failover images deleted with it (they would be orphaned). */
  testFailoverImages: { point: string; diskId: string; path: string; allocatedBytes: number }[];
}

/** What disabling a disk without --keep-replica deletes. */
export async function disablePlan(server: ServerContext, agentId: string, diskId: string): Promise<DisablePlan> {
  const lastDisk = server.db.listDisks(agentId).every((d) => d.diskId === diskId);
  const replicas: DisablePlan['replicas'] = [];
  const disks = lastDisk ? await server.backend.disks(agentId) : [diskId];
  for (const d of disks) {
    const st = await server.backend.stat(agentId, d);
    if (!st) continue; // no replica there
    replicas.push({ diskId: d, sizeBytes: st.sizeBytes, allocatedBytes: st.storedBytes });
  }
  let all: readonly RecoveryPoint[] = [];
  try { all = (await server.catalog(agentId)).list(); } catch { /* no catalog */ }
  const images: DisablePlan['testFailoverImages'] = [];
  for (const img of await server.backend.images(agentId, 'test-failover')) {
    if (!lastDisk && img.diskId !== diskId) continue;
    images.push({ point: img.pointId, diskId: img.diskId, path: img.location, allocatedBytes: img.localPath ? await allocatedBytes(img.localPath) : img.sizeBytes });
  }
  return {
    lastDisk, replicas, points: lastDisk ? all.length : 0,
    pointsNamingDisk: lastDisk ? 0 : all.filter((p) => p.disks[diskId]).length, testFailoverImages: images,
  };
}

/** Removes what disablePlan lists (call with the agent lock held). */
async function removeReplicas(server: ServerContext, agentId: string, diskId: string, plan: DisablePlan): Promise<void> {
  const disks = plan.lastDisk ? await server.backend.disks(agentId) : [diskId];
  for (const img of await server.backend.images(agentId, 'test-failover')) {
    if (plan.lastDisk || img.diskId === diskId) await server.backend.removeImage(img);
  }
  for (const d of disks) await server.backend.remove(agentId, d);
  if (plan.lastDisk) {
    await server.resetCatalog(agentId);
    await fsp.rm(server.agentDir(agentId), { recursive: true, force: true });
  }
}

/**
 * An on-demand cut: the agent is asked over its control connection, then the first recovery
 * point of the machine taken (frozen) at or after the agent received the request answers it:
 * an app-consistent point for kind app (a crash point downgraded from app because a pre-freeze
 * hook failed is MOB_ERR_HOOK; in host mode because the guest agent could not freeze the VM, or
 * it has none, MOB_ERR_GUEST_AGENT), any point for kind crash. The first cut failure the agent
 * reports after accepting the request fails it with that failure's code.
 */
async function cutAndWait(server: ServerContext, agentId: string, kind: 'crash' | 'app', timeoutMs: number, res: ServerResponse): Promise<{ point: RecoveryPoint; requestedAt: string; waitedMs: number }> {
  const t0 = Date.now();
  let requestedAtMs: number | null = null;
  const seen: RecoveryPoint[] = [];
  let finish!: (err: MobilityError | null, point?: RecoveryPoint) => void;
  const done = new Promise<RecoveryPoint>((resolve, reject) => {
    finish = (err, point) => { if (err) reject(err); else resolve(point!); };
  });
  done.catch(() => undefined); // settled while the request is still on its way is fine: it is awaited below
  const consider = (p: RecoveryPoint) => {
    if (requestedAtMs === null || Date.parse(p.takenAt) < requestedAtMs) return;
    if (kind === 'crash' || p.kind === 'app') finish(null, p);
    else if (/recorded as crash-consistent/.test(p.note)) {
      // the agent could not quiesce (a pre-freeze hook failed; host mode: the VM's guest agent could not freeze it, or it has none)
      const code = /pre-freeze hook failed/.test(p.note) ? 'MOB_ERR_HOOK' : 'MOB_ERR_GUEST_AGENT';
      finish(new MobilityError(code, `the app-consistent cut of ${agentId} was downgraded (${p.note}); crash-consistent point ${p.id} was recorded instead`));
    }
  };
  const unwatchPoints = server.watchCuts((agent, n) => {
    if (agent !== agentId) return;
    if ('point' in n) {
      seen.push(n.point);
      consider(n.point);
    } else if (requestedAtMs !== null) {
      finish(new MobilityError(isErrorCode(n.failed.code) ? n.failed.code : 'MOB_ERR_CUT', `the cut of ${agentId} failed: ${n.failed.message}`));
    }
  });
  const unwatchEvents = server.control.watchEvents((agent, e) => {
    if (agent !== agentId || requestedAtMs === null || e.event !== 'cut-failed') return;
    const code = typeof e.code === 'string' && isErrorCode(e.code) ? e.code : 'MOB_ERR_CUT';
    finish(new MobilityError(code, `the cut of ${agentId} failed on the agent: ${String(e.message)}`));
  });
  const timer = setTimeout(() => {
    const h = [...(server.health.entries(agentId))].map(([d, r]) => `${d} ${r.connected ? r.state : 'disconnected'}${r.state === 'initial-sync' || r.state === 'resyncing' ? ` ${(r.progressPermille / 10).toFixed(1)}%` : ''}`);
    finish(new MobilityError('MOB_ERR_CUT_TIMEOUT', `no ${kind}-consistent recovery point of ${agentId} within ${Math.round(timeoutMs / 1000)} s`
      + `${h.length ? ` (disks: ${h.join(', ')})` : ''}; a cut is taken once every disk is continuous, and the request stays queued on the agent`));
  }, timeoutMs);
  const gone = () => finish(new MobilityError('MOB_ERR_UNREACHABLE', 'the client went away'));
  res.once('close', gone);
  try {
    const accepted = server.control.cut(agentId, kind, timeoutMs, (at) => {
      requestedAtMs = at;
      for (const p of seen) consider(p);
    });
    accepted.catch(() => undefined);
    const { requestedAtMs: at } = await Promise.race([accepted, done.then(() => accepted)]);
    const point = await done;
    return { point, requestedAt: new Date(at).toISOString(), waitedMs: Date.now() - t0 };
  } finally {
    clearTimeout(timer);
    unwatchPoints();
    unwatchEvents();
    res.off('close', gone);
  }
}

/** A VM as GET /v1/machines lists it under its host: the host's last report of it and its protection. */
export interface MachineVm {
  agentId: string; name: string; hostId: string; connected: boolean; status: string; qmpSocket: string; guestAgentSocket: string | null;
  /** Disks as the host reported them (device, node, file, format, sizeBytes, persistentTracking). */
  inventoryDisks: InventoryVmDisk[];
  /** Whether the host's last inventory lists the VM (false: stopped or gone since it was enabled). */
  reported: boolean;
  error: { code: string; message: string } | null;
  /** The VM machine's row when it exists (protected or once protected): policy and enabled disks. */
  policy: string | null; disks: { diskId: string; device: string; enabledAt: string }[];
}

/** The VMs of a host agent: those its last inventory reports, and VM machines it reported before. Empty object for other machines. */
function hostVms(a: AgentRow, disks: DiskRow[], byId: Map<string, AgentRow>, links: Map<string, VmMachineRow>, server: ServerContext): { vms?: MachineVm[] } {
  const reported = inventoryVms(a.id, a.inventory);
  const mine = [...links.values()].filter((v) => v.hostId === a.id);
  if (reported === null && mine.length === 0) return {};
  const connected = server.control.connected(a.id);
  const out: MachineVm[] = [];
  const seen = new Set<string>();
  for (const v of reported ?? []) {
    seen.add(v.machineId);
    const row = byId.get(v.machineId);
    out.push({
      agentId: v.machineId, name: v.name, hostId: a.id, connected, status: v.status, qmpSocket: v.qmpSocket, guestAgentSocket: v.guestAgentSocket,
      inventoryDisks: v.disks, reported: true, error: v.error ?? null,
      policy: row ? row.policy ?? 'default' : null,
      disks: disks.filter((d) => d.agentId === v.machineId).map((d) => ({ diskId: d.diskId, device: d.device, enabledAt: d.enabledAt })),
    });
  }
  for (const v of mine) {
    if (seen.has(v.agentId)) continue;
    out.push({
      agentId: v.agentId, name: v.name, hostId: a.id, connected, status: 'not reported', qmpSocket: v.qmpSocket, guestAgentSocket: v.guestAgentSocket,
      inventoryDisks: [], reported: false, error: null, policy: byId.get(v.agentId)?.policy ?? 'default',
      disks: disks.filter((d) => d.agentId === v.agentId).map((d) => ({ diskId: d.diskId, device: d.device, enabledAt: d.enabledAt })),
    });
  }
  return { vms: out.sort((x, y) => x.name.localeCompare(y.name)) };
}

/**
 * The VMs of an inventory host agent `hostId` sent (null when it is not a host agent's), each
 * checked for the fields used here. The machine id is the server's own (vmMachineId of the host
 * and the name): a host never names another machine's id for its VM.
 */
function inventoryVms(hostId: string, inventory: unknown): InventoryVm[] | null {
  const vms = (inventory as { vms?: unknown } | null)?.vms;
  if (!Array.isArray(vms)) return null;
  return vms.filter((v): v is InventoryVm => {
    const x = v as Partial<InventoryVm> | null;
    return typeof x === 'object' && x !== null && typeof x.name === 'string' && x.name !== '' && typeof x.qmpSocket === 'string' && Array.isArray(x.disks)
      && x.disks.every((d) => typeof d === 'object' && d !== null && typeof d.device === 'string' && typeof d.node === 'string' && d.node !== '');
  }).map((v) => ({
    ...v, machineId: vmMachineId(hostId, v.name), guestAgentSocket: typeof v.guestAgentSocket === 'string' ? v.guestAgentSocket : null,
    status: typeof v.status === 'string' ? v.status : 'unknown',
  }));
}

/**
 * POST /v1/enable with vm: protects every disk of VM `vm` of host agent `machine` as one
 * consistency group (one machine: every cut covers all its disks). The VM is looked up in the
 * host's last inventory; its machine (id `<host>.<vm>`) is created when new, each disk enabled
 * with id = its device name sanitized and device `qemu:<device>` (the drive id; the host agent
 * resolves it to the current node), and the host gets its new
 * assignments. The host's QEMU preflight runs first, unless the VM is protected already (its QMP
 * socket is held by the protection then).
 */
async function enableVm(server: ServerContext, b: Record<string, unknown>): Promise<Record<string, unknown>> {
  const db = server.db;
  const vmName = str(b.vm, 'vm');
  if (b.disk !== undefined || b.diskId !== undefined) throw new MobilityError('MOB_ERR_USAGE', 'enable --vm protects every disk of the VM: give no disk');
  if (b.profileOnly === true) throw new MobilityError('MOB_ERR_USAGE', 'profiling (--profile-only) is for in-guest disks; a VM is profiled by protecting it');
  const host = db.findAgent(str(b.machine, 'machine'));
  const hostLink = db.vmMachine(host.id);
  if (hostLink) throw new MobilityError('MOB_ERR_UNKNOWN_VM', `${host.id} is a VM of host ${hostLink.hostId}, not a host: enable --machine ${hostLink.hostId} --vm ${vmName}`);
  const vms = inventoryVms(host.id, host.inventory);
  if (vms === null) {
    throw new MobilityError('MOB_ERR_UNKNOWN_VM', `${host.id} is not a host agent: its inventory${host.inventoryAt ? ` (${host.inventoryAt})` : ''} lists no VMs (set vmSockets in its agent.json to the glob of its VMs' QMP sockets and reload it)`);
  }
  const vm = vms.find((v) => v.name === vmName) ?? vms.find((v) => v.machineId === vmName);
  if (!vm) {
    throw new MobilityError('MOB_ERR_UNKNOWN_VM', `host ${host.id} reports no VM named ${JSON.stringify(vmName)} in its last inventory${host.inventoryAt ? ` (${host.inventoryAt})` : ''}; `
      + `its VMs: ${vms.map((v) => `${v.name}${v.error ? ' (unreachable)' : ''}`).join(', ') || 'none'}`);
  }
  const same = vms.filter((v) => v.machineId === vm.machineId);
  if (same.length > 1) {
    throw new MobilityError('MOB_ERR_UNKNOWN_VM', `host ${host.id} reports ${same.length} VMs that map to machine ${vm.machineId} (${same.map((v) => `${v.name} at ${v.qmpSocket}`).join(', ')}): `
      + 'give them distinct names (QEMU -name; on Proxmox the VM name)');
  }
  if (vm.error) throw new MobilityError('MOB_ERR_UNKNOWN_VM', `host ${host.id} could not inspect VM ${vm.name} at its last inventory (${vm.qmpSocket}: ${vm.error.code}: ${vm.error.message}); start the VM, or check the socket, and retry once the host reported it`);
  if (vm.disks.length === 0) throw new MobilityError('MOB_ERR_UNKNOWN_VM', `VM ${vm.name} of ${host.id} has no disk to protect (CD-ROMs and empty drives are left out)`);
  const policy = typeof b.policy === 'string' && b.policy ? db.getPolicy(b.policy) : null;
  const existing = db.getAgent(vm.machineId);
  const link = db.vmMachine(vm.machineId);
  if (existing && link?.hostId !== host.id) throw new MobilityError('MOB_ERR_CONFIG', `machine id ${vm.machineId} of VM ${vm.name} belongs to ${link ? `a VM of host ${link.hostId}` : 'a registered machine'}`);
  // disk ids: the device names sanitized, made unique
  const ids = new Set<string>();
  const disks = vm.disks.map((d) => {
    let id = vmDiskId(d.device);
    for (let i = 2; ids.has(id); i++) id = `${vmDiskId(d.device).slice(0, 60)}-${i}`;
    ids.add(id);
    return { diskId: id, node: d.node, device: d.device, format: d.format, sizeBytes: d.sizeBytes };
  });
  const protectedAlready = link !== null && db.listDisks(vm.machineId).length > 0;
  const fo = existing ? await server.failoverState(vm.machineId) : null;
  if (fo) throw new MobilityError('MOB_ERR_FAILED_OVER', `VM ${vm.name} (${vm.machineId}) is failed over to ${fo.point}: fail it back first (mobility reprotect)`);
  let checks: PreflightReply['checks'] = [];
  if (!protectedAlready) {
    const pre = await server.control.preflight(host.id, [], { qmpSocket: vm.qmpSocket, nodes: disks.map((d) => d.node) });
    checks = pre.checks;
    if (!pre.ok) {
      const failed = pre.checks.filter((c) => !c.ok);
      throw Object.assign(new MobilityError('MOB_ERR_PREFLIGHT', `preflight of VM ${vm.name} on ${host.id} failed: ${failed.map((c) => `${c.code ?? c.id}: ${c.message}${c.fix ? ` (fix: ${c.fix})` : ''}`).join('; ')}`), { details: pre.checks });
    }
  }
  db.ensureVmMachine(host.id, vm.machineId, { name: vm.name, qmpSocket: vm.qmpSocket, guestAgentSocket: vm.guestAgentSocket });
  if (policy) db.setAgentPolicy(vm.machineId, policy.name);
  // the VM's disks are exactly those it has now: a disk gone from the VM stops being protected
  for (const d of db.listDisks(vm.machineId)) if (!ids.has(d.diskId)) db.disableDisk(vm.machineId, d.diskId);
  // the device name (the VM's drive id): QEMU's automatic node names change at every start of the
  // VM; the host agent resolves the device to its node each time it starts protecting
  for (const d of disks) db.enableDisk(vm.machineId, d.diskId, `${QEMU_DEVICE_PREFIX}${d.device || d.node}`);
  const pushed = server.control.push(host.id);
  const policyName = (policy ?? db.getPolicy(db.getAgent(vm.machineId)?.policy ?? 'default')).name;
  server.log.info('replication of a VM enabled', { host: host.id, vm: vm.name, agent: vm.machineId, disks: disks.map((d) => `${d.diskId}=${d.node}`), policy: policyName, pushed });
  return { agentId: vm.machineId, hostId: host.id, vm: vm.name, disks, policy: policyName, pushed, preflight: checks };
}

export async function handleConfigApi(server: ServerContext, req: IncomingMessage, res: ServerResponse, url: URL): Promise<boolean> {
  const db = server.db;
  const route = `${req.method ?? ''} ${url.pathname}`;
  switch (route) {
    case 'GET /v1/machines': {
      const disks = db.listDisks();
      const vmLinks = new Map(db.listVmMachines().map((v) => [v.agentId, v]));
      const agents = db.listAgents();
      const byId = new Map(agents.map((a) => [a.id, a]));
      send(res, 200, {
        // VM machines are listed under their host (vms), not at the top
        machines: agents.filter((a) => !vmLinks.has(a.id)).map((a) => ({
          agentId: a.id, hostname: a.hostname, machineId: a.machineId, connected: server.control.connected(a.id), lastSeen: a.lastSeen,
          registeredAt: a.registeredAt, registeredWith: a.registeredWith, policy: a.policy ?? 'default',
          disks: disks.filter((d) => d.agentId === a.id), profiled: db.listProfileDisks(a.id), inventory: a.inventory, inventoryAt: a.inventoryAt,
          ...hostVms(a, disks, byId, vmLinks, server),
        })),
      });
      return true;
    }
    case 'GET /v1/policies':
      send(res, 200, { policies: db.listPolicies() });
      return true;
    case 'POST /v1/policies': {
      const b = await readBody(req);
      const name = str(b.name, 'name');
      if (!ID_PATTERN.test(name)) throw new MobilityError('MOB_ERR_USAGE', `policy name ${JSON.stringify(name)} is not [A-Za-z0-9._-]{1,64}`);
      let base: Policy;
      try { base = db.getPolicy(name); } catch { base = db.getPolicy('default'); }
      const crash = ms(b.crashIntervalMs, 'crashIntervalMs', base.crashIntervalMs, MIN_CRASH_INTERVAL_MS);
      const app = ms(b.appIntervalMs, 'appIntervalMs', base.appIntervalMs, 0);
      const p = db.putPolicy({
        name, rpoThresholdMs: ms(b.rpoThresholdMs, 'rpoThresholdMs', base.rpoThresholdMs, 1000), retentionMs: ms(b.retentionMs, 'retentionMs', base.retentionMs, 60_000),
        crashIntervalMs: crash, appIntervalMs: app, compressMode: policyCompress(b, base.compressMode),
        bandwidthBytes: ms(b.bandwidthBytes, 'bandwidthBytes', base.bandwidthBytes, 0),
        freezeLimitMs: ms(b.freezeLimitMs, 'freezeLimitMs', base.freezeLimitMs, 100),
        spoolBudgetBytes: ms(b.spoolBudgetBytes, 'spoolBudgetBytes', base.spoolBudgetBytes, 64 * 1024),
      });
      // agents under this policy get it now
      for (const a of db.listAgents()) if ((a.policy ?? 'default') === name) server.control.push(a.id);
      server.log.info('policy saved', { policy: p });
      send(res, 200, { policy: p });
      return true;
    }
    case 'POST /v1/policies/assign': {
      const b = await readBody(req);
      const a = db.findAgent(str(b.machine, 'machine'));
      const p = db.getPolicy(str(b.policy, 'policy'));
      db.setAgentPolicy(a.id, p.name);
      const pushed = server.control.push(a.id);
      server.log.info('policy assigned', { agent: a.id, policy: p.name, pushed });
      send(res, 200, { agentId: a.id, policy: p, pushed });
      return true;
    }
    case 'POST /v1/enable': {
      const b = await readBody(req);
      if (b.vm !== undefined) {
        send(res, 200, await enableVm(server, b));
        return true;
      }
      const a = db.findAgent(str(b.machine, 'machine'));
      const vmLink = db.vmMachine(a.id);
      if (vmLink) throw new MobilityError('MOB_ERR_USAGE', `${a.id} is VM ${vmLink.name} of host ${vmLink.hostId}: its disks are enabled together (mobility enable --machine ${vmLink.hostId} --vm ${vmLink.name})`);
      const device = str(b.disk, 'disk');
      if (!device.startsWith('/')) throw new MobilityError('MOB_ERR_USAGE', `disk must be an absolute device path on the machine (e.g. /dev/sdb), not ${JSON.stringify(device)}`);
      const diskId = typeof b.diskId === 'string' && b.diskId ? b.diskId : diskIdFor(device);
      if (!ID_PATTERN.test(diskId)) throw new MobilityError('MOB_ERR_BAD_DISK_ID', `disk id ${JSON.stringify(diskId)} is not [A-Za-z0-9._-]{1,64}`);
      const policy = typeof b.policy === 'string' && b.policy ? db.getPolicy(b.policy) : null;
      if (b.profileOnly !== undefined && typeof b.profileOnly !== 'boolean') throw new MobilityError('MOB_ERR_USAGE', 'profileOnly must be a boolean');
      const profileOnly = b.profileOnly === true;
      const clash = db.listDisks(a.id).find((d) => (profileOnly || d.diskId !== diskId) && d.device === device);
      if (clash) throw new MobilityError('MOB_ERR_CONFIG', `${device} is already enabled on ${a.id} as disk ${clash.diskId}${profileOnly ? ' (protected: profiling is for disks not protected yet)' : ''}`);
      if (profileOnly) {
        if (db.listDisks(a.id).some((d) => d.diskId === diskId)) throw new MobilityError('MOB_ERR_CONFIG', `disk id ${diskId} is already protected on ${a.id}: profiling is for disks not protected yet`);
        const pclash = db.listProfileDisks(a.id).find((d) => d.diskId !== diskId && d.device === device);
        if (pclash) throw new MobilityError('MOB_ERR_CONFIG', `${device} is already profiled on ${a.id} as disk ${pclash.diskId}`);
      }
      const pre = await server.control.preflight(a.id, [device]);
      if (!pre.ok) {
        const failed = pre.checks.filter((c) => !c.ok);
        throw Object.assign(new MobilityError('MOB_ERR_PREFLIGHT', `preflight on ${a.id} failed: ${failed.map((c) => `${c.code ?? c.id}: ${c.message}${c.fix ? ` (fix: ${c.fix})` : ''}`).join('; ')}`), { details: pre.checks });
      }
      if (profileOnly) {
        db.enableProfile(a.id, diskId, device);
        const pushed = server.control.push(a.id);
        server.log.info('profiling enabled', { agent: a.id, disk: diskId, device });
        send(res, 200, { agentId: a.id, diskId, device, profileOnly: true, pushed, preflight: pre.checks });
        return true;
      }
      if (policy) db.setAgentPolicy(a.id, policy.name);
      // a profiled disk becomes protected: its profiling ends (its churn samples stay for mobility capacity)
      const profiledBefore = db.listProfileDisks(a.id).filter((d) => d.diskId === diskId || d.device === device);
      for (const d of profiledBefore) db.disableProfile(a.id, d.diskId);
      db.enableDisk(a.id, diskId, device);
      const pushed = server.control.push(a.id);
      server.log.info('replication enabled', { agent: a.id, disk: diskId, device, policy: policy?.name ?? a.policy ?? 'default' });
      send(res, 200, { agentId: a.id, diskId, device, policy: (policy ?? db.getPolicy(a.policy ?? 'default')).name, pushed, preflight: pre.checks, profileEnded: profiledBefore.map((d) => d.diskId) });
      return true;
    }
    case 'POST /v1/disable': {
      const b = await readBody(req);
      const a = db.findAgent(str(b.machine, 'machine'));
      const ref = str(b.disk, 'disk');
      const row = db.listDisks(a.id).find((d) => d.diskId === ref || d.device === ref);
      const prow = row ? undefined : db.listProfileDisks(a.id).find((d) => d.diskId === ref || d.device === ref);
      if (prow) {
        // profiling only: nothing on the server to delete (its churn samples stay for mobility capacity)
        if (b.dryRun === true) {
          send(res, 200, { agentId: a.id, diskId: prow.diskId, device: prow.device, dryRun: true, profileOnly: true, keepReplica: true, plan: null });
          return true;
        }
        db.disableProfile(a.id, prow.diskId);
        const pushed = server.control.push(a.id);
        server.log.info('profiling disabled', { agent: a.id, disk: prow.diskId, pushed });
        send(res, 200, { agentId: a.id, diskId: prow.diskId, profileOnly: true, pushed, replicaRemoved: false, removed: null });
        return true;
      }
      if (!row) throw new MobilityError('MOB_ERR_UNKNOWN_DISK', `no enabled disk ${JSON.stringify(ref)} on ${a.id} (enabled: ${db.listDisks(a.id).map((d) => d.diskId).join(', ') || 'none'})`);
      const keep = b.keepReplica === true;
      if (!keep) {
        // the promoted images of a failover are a running machine's disks: never orphan them
        const fo = await server.failoverState(a.id);
        if (fo) throw new MobilityError('MOB_ERR_FAILED_OVER', `${a.id} is failed over to ${fo.point} (since ${fo.failedOverAt}); removing its replicas would orphan the promoted images: fail back first (mobility reprotect), or disable with --keep-replica`);
      }
      if (b.dryRun === true) {
        send(res, 200, { agentId: a.id, diskId: row.diskId, device: row.device, dryRun: true, keepReplica: keep, plan: keep ? null : await disablePlan(server, a.id, row.diskId) });
        return true;
      }
      db.disableDisk(a.id, row.diskId);
      const pushed = server.control.push(a.id);
      let removed: DisablePlan | null = null;
      if (!keep) {
        const released = await waitReleased(server, a.id, row.diskId, 60_000);
        if (!released) throw new MobilityError('MOB_ERR_DISK_BUSY', `disk ${row.diskId} was disabled but a session still holds its replica; the replica was kept (disable again to remove it)`);
        removed = await server.withAgentLock(a.id, async () => {
          const plan = await disablePlan(server, a.id, row.diskId);
          await removeReplicas(server, a.id, row.diskId, plan);
          return plan;
        });
        server.health.forget(a.id, row.diskId);
      }
      server.log.info('replication disabled', {
        agent: a.id, disk: row.diskId, pushed, replicaRemoved: removed !== null, pointsRemoved: removed?.points ?? 0,
        testFailoverImagesRemoved: removed?.testFailoverImages.map((i) => i.path) ?? [],
      });
      send(res, 200, { agentId: a.id, diskId: row.diskId, pushed, replicaRemoved: removed !== null, removed });
      return true;
    }
    case 'POST /v1/cut': {
      const b = await readBody(req);
      const a = db.findAgent(str(b.machine, 'machine'));
      const kind = b.kind === undefined || b.kind === null ? 'crash' : b.kind;
      if (kind !== 'crash' && kind !== 'app') throw new MobilityError('MOB_ERR_USAGE', `kind must be crash or app, not ${JSON.stringify(kind)}`);
      const timeoutMs = ms(b.timeoutMs, 'timeoutMs', DEFAULT_CUT_TIMEOUT_MS, 1000);
      if (timeoutMs > MAX_CUT_TIMEOUT_MS) throw new MobilityError('MOB_ERR_USAGE', `timeoutMs must be at most ${MAX_CUT_TIMEOUT_MS}`);
      const fo = await server.failoverState(a.id);
      if (fo) throw new MobilityError('MOB_ERR_FAILED_OVER', `${a.id} is failed over to ${fo.point}: replication is stopped, so there is nothing to cut`);
      if (db.listDisks(a.id).length === 0) throw new MobilityError('MOB_ERR_NOT_PROTECTING', `${a.id} protects no disk: enable one first (mobility enable --machine ${a.id} --disk DEV)`);
      server.log.info('cut requested', { agent: a.id, kind, timeoutMs });
      const r = await cutAndWait(server, a.id, kind, timeoutMs, res);
      server.log.info('requested cut recorded', { agent: a.id, kind, point: r.point.id, waitedMs: r.waitedMs });
      send(res, 200, { agentId: a.id, kind, ...r });
      return true;
    }
    case 'GET /v1/groups': {
      send(res, 200, {
        groups: db.listGroups().map((g) => ({
          ...g, running: server.groups.busy(g.name),
          machines: g.members.map((m) => ({ agentId: m, connected: server.control.connected(m), disks: db.listDisks(m).map((d) => d.diskId) })),
        })),
      });
      return true;
    }
    case 'POST /v1/groups': {
      const b = await readBody(req);
      const name = str(b.name, 'name');
      if (!ID_PATTERN.test(name)) throw new MobilityError('MOB_ERR_USAGE', `group name ${JSON.stringify(name)} is not [A-Za-z0-9._-]{1,64}`);
      let existing: ConsistencyGroup | null = null;
      try { existing = db.getGroup(name); } catch { /* a new group */ }
      const members = groupMembers(db, name, b.members);
      const kind = b.kind === undefined || b.kind === null ? existing?.kind ?? 'crash' : b.kind;
      if (kind !== 'crash' && kind !== 'app') throw new MobilityError('MOB_ERR_USAGE', `kind must be crash or app, not ${JSON.stringify(kind)}`);
      const intervalMs = ms(b.intervalMs, 'intervalMs', existing?.intervalMs ?? 0, 0);
      if (intervalMs !== 0 && intervalMs < MIN_CRASH_INTERVAL_MS) throw new MobilityError('MOB_ERR_USAGE', `intervalMs must be 0 (group cuts on demand only) or at least ${MIN_CRASH_INTERVAL_MS}`);
      const boundMs = ms(b.boundMs, 'boundMs', existing?.boundMs ?? DEFAULT_GROUP_BOUND_MS, MIN_GROUP_BOUND_MS);
      if (boundMs > MAX_GROUP_BOUND_MS) throw new MobilityError('MOB_ERR_USAGE', `boundMs must be at most ${MAX_GROUP_BOUND_MS}`);
      const g = db.putGroup({ name, members, intervalMs, boundMs, kind });
      server.log.info('consistency group saved', { group: g });
      send(res, 200, { group: g });
      return true;
    }
    case 'POST /v1/groups/delete': {
      const b = await readBody(req);
      const name = str(b.name, 'name');
      const g = db.getGroup(name);
      if (server.groups.busy(g.name)) throw new MobilityError('MOB_ERR_GROUP_BUSY', `a cut of group ${g.name} is running; delete it when it ends`);
      db.deleteGroup(g.name);
      server.log.info('consistency group removed', { group: g.name, members: g.members });
      send(res, 200, { removed: g });
      return true;
    }
    case 'POST /v1/groups/cut': {
      const b = await readBody(req);
      const name = str(b.group, 'group');
      const kind = b.kind === undefined || b.kind === null ? undefined : b.kind;
      if (kind !== undefined && kind !== 'crash' && kind !== 'app') throw new MobilityError('MOB_ERR_USAGE', `kind must be crash or app, not ${JSON.stringify(kind)}`);
      const g = db.getGroup(name);
      for (const m of g.members) {
        const fo = await server.failoverState(m);
        if (fo) throw new MobilityError('MOB_ERR_FAILED_OVER', `machine ${m} of group ${g.name} is failed over to ${fo.point}: its replication is stopped, so the group cannot be cut`);
        if (db.listDisks(m).length === 0) throw new MobilityError('MOB_ERR_NOT_PROTECTING', `machine ${m} of group ${g.name} protects no disk: enable one first (mobility enable --machine ${m} --disk DEV)`);
      }
      // a GroupCutError carries the machine at fault and every member's state (details)
      send(res, 200, await server.groups.cut(g.name, kind));
      return true;
    }
    case 'GET /v1/group-points': {
      const name = str(url.searchParams.get('group'), 'group');
      send(res, 200, { group: name, points: await listGroupPoints(server, name) });
        return true;
      }
    case 'GET /v1/capacity': {
      const q = url.searchParams;
      send(res, 200, planFromDb(db, { machine: q.get('machine'), rpo: q.get('rpo'), retention: q.get('retention'), bandwidth: q.get('bandwidth'), psThroughput: q.get('psThroughput'), window: q.get('window') }));
      return true;
    }
    case 'POST /v1/tokens': {
      const b = await readBody(req);
      const label = typeof b.label === 'string' ? b.label.slice(0, 200) : '';
      const ttl = ms(b.ttlMs, 'ttlMs', TOKEN_TTL_MS, 1000);
      const token = db.createToken(label, ttl);
      server.log.info('one-time token created', { id: token.split('.')[0], label, ttlMs: ttl });
      send(res, 200, { token, expiresAt: new Date(Date.now() + ttl).toISOString(), fingerprint: server.identity?.fingerprint256 ?? null });
      return true;
    }
    default:
      return false;
  }
}
