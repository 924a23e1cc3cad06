/**
 * The recovery steps of one recovered machine, after its disk images are made: write the
 * network mapping into the image that holds its root filesystem, then boot the machine and
 * watch its console (guest-network.ts, boot-check.ts), and record what was proved
 * (test-failover-record.ts).
 *
 * Who calls: test failover (http/api.ts) per agent; a recovery plan runner calls
 * checkRecoveredMachine per machine, in boot order, with the same narrow dependencies.
 * parseMachineChecks validates what a request asked for before anything is made.
 */
import fsp from 'node:fs/promises';
import path from 'node:path';
import { ID_PATTERN } from '../../constants.js';
import { MobilityError, toMobilityError } from '../../errors.js';
import type { InventoryNic } from '../../agent/inventory.js';
import type { Logger } from '../../log.js';
import type { RecoveryPoint } from '../../target/catalog.js';
import { bootCheck, compileMarker, DEFAULT_BOOT_TIMEOUT_MS, DEFAULT_MARKER, describeBootCheck, type BootAccel, type BootBus } from './boot-check.js';
import { applyNetworkMapping } from './guest-network.js';
import { parseNetworkMapping, type NetworkMapping } from './network-mapping.js';
import { appendTestFailover, type TestFailoverRecord } from './test-failover-record.js';

/** What is done to a machine's images after they are made (a network mapping, a boot check). */
export interface MachineChecks {
  networkMap: NetworkMapping | null;
  boot: { marker: string; timeoutMs: number; bus: BootBus; accel: BootAccel; network: 'none' | 'isolated'; disk: string | null } | null;
}

/** What checkRecoveredMachine needs from the server. */
export interface MachineCheckDeps {
  log: Logger;
  /** The server's metadata directory of an agent (the records go there). */
  agentDir(agentId: string): string;
  /** Where the whole console of the agent's boot checks is written (one file per check). */
  consoleDir(agentId: string): string;
  /** The NICs of the machine's inventory ([] when it has none). */
  inventoryNics(agentId: string): InventoryNic[];
  /** Where images are mounted while the mapping is written (a directory of the server's own: a mount left by a crash is easy to find). */
  scratch: string;
}

/** Longest boot check time limit taken. */
export const MAX_BOOT_TIMEOUT_MS = 6 * 3600_000;

const MAC = /^[0-9a-f]{2}(:[0-9a-f]{2}){5}$/;

/** The checks of a request body ({networkMap?, bootCheck?}); MOB_ERR_NETWORK_MAP / MOB_ERR_USAGE / MOB_ERR_BAD_DISK_ID name the bad field. */
export function parseMachineChecks(b: Record<string, unknown>): MachineChecks {
  const networkMap = b.networkMap === undefined || b.networkMap === null ? null : parseNetworkMapping(b.networkMap);
  let boot: MachineChecks['boot'] = null;
  if (b.bootCheck !== undefined && b.bootCheck !== null && b.bootCheck !== false) {
    const o = (typeof b.bootCheck === 'object' && !Array.isArray(b.bootCheck) ? b.bootCheck : {}) as Record<string, unknown>;
    const marker = o.marker === undefined ? DEFAULT_MARKER : o.marker;
    if (typeof marker !== 'string') throw new MobilityError('MOB_ERR_USAGE', 'bootCheck.marker must be a string (a regular expression)');
    compileMarker(marker);
    const timeoutMs = o.timeoutMs === undefined ? DEFAULT_BOOT_TIMEOUT_MS : o.timeoutMs;
    if (typeof timeoutMs !== 'number' || !Number.isInteger(timeoutMs) || timeoutMs < 1000 || timeoutMs > MAX_BOOT_TIMEOUT_MS) throw new MobilityError('MOB_ERR_USAGE', `bootCheck.timeoutMs must be whole milliseconds from 1000 to ${MAX_BOOT_TIMEOUT_MS}`);
    const pick = <T extends string>(k: string, allowed: readonly T[], dflt: T): T => {
      const v = o[k] ?? dflt;
      if (typeof v !== 'string' || !(allowed as readonly string[]).includes(v)) throw new MobilityError('MOB_ERR_USAGE', `bootCheck.${k} must be one of ${allowed.join(', ')}, got ${JSON.stringify(o[k])}`);
      return v as T;
    };
    const disk = o.disk === undefined || o.disk === null ? null : o.disk;
    if (disk !== null && (typeof disk !== 'string' || !ID_PATTERN.test(disk))) throw new MobilityError('MOB_ERR_BAD_DISK_ID', `bootCheck.disk ${JSON.stringify(disk)} is not a disk id`);
    boot = { marker, timeoutMs, bus: pick('bus', ['virtio', 'nvme', 'ide'] as const, 'virtio'), accel: pick('accel', ['auto', 'kvm', 'tcg'] as const, 'auto'), network: pick('network', ['none', 'isolated'] as const, 'none'), disk };
  }
  return { networkMap, boot };
}

/**
 * Runs the checks on a machine's made images (local files, one per disk): the network mapping
 * is written into the first disk whose image holds a root filesystem, then the machine boots
 * (the boot disk first: boot.disk, else the disk the mapping went to, else the first by id).
 * The outcome is recorded with the agent's test failovers and returned; a step that cannot run
 * is recorded, then fails the call with its code. A guest that does not reach its marker is a
 * result (bootCheck.ok false), not an error.
 */
export async function checkRecoveredMachine(deps: MachineCheckDeps, agent: string, point: RecoveryPoint, images: { diskId: string; file: string }[], checks: MachineChecks,
  onConsole?: (diskId: string, line: string) => void): Promise<TestFailoverRecord> {
  const rec: TestFailoverRecord = { agent, point: point.id, pointTakenAt: point.takenAt, at: new Date().toISOString(), images, networkMapping: null, bootCheck: null, error: null };
  let failure: MobilityError | null = null;
  if (checks.networkMap) {
    const mountFailures: string[] = [];
    for (const img of images) {
      try {
        await fsp.mkdir(deps.scratch, { recursive: true, mode: 0o700 });
        rec.networkMapping = { diskId: img.diskId, ...(await applyNetworkMapping(img.file, checks.networkMap, deps.inventoryNics(agent), { scratch: deps.scratch })) };
        break;
      } catch (err) {
        const e = toMobilityError(err);
        if (e.code !== 'MOB_ERR_IMAGE_MOUNT') { failure = e; break; }
        mountFailures.push(`disk ${img.diskId}: ${e.message}`);
      }
    }
    if (!rec.networkMapping && !failure) failure = new MobilityError('MOB_ERR_IMAGE_MOUNT', `no disk of ${point.id} holds a root filesystem to write the network mapping into: ${mountFailures.join('; ')}`);
    if (failure) rec.error = { step: 'network-mapping', code: failure.code, message: failure.message };
    else deps.log.info('network mapping written', { agent, point: point.id, disk: rec.networkMapping!.diskId, stack: rec.networkMapping!.stack, files: rec.networkMapping!.files });
  }
  if (checks.boot && !failure) {
    const b = checks.boot;
    const first = b.disk ?? rec.networkMapping?.diskId ?? null;
    if (first !== null && !images.some((i) => i.diskId === first)) failure = new MobilityError('MOB_ERR_USAGE', `bootCheck.disk ${first} is not a disk of ${point.id} (its disks: ${images.map((i) => i.diskId).join(', ')})`);
    else {
      const ordered = [...images].sort((x, y) => Number(y.diskId === first) - Number(x.diskId === first) || x.diskId.localeCompare(y.diskId));
      const macs = rec.networkMapping?.nics.map((n) => n.mac)
        ?? deps.inventoryNics(agent).map((n) => n.mac.toLowerCase()).filter((m) => MAC.test(m) && m !== '00:00:00:00:00:00');
      const logDir = deps.consoleDir(agent);
      await fsp.mkdir(logDir, { recursive: true, mode: 0o700 });
      const consoleLog = path.join(logDir, `${point.id}-${rec.at.replace(/[:.]/g, '')}.log`);
      try {
        rec.bootCheck = await bootCheck({
          images: ordered.map((i) => i.file), marker: b.marker, timeoutMs: b.timeoutMs, bus: b.bus, accel: b.accel,
          network: b.network === 'isolated' ? { kind: 'isolated', macs } : { kind: 'none' }, consoleLog,
          onLine: (line) => onConsole?.(ordered[0].diskId, line),
        });
        deps.log.info('boot check', { agent, point: point.id, ok: rec.bootCheck.ok, result: describeBootCheck(rec.bootCheck), consoleLog });
      } catch (err) {
        failure = toMobilityError(err);
      }
    }
    if (failure) rec.error = { step: 'boot-check', code: failure.code, message: failure.message };
  }
  await appendTestFailover(deps.agentDir(agent), rec).catch((err: Error) => deps.log.error('could not record a test failover', { agent, point: point.id, error: err.message }));
  if (failure) throw failure;
  return rec;
}
