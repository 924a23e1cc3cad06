/**
 * Continuous protection (see test/protect-harness.ts): the server killed with -9 at
 * different moments of cuts under load; every recovery point left in the catalog is
 * complete (fsck-clean, the files of its cut) or absent.
 *
 * Needs root, losetup, mkfs.ext4, e2fsck, fsfreeze, fio and tracefs: a missing one fails the test.
 */
import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { spawnServer, stopServer, type SpawnedServer } from '../../src/server/spawn.js';
import { runCli, sleep } from '../helpers.js';
import { Agent, LONG, Workload, materializeAndCheck, setup } from '../protect-harness.js';

t.test('the server killed at any instant of cuts under load leaves every recovery point complete or absent', async (t) => {
  const s = await setup(t, 128);
  const port = s.server.info.port;
  let server: SpawnedServer = s.server;
  t.teardown(() => stopServer(server));
  const agent = new Agent(s.c, s.args(['--crash-interval', '15s']));
  t.teardown(() => agent.stop());
  await agent.waitEvent((e) => e.event === 'cut', LONG, 'the first cut');
  const load = new Workload(s.c, s);
  await load.advance(5, 'the workload to get going');
  for (let k = 0; k < 4; k++) {
    const before = agent.events.length;
    agent.child.kill(k % 2 ? 'SIGUSR1' : 'SIGUSR2');
    await sleep(200 + k * 400); // a different moment of the cut each time (any moment is valid)
    server.child.kill('SIGKILL');
    await new Promise((r) => server.child.once('exit', r));
    server = await spawnServer(path.join(s.dir, 'srv'), { port, timeoutMs: LONG });
    s.c.process(server.child);
    await agent.waitEvent((e) => agent.events.indexOf(e) >= before && e.event === 'connected', LONG, `reconnect after server kill ${k + 1}`);
  }
  await load.stop();
  const last = await agent.cut('app');
  t.equal(last.event, 'cut', 'cuts work after the kills');
  const conn = ['--server', server.info.url, '--token-file', server.info.tokenFile, '--ca', server.info.caFile!];
  const pts = await runCli(['points', ...conn, '--agent-id', s.agentId, '--json']).done;
  const points = (JSON.parse(pts.stdout) as { points: { id: string; cutId?: number }[] }).points;
  t.ok(points.length >= 2, `${points.length} recovery points survived`);
  let checked = 0;
  for (const p of points) {
    if (!p.cutId || !fs.existsSync(path.join(s.sums, String(p.cutId)))) continue;
    await materializeAndCheck(t, { ...s, server }, p.id, String(p.cutId));
    checked++;
  }
  t.equal(checked, points.length, 'every point in the catalog is complete: fsck-clean with the files of its cut');
  await agent.stop();
});
