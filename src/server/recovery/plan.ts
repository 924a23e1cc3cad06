/**
 * Recovery plans: the machines of an application brought up together, in order, from points
 * that are consistent across machines, on the right networks (Site Recovery's recovery plans).
 *
 * A plan lists **steps** in boot order; each step is a set of machines with optional pre and
 * post scripts and a boot check. A plan may name a **consistency group** (group-cut.ts): then
 * every machine recovers to the same group point. It may carry a **network mapping**
 * (network-mapping.ts), written into each machine whose NICs it covers, and a mapping of its
 * own per machine (networkMaps: by machine, instead of the plan's).
 *
 * Running it (runPlan), for a test failover or a failover:
 *   1. the points: the group point (latest, latest-app or an id; complete ones only), or each
 *      machine's own latest / latest-app point when the plan names no group;
 *   2. each step in order: its pre script, then each machine: images made (test failover) or
 *      promoted (failover), the mapping written, the boot check (the machine boots under QEMU
 *      and must reach its console marker), then the post script;
 *   3. a step that fails (a script that exits non-zero or overruns its time, a machine that
 *      cannot be made or does not boot) stops the plan: later steps do not run. The report
 *      says, per machine and per script, what happened.
 * Cleanup of a test failover removes the images every machine's test failover made, in reverse
 * order, at the points the last test failover of the plan used.
 *
 * Scripts run on the configuration server, as the server's user, with a time limit, and get in
 * their environment: MOBILITY_PLAN, MOBILITY_PLAN_RUN, MOBILITY_PLAN_KIND (test-failover or
 * failover), MOBILITY_PLAN_STEP (1-based), MOBILITY_PLAN_PHASE (pre or post),
 * MOBILITY_PLAN_MACHINES (the step's machines, comma-separated) and MOBILITY_PLAN_REPORT (a file
 * holding the report so far, JSON: the images, points and boot results of the machines done).
 */
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { ID_PATTERN } from '../../constants.js';
import { MobilityError, toMobilityError, type ErrorCode } from '../../errors.js';
import { parseMachineChecks, type MachineChecks } from './recovered-machine.js';
import { parseNetworkMapping, type NetworkMapping } from './network-mapping.js';

export const MAX_PLAN_STEPS = 32;
export const MAX_PLAN_MACHINES = 64;
export const DEFAULT_SCRIPT_TIMEOUT_MS = 10 * 60_000;
export const MAX_SCRIPT_TIMEOUT_MS = 6 * 3600_000;
/** Console or script output kept per item of a report. */
const TAIL_CHARS = 4000;

export interface PlanStep {
  machines: string[];
  /** Absolute path of an executable on the server, run before the step's machines. */
  pre: string | null;
  /** Run after every machine of the step came up. */
  post: string | null;
  /** The boot check of the step's machines ({marker?, timeoutMs?, bus?, accel?, network?, disk?}); null: images only. */
  bootCheck: Record<string, unknown> | null;
}

export interface RecoveryPlan {
  name: string;
  /** Consistency group whose group points the plan recovers to; null: each machine's own points. */
  group: string | null;
  steps: PlanStep[];
  /** Written into each machine whose NICs it covers. */
  networkMap: NetworkMapping | null;
  /** A machine's own mapping (by agent id), instead of networkMap. */
  networkMaps: Record<string, NetworkMapping>;
  scriptTimeoutMs: number;
  createdAt?: string;
  updatedAt?: string;
}

/** What validation needs from the configuration database. */
export interface PlanDb {
  /** The agent id of a machine given by id or host name; MOB_ERR_UNKNOWN_MACHINE. */
  resolveMachine(m: string): string;
  /** The members of a group; MOB_ERR_UNKNOWN_GROUP. */
  groupMembers(name: string): string[];
}

function usage(msg: string): MobilityError {
  return new MobilityError('MOB_ERR_PLAN', msg);
}

function script(v: unknown, what: string): string | null {
  if (v === undefined || v === null || v === '') return null;
  if (typeof v !== 'string' || !path.isAbsolute(v) || v.includes('\0')) throw usage(`${what} must be the absolute path of an executable on the server`);
  return path.normalize(v);
}

/**
 * A plan from its JSON form ({name, group?, steps: [{machines, pre?, post?, bootCheck?}],
 * networkMap?, scriptTimeoutMs?}), checked: machines resolved to agent ids, each in one step
 * only, every machine in the group when there is one, the boot checks and the mapping as test
 * failover checks them. MOB_ERR_PLAN names what is wrong (a bad mapping: MOB_ERR_NETWORK_MAP).
 */
export function parsePlan(b: unknown, db: PlanDb): RecoveryPlan {
  if (b === null || typeof b !== 'object' || Array.isArray(b)) throw usage('a recovery plan is a JSON object');
  const o = b as Record<string, unknown>;
  const name = o.name;
  if (typeof name !== 'string' || !ID_PATTERN.test(name)) throw usage(`plan name ${JSON.stringify(name)} is not [A-Za-z0-9._-]{1,64}`);
  const group = o.group === undefined || o.group === null || o.group === '' ? null : o.group;
  if (group !== null && typeof group !== 'string') throw usage('group must be the name of a consistency group');
  const members = group === null ? null : new Set(db.groupMembers(group));
  if (!Array.isArray(o.steps) || o.steps.length === 0) throw usage('steps must be a non-empty list of {machines, pre?, post?, bootCheck?}');
  if (o.steps.length > MAX_PLAN_STEPS) throw usage(`a plan has at most ${MAX_PLAN_STEPS} steps`);
  const seen = new Map<string, number>();
  const steps: PlanStep[] = o.steps.map((s: unknown, i: number) => {
    const where = `step ${i + 1}`;
    if (s === null || typeof s !== 'object' || Array.isArray(s)) throw usage(`${where} must be an object {machines, pre?, post?, bootCheck?}`);
    const st = s as Record<string, unknown>;
    if (!Array.isArray(st.machines) || st.machines.length === 0 || !st.machines.every((m) => typeof m === 'string' && m)) throw usage(`${where}: machines must be a non-empty list of machines (agent ids or host names)`);
    const machines = (st.machines as string[]).map((m) => db.resolveMachine(m));
    for (const m of machines) {
      if (seen.has(m)) throw usage(`machine ${m} is in step ${seen.get(m)! + 1} and in ${where}: a machine comes up once`);
      seen.set(m, i);
      if (members && !members.has(m)) throw usage(`machine ${m} (${where}) is not in consistency group ${group}: a plan on a group recovers the group's machines to one group point`);
    }
    let bootCheck: Record<string, unknown> | null = null;
    if (st.bootCheck !== undefined && st.bootCheck !== null && st.bootCheck !== false) {
      bootCheck = st.bootCheck === true ? {} : st.bootCheck as Record<string, unknown>;
      if (typeof bootCheck !== 'object' || Array.isArray(bootCheck)) throw usage(`${where}: bootCheck must be true or {marker?, timeoutMs?, bus?, accel?, network?, disk?}`);
      try {
        parseMachineChecks({ bootCheck });
      } catch (err) {
        const e = toMobilityError(err);
        throw new MobilityError(e.code, `${where}: ${e.message}`);
      }
    }
    return { machines, pre: script(st.pre, `${where}: pre`), post: script(st.post, `${where}: post`), bootCheck };
  });
  if (seen.size > MAX_PLAN_MACHINES) throw usage(`a plan holds at most ${MAX_PLAN_MACHINES} machines`);
  const networkMap = o.networkMap === undefined || o.networkMap === null ? null : parseNetworkMapping(o.networkMap);
  const networkMaps: Record<string, NetworkMapping> = {};
  if (o.networkMaps !== undefined && o.networkMaps !== null) {
    if (typeof o.networkMaps !== 'object' || Array.isArray(o.networkMaps)) throw usage('networkMaps must map machines to their network mappings');
    for (const [m, map] of Object.entries(o.networkMaps as Record<string, unknown>)) {
      const id = db.resolveMachine(m);
      if (!seen.has(id)) throw usage(`networkMaps names machine ${id}, which is in no step of the plan`);
      networkMaps[id] = parseNetworkMapping(map);
    }
  }
  const t = o.scriptTimeoutMs ?? DEFAULT_SCRIPT_TIMEOUT_MS;
  if (typeof t !== 'number' || !Number.isInteger(t) || t < 1000 || t > MAX_SCRIPT_TIMEOUT_MS) throw usage(`scriptTimeoutMs must be whole milliseconds from 1000 to ${MAX_SCRIPT_TIMEOUT_MS}`);
  return { name, group, steps, networkMap, networkMaps, scriptTimeoutMs: t };
}

/** The machines of a plan in boot order. */
export function planMachines(p: RecoveryPlan): string[] {
  return p.steps.flatMap((s) => s.machines);
}

// ---- Running a plan ------------------------------------------------------------------------

export type PlanRunKind = 'test-failover' | 'failover' | 'cleanup';

export interface ScriptResult { path: string; ok: boolean; exitCode: number | null; signal: string | null; timedOut: boolean; seconds: number; tail: string }

export interface MachineResult {
  agent: string;
  point: string | null;
  ok: boolean;
  /** What was made or promoted (test failover: images; failover: promoted images), or removed. */
  images: { diskId: string; location: string }[];
  networkMapping: unknown;
  bootCheck: { ok: boolean; seconds: number | null; reason: string; tail: string } | null;
  error: { code: ErrorCode; message: string } | null;
}

export interface StepResult { step: number; machines: string[]; ok: boolean; pre: ScriptResult | null; post: ScriptResult | null; results: MachineResult[]; skipped: boolean }

export interface PlanRunReport {
  plan: string;
  run: string;
  kind: PlanRunKind;
  group: string | null;
  /** The group point, when the plan names a group. */
  groupPoint: string | null;
  startedAt: string;
  endedAt: string;
  ok: boolean;
  /** Why the plan stopped (the first failure), null when it went through. */
  failure: string | null;
  steps: StepResult[];
}

/** What the runner needs from the server, one machine at a time. */
export interface PlanRunDeps {
  /** The point of each machine: the group point's parts, or each machine's own latest / latest-app. */
  resolvePoints(plan: RecoveryPlan, ref: string): Promise<{ groupPoint: string | null; points: Map<string, string> }>;
  /** Test failover of one machine at a point, with its checks; cleanup removes its images. */
  testFailover(agent: string, point: string, checks: MachineChecks | null, cleanup: boolean): Promise<MachineResult>;
  /** Failover of one machine (promotes the point), then its checks on the promoted images. */
  failover(agent: string, point: string, checks: MachineChecks | null): Promise<MachineResult>;
  /** The mapping's view for one machine: null when it covers none of its NICs. */
  mappingFor(agent: string, m: NetworkMapping): NetworkMapping | null;
  log?: (msg: string, meta: Record<string, unknown>) => void;
}

/**
 * Runs a plan. kind 'cleanup' removes the test-failover images at `points` (the last test
 * failover's), in reverse boot order, and never stops early. Never throws for a machine or a
 * script that fails: that is in the report; it throws only when the points cannot be resolved
 * (MOB_ERR_UNKNOWN_POINT and the like), before anything is made.
 */
export async function runPlan(deps: PlanRunDeps, plan: RecoveryPlan, o: { kind: PlanRunKind; ref: string; run: string; points?: Map<string, string>; groupPoint?: string | null }): Promise<PlanRunReport> {
  const startedAt = new Date().toISOString();
  let groupPoint: string | null;
  let points: Map<string, string>;
  if (o.kind === 'cleanup') {
    points = o.points ?? new Map();
    groupPoint = o.groupPoint ?? null;
  } else {
    ({ groupPoint, points } = await deps.resolvePoints(plan, o.ref));
  }
  const report: PlanRunReport = { plan: plan.name, run: o.run, kind: o.kind, group: plan.group, groupPoint, startedAt, endedAt: startedAt, ok: true, failure: null, steps: [] };
  const reportFile = path.join(os.tmpdir(), `mobility-plan-${process.pid}-${o.run}.json`);
  // the report so far, for the scripts; a failure to write it (a full /tmp) costs the scripts
  // their report, never the run
  const saveReport = () => fsp.writeFile(reportFile, JSON.stringify(report, null, 2), { mode: 0o600 }).catch(() => undefined);
  try {
    if (o.kind === 'cleanup') {
      for (const [i, s] of [...plan.steps.entries()].reverse()) {
        const sr: StepResult = { step: i + 1, machines: s.machines, ok: true, pre: null, post: null, results: [], skipped: false };
        for (const agent of [...s.machines].reverse()) {
          const point = points.get(agent);
          if (!point) continue;
          const r = await deps.testFailover(agent, point, null, true).catch((err: unknown) => failed(agent, point, err));
          sr.results.push(r);
          if (!r.ok) { sr.ok = false; report.ok = false; report.failure ??= `machine ${agent}: ${r.error?.message ?? 'cleanup failed'}`; }
        }
        report.steps.unshift(sr);
      }
      return report;
    }
    let stopped = false;
    for (const [i, s] of plan.steps.entries()) {
      const sr: StepResult = { step: i + 1, machines: s.machines, ok: true, pre: null, post: null, results: [], skipped: stopped };
      report.steps.push(sr);
      if (stopped) continue;
      const env = { MOBILITY_PLAN: plan.name, MOBILITY_PLAN_RUN: o.run, MOBILITY_PLAN_KIND: o.kind, MOBILITY_PLAN_STEP: String(i + 1), MOBILITY_PLAN_MACHINES: s.machines.join(','), MOBILITY_PLAN_REPORT: reportFile };
      const stop = (why: string) => { sr.ok = false; report.ok = false; report.failure = `step ${i + 1}: ${why}`; stopped = true; };
      if (s.pre) {
        await saveReport();
        sr.pre = await runScript(s.pre, { ...env, MOBILITY_PLAN_PHASE: 'pre' }, plan.scriptTimeoutMs);
        deps.log?.('recovery plan script', { plan: plan.name, step: i + 1, phase: 'pre', ok: sr.pre.ok, exitCode: sr.pre.exitCode });
        if (!sr.pre.ok) { stop(`pre script ${s.pre} ${describeScript(sr.pre)}`); continue; }
      }
      for (const agent of s.machines) {
        const point = points.get(agent);
        if (!point) {
          const r = failed(agent, null, new MobilityError('MOB_ERR_UNKNOWN_POINT', `machine ${agent} has no point to recover to`));
          sr.results.push(r);
          stop(`machine ${agent}: ${r.error!.message}`);
          break;
        }
        let r: MachineResult;
        try {
          const own = plan.networkMaps[agent];
          const networkMap = own ?? (plan.networkMap ? deps.mappingFor(agent, plan.networkMap) : null);
          const checks: MachineChecks | null = networkMap || s.bootCheck ? { networkMap, boot: parseMachineChecks({ bootCheck: s.bootCheck }).boot } : null;
          r = await (o.kind === 'failover' ? deps.failover(agent, point, checks) : deps.testFailover(agent, point, checks, false));
        } catch (err) {
          r = failed(agent, point, err);
        }
        sr.results.push(r);
        deps.log?.('recovery plan machine', { plan: plan.name, step: i + 1, agent, point, ok: r.ok, boot: r.bootCheck?.ok ?? null });
        if (!r.ok) { stop(`machine ${agent}: ${r.error?.message ?? (r.bootCheck && !r.bootCheck.ok ? `did not boot (${r.bootCheck.reason})` : 'failed')}`); break; }
      }
      if (stopped) continue;
      if (s.post) {
        await saveReport();
        sr.post = await runScript(s.post, { ...env, MOBILITY_PLAN_PHASE: 'post' }, plan.scriptTimeoutMs);
        deps.log?.('recovery plan script', { plan: plan.name, step: i + 1, phase: 'post', ok: sr.post.ok, exitCode: sr.post.exitCode });
        if (!sr.post.ok) stop(`post script ${s.post} ${describeScript(sr.post)}`);
      }
    }
    return report;
  } finally {
    report.endedAt = new Date().toISOString();
    await fsp.rm(reportFile, { force: true }).catch(() => undefined);
  }
}

function failed(agent: string, point: string | null, err: unknown): MachineResult {
  const e = toMobilityError(err);
  return { agent, point, ok: false, images: [], networkMapping: null, bootCheck: null, error: { code: e.code, message: e.message } };
}

function describeScript(r: ScriptResult): string {
  if (r.timedOut) return `ran longer than its time limit (${r.seconds.toFixed(0)} s) and was stopped`;
  if (r.exitCode === null) return `could not run or was killed (${r.signal ?? 'no exit code'})${r.tail ? `: ${r.tail.split('\n').slice(-1)[0]}` : ''}`;
  return `exited with ${r.exitCode}`;
}

/** Runs a script with a time limit (SIGTERM, then SIGKILL 5 s later, to its whole process group). */
export function runScript(file: string, env: Record<string, string>, timeoutMs: number): Promise<ScriptResult> {
  const started = performance.now();
  return new Promise((resolve) => {
    let tail = '';
    let timedOut = false;
    const add = (d: Buffer) => { tail = (tail + d.toString('utf8')).slice(-TAIL_CHARS); };
    let child;
    try {
      fs.accessSync(file, fs.constants.X_OK);
      child = spawn(file, [], { env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'], detached: true });
    } catch (err) {
      resolve({ path: file, ok: false, exitCode: null, signal: null, timedOut: false, seconds: 0, tail: `cannot run ${file}: ${(err as Error).message}` });
      return;
    }
    const c = child;
    c.stdout!.on('data', add);
    c.stderr!.on('data', add);
    const kill = (sig: NodeJS.Signals) => { try { process.kill(-c.pid!, sig); } catch { /* gone */ } };
    let hard: NodeJS.Timeout | undefined;
    const timer = setTimeout(() => { timedOut = true; kill('SIGTERM'); hard = setTimeout(() => kill('SIGKILL'), 5000); }, timeoutMs);
    c.on('error', (err) => add(Buffer.from(`\n${err.message}`)));
    let done = false;
    const settle = (code: number | null, signal: NodeJS.Signals | null) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      if (hard) clearTimeout(hard);
      clearTimeout(last);
      // a child the script left running (a daemon it started) may keep the pipes open: not ours to wait for
      c.stdout!.destroy();
      c.stderr!.destroy();
      const seconds = (performance.now() - started) / 1000;
      resolve({ path: file, ok: code === 0 && !timedOut, exitCode: code, signal, timedOut, seconds, tail: tail.trim() });
    };
    // the script's own exit decides; its output is read for up to a second more
    c.on('exit', (code, signal) => { clearTimeout(timer); setTimeout(() => settle(code, signal), 1000).unref(); });
    c.on('close', (code, signal) => settle(code, signal));
    // whatever happens (a process that ignores every signal, a pipe held open), the run ends
    const last = setTimeout(() => { kill('SIGKILL'); settle(null, 'SIGKILL'); }, timeoutMs + 10_000);
  });
}
