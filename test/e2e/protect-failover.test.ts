/**
 * Continuous protection (see test/protect-harness.ts): failover (final cut, promoted image,
 * replication stopped), then reprotect pulls only the differences and protection resumes.
 *
 * Needs root, losetup, mkfs.ext4, e2fsck, fsfreeze, fio and tracefs: a missing one fails the test.
 */
import t from 'tap';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { runCli } from '../helpers.js';
import { Agent, LONG, setup, sh, shAsync, statusArgs } from '../protect-harness.js';

t.test('failover (final cut, promoted image, replication stopped), then reprotect pulls only the differences and protection resumes', async (t) => {
  const s = await setup(t, 128);
  const conn = ['--server', s.server.info.url, '--token-file', s.server.info.tokenFile, '--ca', s.server.info.caFile!];
  let agent = new Agent(s.c, s.args(['--crash-interval', '15s']));
  t.teardown(() => agent.stop());
  await agent.waitEvent((e) => e.event === 'cut', LONG, 'the first cut');
  // written after the last cut: only a final cut brings it into the promoted image
  sh('dd', ['if=/dev/urandom', `of=${s.mnt}/late`, 'bs=64k', 'count=32', 'status=none']);
  sh('sync', []);
  const lateSum = sh('sha256sum', [`${s.mnt}/late`]).split(' ')[0];
  const fo = await runCli(['failover', ...conn, '--agent-id', s.agentId, '--yes', '--json']).done;
  t.equal(fo.code, 0, `failover succeeds ${fo.stderr}`);
  const r = JSON.parse(fo.stdout) as { point: { id: string }; finalCut: { requested: boolean; pointId: string | null }; disks: { localPath: string | null; location: string }[] };
  t.ok(r.finalCut.requested && r.finalCut.pointId === r.point.id, `failed over to the final cut ${r.point.id}`);
  const code = await agent.exited;
  t.not(code, 0, 'the protecting agent stopped');
  t.match(agent.stderr, /MOB_ERR_FAILED_OVER/, 'with MOB_ERR_FAILED_OVER');
  const st = await runCli(statusArgs(s.server)).done;
  t.equal((JSON.parse(st.stdout) as { disks: { agent: string; state: string }[] }).disks.find((d) => d.agent === s.agentId)?.state, 'failed-over', 'status: failed-over');
  const again = new Agent(s.c, s.args());
  t.not(await again.exited, 0, 'a new protect session is refused while failed over');
  t.match(again.stderr, /MOB_ERR_FAILED_OVER/);

  // the recovered machine runs on the promoted image: check it, then change it
  const image = r.disks[0].localPath!;
  const fsck = await shAsync('e2fsck', ['-fn', image]);
  t.equal(fsck.code, 0, `the promoted image is fsck-clean ${fsck.code ? fsck.stdout.slice(-1000) : ''}`);
  const rm = path.join(s.dir, 'recovered');
  await fsp.mkdir(rm);
  sh('mount', ['-o', 'loop', image, rm]);
  t.equal(sh('sha256sum', [`${rm}/late`]).split(' ')[0], lateSum, 'the final cut carried the last write');
  sh('dd', ['if=/dev/urandom', `of=${rm}/written-after-failover`, 'bs=64k', 'count=16', 'status=none']);
  const newSum = sh('sha256sum', [`${rm}/written-after-failover`]).split(' ')[0];
  await fsp.rm(path.join(rm, 'seed'));
  sh('umount', [rm]);
  const imageSum = (await shAsync('sha256sum', [image])).stdout.split(' ')[0];

  // fail back: the original disk must be unmounted
  const unconfirmed = await runCli(['reprotect', ...conn, '--agent-id', s.agentId, '--disk', `${s.loop}=d0`]).done;
  t.equal(unconfirmed.code, 2, 'reprotect destroys data: without a terminal it wants --yes');
  t.match(unconfirmed.stderr, /MOB_ERR_USAGE.*--yes/);
  const mounted = await runCli(['reprotect', ...conn, '--agent-id', s.agentId, '--disk', `${s.loop}=d0`, '--yes']).done;
  t.not(mounted.code, 0, 'reprotect refuses a mounted disk');
  t.match(mounted.stderr, /MOB_ERR_CONFIG.*mounted/);
  sh('umount', [s.mnt]);
  const rp = await runCli(['reprotect', ...conn, '--agent-id', s.agentId, '--disk', `${s.loop}=d0`, '--yes', '--json']).done;
  t.equal(rp.code, 0, `reprotect succeeds ${rp.stderr}`);
  const res = JSON.parse(rp.stdout) as { disks: { pagesPulled: number; bytesPulled: number; sizeBytes: number }[] };
  t.ok(res.disks[0].pagesPulled > 0, `pulled ${res.disks[0].pagesPulled} differing pages`);
  t.ok(res.disks[0].bytesPulled < res.disks[0].sizeBytes / 8, `only the differences travelled (${res.disks[0].bytesPulled} of ${res.disks[0].sizeBytes} bytes)`);
  t.equal((await shAsync('sha256sum', [s.loop])).stdout.split(' ')[0], imageSum, 'the original disk now equals the promoted image');
  const replica = path.join(s.server.info.dataDir, 'replicas', s.agentId, 'd0', 'replica.img');
  t.equal((await shAsync('sha256sum', [replica])).stdout.split(' ')[0], imageSum, 'and the promoted image is the replica now');
  sh('mount', ['-o', 'noatime', s.loop, s.mnt]);
  t.equal(sh('sha256sum', [`${s.mnt}/written-after-failover`]).split(' ')[0], newSum, 'the recovered machine\'s writes are on the original disk');
  t.notOk(fs.existsSync(path.join(s.mnt, 'seed')), 'and its deletions too');

  // protection resumes: a checksum resync finds nothing to send, then cuts work again
  agent = new Agent(s.c, s.args(['--crash-interval', '15s']));
  const pass = await agent.waitEvent((e) => e.event === 'pass-done', LONG, 'the first pass after failback');
  t.equal(pass.kind, 'resync', 'the first pass after failback is a checksum resync');
  t.ok(Number(pass.blocksSent) <= 64, `and ships almost nothing (${String(pass.blocksSent)} blocks)`);
  const c = await agent.waitEvent((e) => e.event === 'cut', LONG, 'a cut after failback');
  t.equal(c.pointId, 'rp-000001', 'a new timeline of recovery points starts');
  await agent.stop();
});
