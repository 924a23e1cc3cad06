/**
 * Bounds of the recovery steps that a guest or a script could otherwise push past: a guest's
 * console log is capped (a guest printing without end does not fill the server's disk), a plan
 * script is over when it exits (a daemon it leaves running holds its pipes in vain), a deleted
 * plan takes its runs with it, and runs a stopped server left unfinished are recorded as failed.
 */
import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { bootCheck, CONSOLE_LOG_MAX } from '../../src/server/recovery/boot-check.js';
import { runScript } from '../../src/server/recovery/plan.js';
import { ConfigDb } from '../../src/server/config-db.js';
import { tmpDir } from '../helpers.js';

t.test('a guest that never stops printing: the console log stops at its cap, the check still ends', async (t) => {
  const dir = await tmpDir(t);
  const img = path.join(dir, 'disk.img');
  fs.writeFileSync(img, Buffer.alloc(1 << 20));
  // a stand-in for QEMU (the real one is exercised by boot-check.test.ts): prints without end
  const qemu = path.join(dir, 'fake-qemu');
  fs.writeFileSync(qemu, '#!/bin/sh\nexec yes "the guest says something and never stops"\n', { mode: 0o755 });
  const log = path.join(dir, 'console.log');
  const r = await bootCheck({ images: [img], marker: '^never matches$', timeoutMs: 4000, consoleLog: log, qemu, accel: 'tcg' });
  t.equal(r.ok, false);
  t.equal(r.reason, 'timeout');
  t.ok(r.consoleBytes > CONSOLE_LOG_MAX, `the guest printed ${r.consoleBytes} bytes`);
  const size = fs.statSync(log).size;
  t.ok(size <= CONSOLE_LOG_MAX + 200 && size >= CONSOLE_LOG_MAX, `the log holds ${size} bytes (cap ${CONSOLE_LOG_MAX})`);
  t.match(fs.readFileSync(log).subarray(-100).toString(), /\[console log truncated at \d+ bytes\]/);
});

t.test('a script is over when it exits, whatever it left running', async (t) => {
  const dir = await tmpDir(t);
  const f = path.join(dir, 'bg.sh');
  fs.writeFileSync(f, '#!/bin/sh\necho started\nsleep 30 &\nsetsid sleep 30 &\nexit 0\n', { mode: 0o755 });
  const r = await runScript(f, {}, 10_000);
  t.match(r, { ok: true, exitCode: 0, timedOut: false, tail: 'started' });
  t.ok(r.seconds < 9, `it ended when the script did (${r.seconds.toFixed(1)} s), not at its time limit`);
});

t.test('recovery plan runs: deleted with their plan; a stopped server\'s unfinished runs become failed', async (t) => {
  const db = ConfigDb.open(path.join(await tmpDir(t), 'data'));
  t.teardown(() => db.close());
  db.putPlan('p', { name: 'p' });
  db.startPlanRun('r1', 'p', 'test-failover');
  db.endPlanRun('r1', true, { steps: [] });
  db.startPlanRun('r2', 'p', 'test-failover');
  t.equal(db.abandonPlanRuns(), 1, 'the unfinished run');
  const [r2] = db.listPlanRuns('p');
  t.match(r2, { id: 'r2', ok: false, report: { failure: 'the server stopped during the run' } });
  t.ok(db.deletePlan('p'));
  db.putPlan('p', { name: 'p' });
  t.same(db.listPlanRuns('p'), [], 'a new plan of the same name has no runs');
});
