/**
 * kill -9 of the server in the middle of the initial and of an incremental pass, with real
 * processes. After recovery the replica equals the source (sha256), and the work is not
 * redone: the blocks resent are bounded by what was not yet durable on the server at the kill
 * (read from the replica and the WAL after the kill), whatever the machine's speed.
 */
import t from 'tap';
import { sha256File, writeSampleImage } from '../../src/util/sample-image.js';
import { runCli, sleep, waitFor } from '../helpers.js';
import { BLOCKS, BS, CHANGED, LONG, SIZE, allocated, change16MiB, committedWalBlocks, randomImage, setup, type Result } from '../crash-harness.js';

t.test('server killed with -9 during the initial replication', async (t) => {
  // random data, sent raw: a block takes as much of the 32 MiB credit window as of the disk, so at most 512 blocks are in flight
  const s = await setup(t, randomImage);
  const agent = runCli(s.args(['--max-rate', '4M', '--no-compress', '--retry-deadline', '120']));
  // more on the replica than the credit window can hold in flight (40 MiB > 32 MiB)
  await waitFor(async () => (await allocated(s.replica)) > 40 * 1024 * 1024 || agent.child.exitCode !== null, LONG, 'initial replication to be under way');
  t.equal(agent.child.exitCode, null, 'the agent is mid-pass at the kill');
  s.server().child.kill('SIGKILL');
  await new Promise((r) => s.server().child.once('exit', r));
  // what the dead server had written: a restart from zero sends all of it again, a resume at most what was in flight
  const written = Math.floor((await allocated(s.replica)) / BS);
  await sleep(700);
  t.equal(agent.child.exitCode, null, 'the agent is still running (retrying)');
  await s.restartServer();
  const r = await agent.done;
  t.equal(r.code, 0, 'exit 0', { stderr: r.stderr.slice(-400) });
  t.match(r.stderr, /reconnecting/, 'the agent reconnected');
  const res = JSON.parse(r.stdout) as Result;
  t.ok(written > 512, `the server had written ${written} blocks, more than a credit window holds (512)`);
  t.ok(res.disks[0].stats.blocksSent < BLOCKS + written,
    `did not start again from zero: ${res.disks[0].stats.blocksSent} blocks sent for ${BLOCKS}; a restart would have sent ${BLOCKS + written} or more`);
  t.equal(await sha256File(s.replica), await sha256File(s.img), 'replica equals source');
});

t.test('server killed with -9 during an incremental pass (WAL replay)', async (t) => {
  const s = await setup(t, (img) => writeSampleImage(img, SIZE, 21));
  t.equal((await runCli(s.args([])).done).code, 0, 'initial');
  await change16MiB(s.img);
  const agent = runCli(s.args(['--max-rate', '2M', '--retry-deadline', '120']));
  // a quarter of the changed blocks committed in the WAL
  await waitFor(async () => (await committedWalBlocks(s.wal)) >= CHANGED.count / 4 || agent.child.exitCode !== null, LONG, 'incremental pass to be under way');
  t.equal(agent.child.exitCode, null, 'the agent is mid-pass at the kill');
  s.server().child.kill('SIGKILL');
  await new Promise((r) => s.server().child.once('exit', r));
  const committed = await committedWalBlocks(s.wal);
  await s.restartServer();
  const r = await agent.done;
  t.equal(r.code, 0, 'exit 0', { stderr: r.stderr.slice(-400) });
  const res = JSON.parse(r.stdout) as Result;
  t.equal(res.disks[0].kind, 'incremental');
  t.ok(committed >= CHANGED.count / 4, `${committed} changed blocks were committed in the WAL at the kill`);
  t.ok(res.disks[0].stats.blocksSent <= CHANGED.count + (CHANGED.count - committed),
    `what the WAL had committed was not sent again: ${res.disks[0].stats.blocksSent} blocks sent for ${CHANGED.count} changed, ${committed} committed at the kill`);
  t.equal(await allocated(s.wal), 0, 'WAL checkpointed after the pass');
  t.equal(await sha256File(s.replica), await sha256File(s.img), 'replica equals source');
});
