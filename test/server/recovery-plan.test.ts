/**
 * Recovery plans (src/server/recovery/plan.ts): what a plan may hold, and how it runs: steps
 * in order, real scripts with their environment and time limit, a failing step stopping the
 * rest, per-machine mapping, cleanup in reverse order. The machines are stand-ins here (the
 * end-to-end test runs a plan against a real server and agents).
 */
import t from 'tap';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { MobilityError } from '../../src/errors.js';
import { parsePlan, runPlan, runScript, type MachineResult, type PlanDb, type PlanRunDeps, type RecoveryPlan } from '../../src/server/recovery/plan.js';
import type { MachineChecks } from '../../src/server/recovery/recovered-machine.js';
import { tmpDir } from '../helpers.js';

const db: PlanDb = {
  resolveMachine: (m) => {
    const known: Record<string, string> = { db1: 'agent-db', 'agent-db': 'agent-db', app1: 'agent-app', 'agent-app': 'agent-app', web1: 'agent-web', 'agent-web': 'agent-web', lone: 'agent-lone' };
    if (!known[m]) throw new MobilityError('MOB_ERR_UNKNOWN_MACHINE', `no machine ${m}`);
    return known[m]!;
  },
  groupMembers: (g) => {
    if (g !== 'shop') throw new MobilityError('MOB_ERR_UNKNOWN_GROUP', `no group ${g}`);
    return ['agent-db', 'agent-app', 'agent-web'];
  },
};

const MAP = { version: 1, networks: [{ source: '10.0.0.0/24', target: { subnet: '192.168.50.0/24', gateway: '192.168.50.1', dns: ['192.168.50.53'] } }] };

t.test('parsePlan: resolves machines, refuses what cannot run, with the field named', async (t) => {
  const p = parsePlan({ name: 'shop', group: 'shop', steps: [{ machines: ['db1'], bootCheck: { marker: 'login:' } }, { machines: ['app1', 'web1'], pre: '/srv/x.sh', bootCheck: true }], networkMap: MAP }, db);
  t.same(p.steps.map((s) => s.machines), [['agent-db'], ['agent-app', 'agent-web']], 'host names resolved to agent ids, order kept');
  t.equal(p.steps[1]!.pre, '/srv/x.sh');
  t.same(p.steps[1]!.bootCheck, {}, 'bootCheck true: the defaults');
  t.equal(p.scriptTimeoutMs, 600_000);
  const bad: [string, unknown, RegExp, string?][] = [
    ['not an object', [], /JSON object/],
    ['a bad name', { name: 'a b', steps: [{ machines: ['db1'] }] }, /plan name/],
    ['no steps', { name: 'p', steps: [] }, /non-empty list/],
    ['a step without machines', { name: 'p', steps: [{ machines: [] }] }, /step 1: machines/],
    ['a machine twice', { name: 'p', steps: [{ machines: ['db1'] }, { machines: ['agent-db'] }] }, /machine agent-db is in step 1 and in step 2/],
    ['outside the group', { name: 'p', group: 'shop', steps: [{ machines: ['lone'] }] }, /not in consistency group shop/],
    ['a relative script', { name: 'p', steps: [{ machines: ['db1'], post: 'x.sh' }] }, /step 1: post must be the absolute path/],
    ['a bad boot check', { name: 'p', steps: [{ machines: ['db1'], bootCheck: { bus: 'scsi' } }] }, /step 1: bootCheck.bus must be one of/, 'MOB_ERR_USAGE'],
    ['a bad time limit', { name: 'p', steps: [{ machines: ['db1'] }], scriptTimeoutMs: 5 }, /scriptTimeoutMs/],
    ['an unknown machine', { name: 'p', steps: [{ machines: ['nosuch'] }] }, /no machine nosuch/, 'MOB_ERR_UNKNOWN_MACHINE'],
    ['an unknown group', { name: 'p', group: 'g2', steps: [{ machines: ['db1'] }] }, /no group g2/, 'MOB_ERR_UNKNOWN_GROUP'],
    ['a bad mapping', { name: 'p', steps: [{ machines: ['db1'] }], networkMap: { version: 9 } }, /./, 'MOB_ERR_NETWORK_MAP'],
    ['a mapping of a machine outside the plan', { name: 'p', steps: [{ machines: ['db1'] }], networkMaps: { app1: MAP } }, /networkMaps names machine agent-app, which is in no step/],
  ];
  for (const [what, plan, re, code] of bad) {
    t.throws(() => parsePlan(plan, db), { code: code ?? 'MOB_ERR_PLAN', message: re }, what);
  }
});

/** Scripted machines: records what the runner asked, answers as told. */
class FakeMachines {
  calls: string[] = [];
  bootFails = new Set<string>();
  mappable = new Set(['agent-db', 'agent-web']);
  deps(): PlanRunDeps {
    return {
      resolvePoints: async (plan, ref) => {
        this.calls.push(`points ${ref}`);
        if (ref === 'gp-missing') throw new MobilityError('MOB_ERR_UNKNOWN_POINT', 'no such group point');
        return { groupPoint: plan.group ? 'gp-7' : null, points: new Map(plan.steps.flatMap((s) => s.machines).map((m) => [m, `rp-${m}`])) };
      },
      testFailover: async (agent, point, checks: MachineChecks | null, cleanup) => {
        this.calls.push(`${cleanup ? 'cleanup' : 'tf'} ${agent}@${point}${checks?.networkMap ? ' +map' : ''}${checks?.boot ? ` +boot(${checks.boot.marker})` : ''}`);
        const booted = checks?.boot ? !this.bootFails.has(agent) : null;
        return { agent, point, ok: booted !== false, images: [{ diskId: 'd0', location: `/img/${agent}` }], networkMapping: checks?.networkMap ? { stack: 'networkd' } : null,
          bootCheck: booted === null ? null : { ok: booted, seconds: 3, reason: booted ? 'marker' : 'timeout', tail: booted ? '' : 'Kernel panic' }, error: null } satisfies MachineResult;
      },
      failover: async (agent, point) => {
        this.calls.push(`failover ${agent}@${point}`);
        return { agent, point, ok: true, images: [], networkMapping: null, bootCheck: null, error: null };
      },
      mappingFor: (agent, m) => (this.mappable.has(agent) ? m : null),
    };
  }
}

async function scriptFile(dir: string, name: string, body: string): Promise<string> {
  const f = path.join(dir, name);
  await fs.promises.writeFile(f, `#!/bin/sh\n${body}\n`, { mode: 0o755 });
  return f;
}

t.test('runPlan: steps in order, scripts with their environment, the mapping where it applies', async (t) => {
  const dir = await tmpDir(t);
  const log = path.join(dir, 'log');
  const env = await scriptFile(dir, 'env.sh', `echo "$MOBILITY_PLAN_PHASE $MOBILITY_PLAN_STEP $MOBILITY_PLAN_KIND $MOBILITY_PLAN_MACHINES $MOBILITY_PLAN $(test -s "$MOBILITY_PLAN_REPORT" && echo report)" >> ${log}; echo said-something`);
  const plan = parsePlan({ name: 'shop', group: 'shop', networkMap: MAP, networkMaps: { app1: MAP }, steps: [
    { machines: ['db1'], post: env, bootCheck: { marker: 'db ready' } },
    { machines: ['app1', 'web1'], pre: env, post: env },
  ] }, db);
  const m = new FakeMachines();
  const r = await runPlan(m.deps(), plan, { kind: 'test-failover', ref: 'latest', run: 'run1' });
  t.ok(r.ok, `the plan went through (${r.failure})`);
  t.equal(r.groupPoint, 'gp-7');
  t.same(m.calls, ['points latest', 'tf agent-db@rp-agent-db +map +boot(db ready)', 'tf agent-app@rp-agent-app +map', 'tf agent-web@rp-agent-web +map'],
    'one machine at a time in boot order; the plan\'s mapping where it covers a NIC, a machine\'s own mapping; the boot check of its step');
  t.same(fs.readFileSync(log, 'utf8').trim().split('\n'), [
    'post 1 test-failover agent-db shop report', 'pre 2 test-failover agent-app,agent-web shop report', 'post 2 test-failover agent-app,agent-web shop report',
  ], 'scripts ran between the machines, with the plan\'s environment and the report so far');
  t.equal(r.steps[0]!.post!.tail, 'said-something', 'a script\'s output is kept');
  t.notOk(fs.readdirSync(os.tmpdir()).some((f) => f.startsWith('mobility-plan-') && f.includes('run1')), 'the report file is gone');
});

t.test('runPlan: a machine that does not boot stops the plan; a failing script too', async (t) => {
  const dir = await tmpDir(t);
  const plan = parsePlan({ name: 'shop', steps: [{ machines: ['db1'], bootCheck: true }, { machines: ['app1'] }] }, db);
  const m = new FakeMachines();
  m.bootFails.add('agent-db');
  const r = await runPlan(m.deps(), plan, { kind: 'test-failover', ref: 'latest', run: 'r2' });
  t.notOk(r.ok);
  t.match(r.failure, /step 1: machine agent-db: did not boot \(timeout\)/);
  t.equal(r.steps[1]!.skipped, true, 'the next step did not run');
  t.notOk(m.calls.some((c) => c.includes('agent-app')), 'its machine was not touched');

  const failing = await scriptFile(dir, 'fail.sh', 'echo broken >&2; exit 3');
  const slow = await scriptFile(dir, 'slow.sh', 'sleep 30');
  const p2 = parsePlan({ name: 'p2', steps: [{ machines: ['db1'], pre: failing }, { machines: ['app1'] }] }, db);
  const r2 = await runPlan(new FakeMachines().deps(), p2, { kind: 'test-failover', ref: 'latest', run: 'r3' });
  t.match(r2.failure, /step 1: pre script .*fail\.sh exited with 3/);
  t.equal(r2.steps[0]!.pre!.tail, 'broken');
  t.same(r2.steps[0]!.results, [], 'a failed pre script: its machines are not touched');
  const p3 = parsePlan({ name: 'p3', steps: [{ machines: ['db1'], post: slow }], scriptTimeoutMs: 1000 }, db);
  const r3 = await runPlan(new FakeMachines().deps(), p3, { kind: 'test-failover', ref: 'latest', run: 'r4' });
  t.match(r3.failure, /post script .*slow\.sh ran longer than its time limit/);
  t.ok(r3.steps[0]!.post!.timedOut);
  const missing = await runScript(path.join(dir, 'nope.sh'), {}, 1000);
  t.match(missing, { ok: false, exitCode: null, tail: /cannot run/ }, 'a missing script is a failed script, not a crash');

  await t.rejects(runPlan(new FakeMachines().deps(), plan, { kind: 'test-failover', ref: 'gp-missing', run: 'r5' }), { code: 'MOB_ERR_UNKNOWN_POINT' }, 'points that cannot be resolved: an error before anything is made');
});

t.test('runPlan: failover in order; cleanup in reverse order at the given points', async (t) => {
  const plan: RecoveryPlan = parsePlan({ name: 'shop', group: 'shop', steps: [{ machines: ['db1'] }, { machines: ['app1', 'web1'] }] }, db);
  const m = new FakeMachines();
  const r = await runPlan(m.deps(), plan, { kind: 'failover', ref: 'latest', run: 'f1' });
  t.ok(r.ok);
  t.same(m.calls.slice(1), ['failover agent-db@rp-agent-db', 'failover agent-app@rp-agent-app', 'failover agent-web@rp-agent-web']);
  const c = new FakeMachines();
  const points = new Map([['agent-db', 'rp-1'], ['agent-app', 'rp-2'], ['agent-web', 'rp-3']]);
  const rc = await runPlan(c.deps(), plan, { kind: 'cleanup', ref: 'latest', run: 'c1', points, groupPoint: 'gp-1' });
  t.ok(rc.ok);
  t.same(c.calls, ['cleanup agent-web@rp-3', 'cleanup agent-app@rp-2', 'cleanup agent-db@rp-1'], 'the last step first, no point resolution');
  t.same(rc.steps.map((s) => s.step), [1, 2], 'the report lists the steps in plan order');
});
