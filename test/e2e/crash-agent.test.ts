/**
 * kill -9 of the agent in the middle of the initial and of an incremental pass, then a
 * rerun, with real processes. After the rerun the replica equals the source (sha256), and the
 * rerun sends nothing that the agent's persisted digest map already had acknowledged (read
 * from the map after the kill), whatever the machine's speed.
 */
import t from 'tap';
import { sha256File, writeSampleImage } from '../../src/util/sample-image.js';
import { runCli, waitFor } from '../helpers.js';
import { BLOCKS, CHANGED, LONG, SIZE, change16MiB, knownPages, persistedBlocks, setup, type Result } from '../crash-harness.js';

const PAGES = SIZE / 4096;

t.test('agent killed with -9 during the initial replication, then rerun', async (t) => {
  const s = await setup(t, (img) => writeSampleImage(img, SIZE, 21));
  const agent = runCli(s.args(['--max-rate', '3M']));
  // killed once its persisted map holds a quarter of the disk
  await waitFor(async () => (await knownPages(s.mapFile)) >= PAGES / 4 || agent.child.exitCode !== null, LONG, 'a quarter of the initial replication persisted');
  t.equal(agent.child.exitCode, null, 'the agent is mid-pass at the kill');
  agent.child.kill('SIGKILL');
  await agent.done;
  const known = await persistedBlocks(s.mapFile, s.img);
  const r = await runCli(s.args([])).done;
  t.equal(r.code, 0, 'exit 0', { stderr: r.stderr.slice(-400) });
  const res = JSON.parse(r.stdout) as Result;
  t.equal(res.disks[0].kind, 'initial', 'the rerun resumes the initial replication');
  t.ok(known >= BLOCKS / 4 - 16, `the persisted map knew ${known} of ${BLOCKS} blocks at the kill`);
  t.ok(res.disks[0].stats.blocksSent <= BLOCKS - known, `the rerun resent ${res.disks[0].stats.blocksSent} of ${BLOCKS} blocks, none of the ${known} already acknowledged`);
  t.equal(await sha256File(s.replica), await sha256File(s.img), 'replica equals source');
});

t.test('agent killed with -9 during an incremental pass, then rerun', async (t) => {
  const s = await setup(t, (img) => writeSampleImage(img, SIZE, 21));
  t.equal((await runCli(s.args([])).done).code, 0, 'initial');
  await change16MiB(s.img);
  const agent = runCli(s.args(['--max-rate', '2M']));
  // acked pages reach the persisted map (throttled to about once a second): kill once a quarter of the changed blocks did
  await waitFor(async () => (await persistedBlocks(s.mapFile, s.img, CHANGED.first, CHANGED.count)) >= CHANGED.count / 4 || agent.child.exitCode !== null,
    LONG, 'a quarter of the incremental pass persisted');
  t.equal(agent.child.exitCode, null, 'the agent is mid-pass at the kill');
  agent.child.kill('SIGKILL');
  await agent.done;
  const known = await persistedBlocks(s.mapFile, s.img, CHANGED.first, CHANGED.count);
  const r = await runCli(s.args([])).done;
  t.equal(r.code, 0, 'exit 0', { stderr: r.stderr.slice(-400) });
  const res = JSON.parse(r.stdout) as Result;
  t.equal(res.disks[0].kind, 'incremental');
  t.ok(known >= CHANGED.count / 4, `the persisted map knew ${known} of the ${CHANGED.count} changed blocks at the kill`);
  t.ok(res.disks[0].stats.blocksSent <= CHANGED.count - known, `the rerun resent ${res.disks[0].stats.blocksSent} of ${CHANGED.count} changed blocks, none of the ${known} already acknowledged`);
  t.equal(await sha256File(s.replica), await sha256File(s.img), 'replica equals source');
});
