/**
 * A replica store that runs out of space: the agent gets MOB_ERR_NO_SPACE
 * (retryable, so it retries until its deadline), nothing unacknowledged is
 * claimed, and the server goes on serving other agents. Needs root to mount a
 * small tmpfs (CI runs as root); fails, never skips, without it.
 */
import t from 'tap';
import { execFileSync } from 'node:child_process';
import crypto from 'node:crypto';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { writeSampleImage } from '../../src/util/sample-image.js';
import { cleanup, replicateArgs, runCli, startServer, tmpDir } from '../helpers.js';

t.test('full replica store', async (t) => {
  const dir = await tmpDir(t);
  const mnt = path.join(dir, 'small');
  await fsp.mkdir(mnt);
  execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=24m', 'tmpfs', mnt]);
  cleanup(t).mount(mnt);
  const srv = await startServer(t, path.join(mnt, 'srv'));
  const small = path.join(dir, 'small.img');
  await writeSampleImage(small, 4 * 1024 * 1024, 2);
  const big = path.join(dir, 'big.img');
  await fsp.writeFile(big, crypto.randomBytes(48 * 1024 * 1024));
  const common = { url: srv.info.url, tokenFile: srv.info.tokenFile, caFile: srv.info.caFile!, stateDir: path.join(dir, 'agent') };
  t.equal((await runCli(replicateArgs({ ...common, disk: `${small}=d0`, agentId: 'small' })).done).code, 0, 'small agent replicates');
  const r = await runCli(replicateArgs({ ...common, disk: `${big}=d0`, agentId: 'big', extra: ['--retry-deadline', '2'] })).done;
  t.equal(r.code, 5, 'big agent gives up after its retry deadline');
  t.match(r.stderr, /MOB_ERR_NO_SPACE/, 'and says why: the store is full');
  t.equal(srv.child.exitCode, null, 'the server is still running');
  const v = await runCli(['verify', '--server', srv.info.url, '--token-file', srv.info.tokenFile, '--ca', srv.info.caFile!, '--disk', `${small}=d0`, '--agent-id', 'small', '--state-dir', common.stateDir]).done;
  t.equal(v.code, 0, 'the server still serves the other agent');
  t.match(v.stdout, /replica matches the source/);
});
