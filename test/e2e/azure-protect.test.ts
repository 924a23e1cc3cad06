/**
 * Replication to Azure, end to end, against a real Azurite on loopback: `mobility server
 * --store azure:...` keeps the replica of an ext4 filesystem on a loop device as a page blob
 * while fio and dd write to it; cuts become blob snapshots; every point's test-failover image
 * (a page blob copied from the snapshot, downloaded as a sparse file) passes `e2fsck -fn` and
 * holds exactly the files of its cut; after the load stops the replica blob equals the disk.
 *
 * Needs root, losetup, mkfs.ext4, e2fsck, fsfreeze, fio, tracefs and Azurite (npm): a missing one
 * fails the test. Paced on the workload's progress, never on elapsed time.
 */
import t from 'tap';
import { runCli, replicateArgs, tmpDir, waitFor } from '../helpers.js';
import { startAzurite, writeCredentialsFile } from '../azurite.js';
import { Agent, LONG, Workload, materializeAndCheck, setup, sh, statusArgs } from '../protect-harness.js';

t.test('azure store: ext4 under fio/dd load, cuts as snapshots, every point fsck-clean with its files, replica equals the disk', async (t) => {
  const az = await startAzurite(t);
  const creds = await writeCredentialsFile(await tmpDir(t, 'az-creds-'), az);
  const s = await setup(t, 192, { serverArgs: ['--store', `azure:${az.url}/mobility-e2e`, '--store-credentials', creds] });
  t.notMatch(s.server.stderr(), new RegExp(az.accountKey.slice(0, 20).replace(/[+/]/g, '.')), 'the account key is never logged');

  const agent = new Agent(s.c, s.args(['--crash-interval', '60m', '--app-interval', '60m']));
  t.teardown(() => agent.stop());
  await agent.waitEvent((e) => e.event === 'pass-done' && e.kind === 'initial', LONG, 'initial sync into the page blob');
  const points: { pointId: string; cutId: string }[] = [];
  const first = await agent.waitEvent((e) => e.event === 'cut', LONG, 'the first cut');
  points.push({ pointId: String(first.pointId), cutId: String(first.cutId) });

  const load = new Workload(s.c, s);
  await load.advance(10, 'the workload to get going');
  for (const kind of ['crash', 'app', 'crash'] as const) {
    const c = await agent.cut(kind);
    t.equal(c.event, 'cut', `${kind} cut under load becomes a point ${JSON.stringify(c)}`);
    if (c.event === 'cut') points.push({ pointId: String(c.pointId), cutId: String(c.cutId) });
    t.ok(load.running, 'under load');
    await load.advance(10);
  }
  await load.stop();
  const last = await agent.cut('app');
  t.equal(last.event, 'cut', 'a cut after the load');
  if (last.event === 'cut') points.push({ pointId: String(last.pointId), cutId: String(last.cutId) });

  // the points are snapshots: the catalog records one per disk
  const pts = await runCli(['points', '--server', s.server.info.url, '--token-file', s.server.info.tokenFile, '--ca', s.server.info.caFile!, '--agent-id', s.agentId, '--json']).done;
  const catalog = (JSON.parse(pts.stdout) as { points: { id: string; disks: Record<string, { ref?: { snapshot?: string } }> }[] }).points;
  for (const p of points) {
    const rec = catalog.find((x) => x.id === p.pointId);
    t.ok(rec?.disks.d0?.ref?.snapshot, `point ${p.pointId} is a blob snapshot (${rec?.disks.d0?.ref?.snapshot})`);
  }
  // the stored bytes are counted in the background (a request per snapshot): status shows them once counted
  type Row = { agent: string; state: string; storedBytes: number | null; sizeBytes: number; points: number };
  let disk: Row | undefined;
  await waitFor(async () => {
    const st = await runCli(statusArgs(s.server)).done;
    disk = (JSON.parse(st.stdout) as { disks: Row[] }).disks.find((d) => d.agent === s.agentId);
    return typeof disk?.storedBytes === 'number';
  }, LONG, 'status to show the stored bytes');
  t.equal(disk?.state, 'continuous', 'status: continuous');
  // an upper bound (Azurite has no Get Page Ranges diff): the blob's pages plus every snapshot's, counted in full
  t.ok(disk && disk.storedBytes !== null && disk.storedBytes > 0 && disk.storedBytes <= (disk.points + 1) * disk.sizeBytes,
    `status: ${disk?.storedBytes} bytes stored in the container for ${disk?.points} points of a ${disk?.sizeBytes}-byte disk`);

  for (const p of points) await materializeAndCheck(t, s, p.pointId, p.cutId);

  // after the load: unmount (every byte on the device), let the agent ship the rest, stop it,
  // and compare the disk with the replica blob page by page (a read-only verify session)
  sh('umount', [s.mnt]);
  const flushed = await agent.cut('crash');
  t.equal(flushed.event, 'cut', 'a cut after the unmount');
  await agent.stop();
  const v = await runCli(replicateArgs({ url: s.server.info.url, tokenFile: s.server.info.tokenFile, caFile: s.server.info.caFile!, disk: `${s.loop}=d0`, stateDir: `${s.dir}/verify-state`, agentId: s.agentId })
    .map((a) => (a === 'replicate' ? 'verify' : a))).done;
  t.equal(v.code, 0, `verify: the replica blob equals the disk ${v.stdout.slice(-500)} ${v.stderr.slice(-1500)}`);
});
