/**
 * Recovery plan endpoints of the operator API (bearer token), see server/recovery/plan.ts:
 *
 *   GET  /v1/recovery-plans                        the plans, each with its last run
 *   POST /v1/recovery-plans                        {plan}: create or replace a plan (checked)
 *   POST /v1/recovery-plans/delete                 {name}
 *   GET  /v1/recovery-plans/runs?name=P            a plan's runs, newest first, with their reports
 *   POST /v1/recovery-plans/test-failover          {name, point?, cleanup?, stream?}: run it (or clean it up)
 *   POST /v1/recovery-plans/failover               {name, point?, stream?}: fail every machine over, in order
 *
 * A run answers its report when it ends (a plan that fails is a report with ok false, not an
 * error); with stream: true, newline-delimited JSON: {type: "progress", ...} per script and
 * machine as they end, then {type: "result", ...report} or {type: "error", code, message}.
 */
import type { IncomingMessage, ServerResponse } from 'node:http';
import { randomUUID } from 'node:crypto';
import { MobilityError, isErrorCode, toMobilityError } from '../../errors.js';
import type { RecoveryPoint } from '../../target/catalog.js';
import type { ServerContext } from '../context.js';
import { failover } from '../failover.js';
import { checkRecoveredMachine, type MachineCheckDeps, type MachineChecks } from '../recovery/recovered-machine.js';
import { resolveNics, type NetworkMapping } from '../recovery/network-mapping.js';
import { parsePlan, planMachines, runPlan, type MachineResult, type PlanDb, type PlanRunDeps, type PlanRunKind, type PlanRunReport, type RecoveryPlan } from '../recovery/plan.js';
import type { InventoryNic } from '../../agent/inventory.js';
import type { TestFailoverRecord } from '../recovery/test-failover-record.js';
import { readBody, send } from './http-util.js';

/** What a test failover of one machine answers, as far as a plan reads it (api.ts's TestFailoverResult). */
interface MachineTestFailover { point: RecoveryPoint; disks: { diskId: string; location: string }[]; record?: TestFailoverRecord }

/** What the plan endpoints take from the JSON API (passed in: api.ts imports this module). */
export interface PlanApiHooks {
  testFailover(server: ServerContext, agent: string, ref: string, o: { cleanup?: boolean; checks?: MachineChecks }): Promise<MachineTestFailover>;
  groupPoints(server: ServerContext, group: string): Promise<{ id: string; complete: boolean; kind: 'crash' | 'app'; points: Record<string, RecoveryPoint> }[]>;
  machineCheckDeps(server: ServerContext): MachineCheckDeps;
  inventoryNics(server: ServerContext, agent: string): InventoryNic[];
}

/** Plans running now, by name: one run of a plan at a time. */
const running = new Set<string>();
/**
 * Machines being recovered now, and by what ("a run of recovery plan shop", "a test failover",
 * "a failover"): one recovery of a machine at a time, or two would make, map, boot or clean up
 * the same images.
 */
const busyMachines = new Map<string, string>();

/**
 * Marks the machines as recovered by `holder` until the returned release is called; refuses
 * (MOB_ERR_PLAN, nothing held) when one of them is being recovered already.
 */
export function holdMachines(machines: string[], holder: string): () => void {
  const taken = machines.find((m) => busyMachines.has(m));
  if (taken) throw new MobilityError('MOB_ERR_PLAN', `machine ${taken} is being recovered by ${busyMachines.get(taken)}; wait for it to end`);
  const mine = [...new Set(machines)];
  for (const m of mine) busyMachines.set(m, holder);
  return () => { for (const m of mine) if (busyMachines.get(m) === holder) busyMachines.delete(m); };
}

function planDb(server: ServerContext): PlanDb {
  return {
    resolveMachine: (m) => server.db.findAgent(m).id,
    groupMembers: (g) => server.db.getGroup(g).members,
  };
}

/** A stored plan, checked again (a machine or group removed since makes it unusable: MOB_ERR_PLAN). */
function loadPlan(server: ServerContext, name: string): RecoveryPlan {
  const p = server.db.getPlan(name);
  try {
    return { ...parsePlan(p.spec, planDb(server)), createdAt: p.createdAt, updatedAt: p.updatedAt };
  } catch (err) {
    const e = toMobilityError(err);
    throw new MobilityError(e.code === 'MOB_ERR_UNKNOWN_MACHINE' || e.code === 'MOB_ERR_UNKNOWN_GROUP' ? 'MOB_ERR_PLAN' : e.code, `recovery plan ${name} no longer fits this server: ${e.message} (fix it with mobility recovery-plan create)`);
  }
}

function machineResult(agent: string, r: { point: { id: string }; disks: { diskId: string; location: string }[]; record?: TestFailoverRecord }, removed = false): MachineResult {
  const rec = r.record ?? null;
  const boot = rec?.bootCheck ?? null;
  const error = rec?.error ? { code: isErrorCode(rec.error.code) ? rec.error.code : 'MOB_ERR_BOOT_CHECK' as const, message: `${rec.error.step}: ${rec.error.message}` } : null;
  return {
    agent, point: r.point.id, ok: !error && (boot === null || boot.ok),
    images: removed ? [] : r.disks.map((d) => ({ diskId: d.diskId, location: d.location })),
    networkMapping: rec?.networkMapping ?? null,
    bootCheck: boot ? { ok: boot.ok, seconds: boot.seconds, reason: boot.reason, tail: boot.tail.slice(-20).join('\n') } : null,
    error,
  };
}

function planRunDeps(server: ServerContext, hooks: PlanApiHooks, progress: (m: Record<string, unknown>) => void): PlanRunDeps {
  return {
    async resolvePoints(plan, ref) {
      const machines = planMachines(plan);
      if (plan.group !== null) {
        const all = await hooks.groupPoints(server, plan.group);
        const complete = all.filter((p) => p.complete);
        const gp = ref === 'latest' ? complete[complete.length - 1]
          : ref === 'latest-app' ? [...complete].reverse().find((p) => p.kind === 'app')
            : all.find((p) => p.id === ref);
        if (!gp) throw new MobilityError('MOB_ERR_UNKNOWN_POINT', ref.startsWith('latest') ? `group ${plan.group} has no complete ${ref === 'latest-app' ? 'app-consistent ' : ''}group point (mobility group cut ${plan.group})` : `group ${plan.group} has no group point ${ref}`);
        if (!gp.complete) throw new MobilityError('MOB_ERR_UNKNOWN_POINT', `group point ${gp.id} is incomplete: a plan recovers every machine to one group point`);
        const points = new Map<string, string>();
        for (const m of machines) {
          const p = gp.points[m];
          if (!p) throw new MobilityError('MOB_ERR_UNKNOWN_POINT', `group point ${gp.id} has no part on machine ${m}`);
          points.set(m, p.id);
        }
        return { groupPoint: gp.id, points };
      }
      if (ref !== 'latest' && ref !== 'latest-app') throw new MobilityError('MOB_ERR_PLAN', `plan ${plan.name} names no consistency group: its machines recover to their own latest or latest-app points, not to point ${ref}`);
      const points = new Map<string, string>();
      for (const m of machines) points.set(m, (await server.catalog(m)).resolve(ref).id);
      return { groupPoint: null, points };
    },
    async testFailover(agent, point, checks, cleanup) {
      const r = await hooks.testFailover(server, agent, point, { cleanup, ...(checks ? { checks } : {}) });
      return machineResult(agent, r, cleanup);
    },
    async failover(agent, point, checks) {
      // no final cut: a plan recovers to the point it resolved (a group point is on every machine)
      const r = await failover(server, agent, point, false);
      if (!checks) return machineResult(agent, { point: r.point, disks: r.disks });
      // the machine is failed over from here on: a check that cannot run is reported with its images
      try {
        const images = r.disks.map((d) => ({ diskId: d.diskId, file: d.localPath }));
        if (images.some((i) => i.file === null)) throw new MobilityError('MOB_ERR_BOOT_CHECK', `the ${server.backend.kind} store keeps failover images remotely: a network mapping or boot check of a plan failover needs local images`);
        const record = await checkRecoveredMachine(hooks.machineCheckDeps(server), agent, r.point, images as { diskId: string; file: string }[], checks);
        return machineResult(agent, { point: r.point, disks: r.disks, record });
      } catch (err) {
        const e = toMobilityError(err);
        return { ...machineResult(agent, { point: r.point, disks: r.disks }), ok: false, error: { code: e.code, message: `failed over, then: ${e.message}` } };
      }
    },
    mappingFor(agent, m: NetworkMapping) {
      try {
        resolveNics(m, hooks.inventoryNics(server, agent));
        return m;
      } catch (err) {
        // a plan's mapping covers the networks of some machines only: the others keep theirs
        if (err instanceof MobilityError && err.code === 'MOB_ERR_NETWORK_MAP' && /no NIC of the machine is in a mapped source network/.test(err.message)) return null;
        throw err;
      }
    },
    log: (msg, meta) => {
      server.log.info(msg, meta);
      progress({ type: 'progress', what: msg, ...meta });
    },
  };
}

async function run(server: ServerContext, hooks: PlanApiHooks, name: string, kind: PlanRunKind, ref: string, progress: (m: Record<string, unknown>) => void): Promise<PlanRunReport> {
  const plan = loadPlan(server, name);
  if (running.has(plan.name)) throw new MobilityError('MOB_ERR_PLAN', `a run of recovery plan ${plan.name} is going on; wait for it to end`);
  // another plan, or a direct test failover or failover, on one of its machines would make, map
  // and boot the same images at once
  const release = holdMachines(planMachines(plan), `a run of recovery plan ${plan.name}`);
  running.add(plan.name);
  try {
    let points: Map<string, string> | undefined;
    let groupPoint: string | null = null;
    if (kind === 'cleanup') {
      // the newest test failover that made something (one that failed before making anything,
      // or was cut short with no report, has nothing to clean up)
      const pointsOf = (rep: PlanRunReport | null) => new Map((rep?.steps ?? []).flatMap((s) => s.results.filter((x) => x.point !== null && (x.images.length > 0 || !x.ok)).map((x) => [x.agent, x.point!] as [string, string])));
      const last = server.db.listPlanRuns(plan.name, 50).find((r) => r.kind === 'test-failover' && pointsOf(r.report as PlanRunReport | null).size > 0);
      if (!last) throw new MobilityError('MOB_ERR_PLAN', `recovery plan ${plan.name} has no test failover to clean up`);
      const rep = last.report as PlanRunReport;
      points = pointsOf(rep);
      groupPoint = rep.groupPoint;
    }
    const id = `${new Date().toISOString().replace(/[-:.]/g, '').slice(0, 15)}-${randomUUID().slice(0, 8)}`;
    server.db.startPlanRun(id, plan.name, kind);
    let report: PlanRunReport;
    try {
      report = await runPlan(planRunDeps(server, hooks, progress), plan, { kind, ref, run: id, points, groupPoint });
    } catch (err) {
      const e = toMobilityError(err);
      server.db.endPlanRun(id, false, { plan: plan.name, run: id, kind, ok: false, failure: `${e.code}: ${e.message}`, steps: [] });
      throw err;
    }
    server.db.endPlanRun(id, report.ok, report);
    server.log.info('recovery plan run ended', { plan: plan.name, run: id, kind, ok: report.ok, failure: report.failure });
    return report;
  } finally {
    running.delete(plan.name);
    release();
  }
}

function strField(v: unknown, what: string): string {
  if (typeof v !== 'string' || !v) throw new MobilityError('MOB_ERR_USAGE', `${what} must be a non-empty string`);
  return v;
}

export async function handlePlanApi(server: ServerContext, req: IncomingMessage, res: ServerResponse, url: URL, hooks: PlanApiHooks): Promise<boolean> {
  if (!url.pathname.startsWith('/v1/recovery-plans')) return false;
  const route = `${req.method} ${url.pathname}`;
  switch (route) {
    case 'GET /v1/recovery-plans': {
      const plans = server.db.listPlans().map((p) => ({ ...(p.spec as object), createdAt: p.createdAt, updatedAt: p.updatedAt, lastRun: server.db.listPlanRuns(p.name, 1)[0] ?? null }));
      send(res, 200, { plans, running: [...running] });
      return true;
    }
    case 'POST /v1/recovery-plans': {
      const b = await readBody(req);
      const plan = parsePlan(b.plan, planDb(server));
      if (running.has(plan.name)) throw new MobilityError('MOB_ERR_PLAN', `a run of recovery plan ${plan.name} is going on; change it when the run ends`);
      const times = server.db.putPlan(plan.name, plan);
      server.log.info('recovery plan saved', { plan: plan.name, machines: planMachines(plan), group: plan.group });
      send(res, 200, { plan: { ...plan, ...times } });
      return true;
    }
    case 'POST /v1/recovery-plans/delete': {
      const b = await readBody(req);
      const name = strField(b.name, 'name');
      server.db.getPlan(name);
      if (running.has(name)) throw new MobilityError('MOB_ERR_PLAN', `a run of recovery plan ${name} is going on; delete it when the run ends`);
      server.db.deletePlan(name);
      server.log.info('recovery plan removed', { plan: name });
      send(res, 200, { removed: name });
      return true;
    }
    case 'GET /v1/recovery-plans/runs': {
      const name = strField(url.searchParams.get('name'), 'name');
      server.db.getPlan(name);
      send(res, 200, { plan: name, runs: server.db.listPlanRuns(name) });
      return true;
    }
    case 'POST /v1/recovery-plans/test-failover':
    case 'POST /v1/recovery-plans/failover': {
      const b = await readBody(req);
      const name = strField(b.name, 'name');
      const ref = b.point === undefined || b.point === null ? 'latest' : strField(b.point, 'point');
      const kind: PlanRunKind = url.pathname.endsWith('/failover') ? 'failover' : b.cleanup === true ? 'cleanup' : 'test-failover';
      if (kind === 'failover' && b.cleanup === true) throw new MobilityError('MOB_ERR_USAGE', 'cleanup goes with test-failover');
      if (b.stream === true) {
        res.writeHead(200, { 'content-type': 'application/x-ndjson' });
        const line = (m: Record<string, unknown>) => { if (!res.writableEnded) res.write(JSON.stringify(m) + '\n'); };
        try {
          const report = await run(server, hooks, name, kind, ref, line);
          line({ type: 'result', ...report });
        } catch (err) {
          const e = toMobilityError(err);
          line({ type: 'error', code: e.code, message: e.message });
        }
        res.end();
        return true;
      }
      send(res, 200, await run(server, hooks, name, kind, ref, () => undefined));
      return true;
    }
    default:
      return false;
  }
}
