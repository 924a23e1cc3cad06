/**
 * `mobility recovery-plan`: recovery plans (server/recovery/plan.ts) from the CLI: create one from
 * a JSON file, list, show, delete, and run it: test failover (and its cleanup) or failover.
 */
import fsp from 'node:fs/promises';
import { MobilityError, isErrorCode } from '../errors.js';
import { CONN_HELP, CONN_OPTIONS, api, apiStream, serverConn } from './api-client.js';
import { EXIT, parse, type Values } from './args.js';
import { confirmDestructive } from './confirm.js';
import { table } from './progress.js';
import type { PlanRunReport, RecoveryPlan } from '../server/recovery/plan.js';

export const PLAN_HELP = `Usage: mobility recovery-plan create --file PLAN.json [connection options] [--json]
       mobility recovery-plan list | show NAME | runs NAME [connection options] [--json]
       mobility recovery-plan delete NAME [--yes] [connection options]
       mobility recovery-plan test-failover NAME [--point latest|latest-app|ID] [--cleanup] [connection options] [--json]
       mobility recovery-plan failover NAME [--point latest|latest-app|ID] [--yes] [connection options] [--json]

A recovery plan brings the machines of an application up together: steps in boot order, each
a set of machines with optional pre and post scripts (run on the server) and a boot check;
a consistency group, so that every machine recovers to the same group point; and a network
mapping, written into each machine whose NICs it covers. PLAN.json:

  {"name": "shop", "group": "shop",
   "steps": [{"machines": ["db1"], "bootCheck": {"marker": "login:"}, "post": "/srv/dr/check-db.sh"},
             {"machines": ["app1", "web1"], "pre": "/srv/dr/before-app.sh", "bootCheck": true}],
   "networkMap": {...as mobility test-failover --network-map...},
   "networkMaps": {"db1": {...a mapping of db1's own, instead of networkMap...}}, "scriptTimeoutMs": 600000}

test-failover runs it: the points (the group point, or each machine's own latest / latest-app),
then each step in order: pre script, each machine's test-failover images, the mapping, the
boot check, post script. A step that fails stops the plan; the report says what happened to
every machine and script (exit 1 when the plan failed). --cleanup removes what the last test
failover of the plan made. failover does the same with real failovers (replication of each
machine stops; asks first, --yes elsewhere). Scripts get MOBILITY_PLAN, MOBILITY_PLAN_RUN,
MOBILITY_PLAN_KIND, MOBILITY_PLAN_STEP, MOBILITY_PLAN_PHASE, MOBILITY_PLAN_MACHINES and
MOBILITY_PLAN_REPORT (a JSON file: the report so far) in their environment.
${CONN_HELP}`;

function fmtPlan(p: RecoveryPlan & { lastRun?: { kind: string; startedAt: string; ok: boolean | null } | null }): string {
  const rows = [['STEP', 'MACHINES', 'PRE', 'POST', 'BOOT CHECK']];
  p.steps.forEach((s, i) => rows.push([String(i + 1), s.machines.join(', '), s.pre ?? '-', s.post ?? '-', s.bootCheck ? (typeof s.bootCheck.marker === 'string' ? `marker ${s.bootCheck.marker}` : 'default marker') : '-']));
  const last = p.lastRun ? `last run: ${p.lastRun.kind} at ${p.lastRun.startedAt}, ${p.lastRun.ok === null ? 'running' : p.lastRun.ok ? 'ok' : 'FAILED'}` : 'never run';
  return `plan ${p.name}: ${p.group ? `group ${p.group} (one group point for every machine)` : 'no group (each machine at its own point)'}, `
    + `${p.networkMap ? 'a network mapping' : 'no network mapping'}${Object.keys(p.networkMaps ?? {}).length ? ` (own mappings: ${Object.keys(p.networkMaps).join(', ')})` : ''}, scripts limited to ${Math.round(p.scriptTimeoutMs / 1000)} s; ${last}\n${table(rows)}`;
}

export function formatReport(r: PlanRunReport): string {
  const rows = [['STEP', 'WHAT', 'POINT', 'RESULT']];
  for (const s of r.steps) {
    if (s.skipped) { rows.push([String(s.step), s.machines.join(', '), '-', 'not run (an earlier step failed)']); continue; }
    if (s.pre) rows.push([String(s.step), `pre ${s.pre.path}`, '-', s.pre.ok ? `ok (${s.pre.seconds.toFixed(1)} s)` : `FAILED (exit ${s.pre.exitCode ?? s.pre.signal ?? '?'}${s.pre.timedOut ? ', time limit' : ''})`]);
    for (const m of s.results) {
      const boot = m.bootCheck ? (m.bootCheck.ok ? `booted in ${m.bootCheck.seconds?.toFixed(1)} s` : `DID NOT BOOT (${m.bootCheck.reason})`) : null;
      const res = m.error ? `FAILED: ${m.error.code}: ${m.error.message}` : [r.kind === 'cleanup' ? 'images removed' : `${m.images.length} image(s)`, m.networkMapping ? 'network mapped' : null, boot].filter(Boolean).join(', ');
      rows.push([String(s.step), `machine ${m.agent}`, m.point ?? '-', res]);
    }
    if (s.post) rows.push([String(s.step), `post ${s.post.path}`, '-', s.post.ok ? `ok (${s.post.seconds.toFixed(1)} s)` : `FAILED (exit ${s.post.exitCode ?? s.post.signal ?? '?'}${s.post.timedOut ? ', time limit' : ''})`]);
  }
  let out = `recovery plan ${r.plan}, ${r.kind} run ${r.run}${r.groupPoint ? ` at group point ${r.groupPoint}` : ''}: ${r.ok ? 'OK' : `FAILED: ${r.failure}`}\n${table(rows)}`;
  const tails = r.steps.flatMap((s) => [...(s.pre && !s.pre.ok ? [[`pre ${s.pre.path}`, s.pre.tail]] : []), ...s.results.filter((m) => m.bootCheck && !m.bootCheck.ok).map((m) => [`console of ${m.agent}`, m.bootCheck!.tail]), ...(s.post && !s.post.ok ? [[`post ${s.post.path}`, s.post.tail]] : [])]);
  for (const [what, tail] of tails) out += `\nlast lines of ${what}:\n${tail ? tail.split('\n').map((l) => `  ${l}`).join('\n') : '  (nothing)'}\n`;
  return out;
}

async function runStreamed(v: Values, pathname: string, body: Record<string, unknown>): Promise<PlanRunReport> {
  const c = await serverConn(v);
  let result: PlanRunReport | null = null;
  for await (const line of apiStream(c, 'POST', pathname, { ...body, stream: true })) {
    if (line.type === 'progress') {
      if (!v.json) {
        const what = line.what === 'recovery plan script' ? `step ${String(line.step)}: ${String(line.phase)} script ${line.ok ? 'ok' : `FAILED (exit ${String(line.exitCode)})`}`
          : `step ${String(line.step)}: machine ${String(line.agent)} at ${String(line.point)} ${line.ok ? 'ok' : 'FAILED'}${line.boot === true ? ', booted' : line.boot === false ? ', did not boot' : ''}`;
        process.stderr.write(`${what}\n`);
      }
    } else if (line.type === 'error') {
      const code = typeof line.code === 'string' && isErrorCode(line.code) ? line.code : 'MOB_ERR_INTERNAL';
      throw new MobilityError(code, `server: ${String(line.message)}`);
    } else if (line.type === 'result') {
      const { type: _t, ...rest } = line;
      result = rest as unknown as PlanRunReport;
    }
  }
  if (!result) throw new MobilityError('MOB_ERR_UNREACHABLE', 'the server ended the run\'s answer without a result');
  return result;
}

export async function cmdRecoveryPlan(argv: string[]): Promise<number> {
  const [sub, ...rest] = argv;
  const { values: v, positionals } = parse(rest, { ...CONN_OPTIONS, file: { type: 'string' }, point: { type: 'string' }, cleanup: { type: 'boolean' }, yes: { type: 'boolean', short: 'y' }, json: { type: 'boolean' } }, true);
  if (v.help || sub === undefined || sub === '--help' || sub === '-h') { process.stdout.write(PLAN_HELP); return sub === undefined && !v.help ? EXIT.USAGE : EXIT.OK; }
  const out = (j: unknown, text: () => string) => process.stdout.write(v.json ? JSON.stringify(j, null, 2) + '\n' : text());
  const name = () => {
    const n = positionals[0];
    if (!n) throw new MobilityError('MOB_ERR_USAGE', `recovery-plan ${sub} needs the plan's name`);
    return n;
  };
  switch (sub) {
    case 'create': {
      const file = v.file as string | undefined;
      if (!file) throw new MobilityError('MOB_ERR_USAGE', 'recovery-plan create needs --file PLAN.json');
      let plan: unknown;
      try { plan = JSON.parse(await fsp.readFile(file, 'utf8')) as unknown; } catch (err) {
        throw new MobilityError('MOB_ERR_PLAN', `cannot read the plan ${file}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
      }
      if (positionals[0] && plan && typeof plan === 'object' && (plan as { name?: unknown }).name === undefined) (plan as { name?: unknown }).name = positionals[0];
      const j = await api(await serverConn(v), 'POST', '/v1/recovery-plans', { plan });
      out(j, () => `saved\n${fmtPlan(j.plan as RecoveryPlan)}`);
      return EXIT.OK;
    }
    case 'list': case 'show': {
      const j = await api(await serverConn(v), 'GET', '/v1/recovery-plans');
      const plans = j.plans as (RecoveryPlan & { lastRun: { kind: string; startedAt: string; ok: boolean | null } | null })[];
      if (sub === 'show') {
        const p = plans.find((x) => x.name === name());
        if (!p) throw new MobilityError('MOB_ERR_UNKNOWN_PLAN', `no recovery plan named ${JSON.stringify(name())} (see mobility recovery-plan list)`);
        out(p, () => fmtPlan(p));
        return EXIT.OK;
      }
      out(j, () => plans.length === 0 ? 'no recovery plans\n' : table([['PLAN', 'GROUP', 'STEPS', 'MACHINES', 'LAST RUN'],
        ...plans.map((p) => [p.name, p.group ?? '-', String(p.steps.length), p.steps.flatMap((s) => s.machines).join(', '), p.lastRun ? `${p.lastRun.kind} ${p.lastRun.startedAt} ${p.lastRun.ok === null ? 'running' : p.lastRun.ok ? 'ok' : 'FAILED'}` : '-'])]));
      return EXIT.OK;
    }
    case 'runs': {
      const j = await api(await serverConn(v), 'GET', `/v1/recovery-plans/runs?name=${encodeURIComponent(name())}`);
      const runs = j.runs as { id: string; kind: string; startedAt: string; endedAt: string | null; ok: boolean | null; report: PlanRunReport | null }[];
      out(j, () => runs.length === 0 ? 'no runs\n' : table([['RUN', 'KIND', 'STARTED', 'ENDED', 'RESULT'], ...runs.map((r) => [r.id, r.kind, r.startedAt, r.endedAt ?? '-', r.ok === null ? 'running' : r.ok ? 'ok' : `FAILED: ${r.report?.failure ?? ''}`])]));
      return EXIT.OK;
    }
    case 'delete': {
      const n = name();
      await confirmDestructive({ yes: Boolean(v.yes), command: 'recovery-plan delete', summary: `recovery-plan delete removes plan ${n} and its run history (no machine, point or image is touched)` });
      const j = await api(await serverConn(v), 'POST', '/v1/recovery-plans/delete', { name: n });
      out(j, () => `removed plan ${n}\n`);
      return EXIT.OK;
    }
    case 'test-failover': case 'failover': {
      const n = name();
      if (sub === 'failover') {
        if (v.cleanup) throw new MobilityError('MOB_ERR_USAGE', '--cleanup goes with test-failover');
        await confirmDestructive({ yes: Boolean(v.yes), command: 'recovery-plan failover', summary: `recovery-plan failover stops replication of every machine of plan ${n} and promotes their points, step by step` });
      }
      const r = await runStreamed(v, `/v1/recovery-plans/${sub}`, { name: n, ...(v.point !== undefined ? { point: v.point } : {}), cleanup: Boolean(v.cleanup) });
      out(r, () => formatReport(r));
      return r.ok ? EXIT.OK : EXIT.ERROR;
    }
    default:
      throw new MobilityError('MOB_ERR_USAGE', `unknown recovery-plan command ${JSON.stringify(sub)} (create, list, show, runs, delete, test-failover, failover)`);
  }
}
