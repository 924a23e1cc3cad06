/**
 * The process server killed with -9 mid-batch under load while it replicates into Azure page
 * blobs (a real Azurite on loopback): no acknowledged write is lost; every point checks and the
 * replica blob equals the disk at the end.
 *
 * Needs root, losetup, mkfs.ext4, e2fsck, fsfreeze, fio, tracefs and Azurite: a missing one fails
 * the test. Paced on progress (workload rounds, agent events), never on elapsed time.
 */
import t from 'tap';
import path from 'node:path';
import { spawnServer, stopServer, type SpawnedServer } from '../../src/server/spawn.js';
import { tmpDir } from '../helpers.js';
import { startAzurite, writeCredentialsFile } from '../azurite.js';
import { Agent, LONG, Workload, materializeAndCheck, setup, sh } from '../protect-harness.js';
import { RETRY, verifyEqual } from '../azure-harness.js';

t.test('the server killed -9 mid-batch under load: no acknowledged write is lost', async (t) => {
  const az = await startAzurite(t);
  const creds = await writeCredentialsFile(await tmpDir(t, 'az-creds-'), az);
  const serverArgs = ['--store', `azure:${az.url}/mobility-srvkill`, '--store-credentials', creds, ...RETRY];
  const s = await setup(t, 128, { serverArgs });
  const port = s.server.info.port;
  let server: SpawnedServer = s.server;
  t.teardown(() => stopServer(server));
  const agent = new Agent(s.c, s.args(['--crash-interval', '60m', '--app-interval', '60m']));
  t.teardown(() => agent.stop());
  await agent.waitEvent((e) => e.event === 'cut', LONG, 'the first cut');
  const load = new Workload(s.c, s);
  for (let k = 0; k < 3; k++) {
    await load.advance(8, `load before server kill ${k + 1}`);
    const before = agent.events.length;
    server.child.kill('SIGKILL');
    await new Promise((r) => server.child.once('exit', r));
    server = await spawnServer(path.join(s.dir, 'srv'), { port, extraArgs: serverArgs, timeoutMs: LONG });
    s.c.process(server.child);
    await agent.waitEvent((e) => agent.events.indexOf(e) >= before && e.event === 'connected', LONG, `reconnect after server kill ${k + 1}`);
  }
  const c = await agent.cut('app');
  t.equal(c.event, 'cut', 'a cut under load after the kills');
  await load.stop();
  if (c.event === 'cut') await materializeAndCheck(t, { ...s, server }, String(c.pointId), String(c.cutId));
  sh('umount', [s.mnt]);
  t.equal((await agent.cut('crash')).event, 'cut', 'a cut after the unmount');
  await agent.stop();
  await verifyEqual(t, s, server, { az, container: 'mobility-srvkill' });
});
