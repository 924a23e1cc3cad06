/**
 * Faults of the Azure target, against a real Azurite on loopback:
 *   - wrong credentials: the server refuses to start with MOB_ERR_TARGET_AUTH naming the fix, and
 *     writes nothing; a credentials file readable by others is refused;
 *   - Azurite killed with -9 during the initial sync and during continuous protection under load,
 *     then restarted on the same location: status says why the disk paused
 *     (target-unavailable), protection converges, every point is right;
 * (the server killed mid-batch: azure-server-kill.test.ts)
 *
 * Needs root, losetup, mkfs.ext4, e2fsck, fsfreeze, fio, tracefs and Azurite: a missing one fails
 * the test. Paced on progress (workload rounds, agent events), never on elapsed time.
 */
import t from 'tap';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { spawnServer, stopServer } from '../../src/server/spawn.js';
import { tmpDir, waitFor } from '../helpers.js';
import { startAzurite, writeCredentialsFile } from '../azurite.js';
import { Agent, LONG, Workload, materializeAndCheck, setup, sh } from '../protect-harness.js';
import { RETRY, blobNames, diskStatus, verifyEqual } from '../azure-harness.js';

t.test('wrong credentials: a coded error naming the fix, and nothing written', async (t) => {
  const az = await startAzurite(t);
  const dir = await tmpDir(t, 'az-bad-');
  const bad = path.join(dir, 'bad.json');
  await fsp.writeFile(bad, JSON.stringify({ accountName: az.accountName, accountKey: Buffer.from('not the key of this account, at all').toString('base64') }), { mode: 0o600 });
  const srv = await spawnServer(path.join(dir, 'srv'), { extraArgs: ['--store', `azure:${az.url}/mobility-bad`, '--store-credentials', bad, ...RETRY], timeoutMs: LONG })
    .then((s) => ({ ok: true as const, s }), (err: Error) => ({ ok: false as const, err }));
  if (srv.ok) {
    await stopServer(srv.s);
    t.fail('the server started with wrong storage credentials');
  } else {
    t.match(srv.err.message, /MOB_ERR_TARGET_AUTH/, 'refused with MOB_ERR_TARGET_AUTH');
    t.match(srv.err.message, /credentials/, 'the message names the credentials file as the fix');
    t.notMatch(srv.err.message, /not the key/, 'the secret is not in the message');
  }
  t.equal(await blobNames(az, 'mobility-bad'), null, 'nothing was created in the account');

  const loose = await writeCredentialsFile(dir, az);
  await fsp.chmod(loose, 0o644);
  const refused = await spawnServer(path.join(dir, 'srv2'), { extraArgs: ['--store', `azure:${az.url}/mobility-bad`, '--store-credentials', loose], timeoutMs: LONG })
    .then(async (s) => { await stopServer(s); return ''; }, (err: Error) => err.message);
  t.match(refused, /MOB_ERR_CONFIG/, 'a credentials file readable by others is refused');
  t.match(refused, /0600|chmod/, 'and the message says how to fix it');
});

t.test('Azurite killed -9 during the initial sync and under load: the disk pauses with its reason, protection converges, points stay right', async (t) => {
  const az = await startAzurite(t);
  const creds = await writeCredentialsFile(await tmpDir(t, 'az-creds-'), az);
  const s = await setup(t, 160, { serverArgs: ['--store', `azure:${az.url}/mobility-faults`, '--store-credentials', creds, ...RETRY] });
  // enough data that the initial sync, slowed down, is still running when Azurite dies
  sh('dd', ['if=/dev/urandom', `of=${s.mnt}/bulk`, 'bs=1M', 'count=48', 'status=none']);
  sh('sync', []);
  const agent = new Agent(s.c, s.args(['--crash-interval', '60m', '--app-interval', '60m', '--max-rate', '8M']));
  t.teardown(() => agent.stop());
  await agent.waitEvent((e) => e.event === 'pass' && e.kind === 'initial', LONG, 'the initial sync to start');
  // killed at once: waiting for status to show the (transient) initial-sync state first could miss
  // it on a loaded machine, where one status call takes seconds
  await az.kill('SIGKILL');
  t.notOk(agent.find((e) => e.event === 'pass-done' && e.kind === 'initial'), 'Azurite died during the initial sync (48 MiB at 8 MiB/s)');
  await waitFor(async () => ((await diskStatus(s))?.state ?? '') === 'target-unavailable', LONG, 'status to say the target is unavailable');
  const paused = await diskStatus(s);
  t.match(paused?.reason ?? '', /MOB_ERR_TARGET_UNAVAILABLE/, `the disk says why it paused: ${paused?.reason}`);
  t.notOk(agent.find((e) => e.event === 'pass-done' && e.kind === 'initial'), 'the initial sync did not complete while the target was down');
  await az.restart();
  await agent.waitEvent((e) => e.event === 'pass-done' && e.kind === 'initial', LONG, 'the initial sync to complete after the restart');
  const first = await agent.waitEvent((e) => e.event === 'cut', LONG, 'the first cut');
  const points = [{ pointId: String(first.pointId), cutId: String(first.cutId) }];

  // continuous protection under load
  const load = new Workload(s.c, s);
  await load.advance(10, 'the workload to get going');
  const before = agent.events.length;
  await az.kill('SIGKILL');
  await load.advance(10, 'writes while the target is down');
  await waitFor(async () => ((await diskStatus(s))?.state ?? '') === 'target-unavailable', LONG, 'status to say the target is unavailable under load');
  await az.restart();
  await agent.waitEvent((e) => agent.events.indexOf(e) >= before && e.event === 'state' && e.state === 'continuous', LONG, 'protection to resume');
  for (const kind of ['crash', 'app'] as const) {
    const c = await agent.cut(kind);
    t.equal(c.event, 'cut', `${kind} cut after the outage ${JSON.stringify(c)}`);
    if (c.event === 'cut') points.push({ pointId: String(c.pointId), cutId: String(c.cutId) });
    await load.advance(5);
  }
  await load.stop();
  for (const p of points) await materializeAndCheck(t, s, p.pointId, p.cutId);
  sh('umount', [s.mnt]);
  t.equal((await agent.cut('crash')).event, 'cut', 'a cut after the unmount');
  await agent.stop();
  await verifyEqual(t, s, s.server, { az, container: 'mobility-faults' });
});

