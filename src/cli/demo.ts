/**
 * The embedded default, end to end: a real `mobility server` process on
 * 127.0.0.1 with TLS, this process as the agent, a generated disk image,
 * initial + incremental replication, verify, and sha256 proof after each step.
 */
import fsp from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { createLogger } from '../log.js';
import { replicate } from '../agent/replicator.js';
import { churnImage, sha256File, writeSampleImage } from '../util/sample-image.js';
import { spawnServer, stopServer } from '../server/spawn.js';
import { ProgressReporter, fmtBytes } from './progress.js';

export async function runDemo(opts: { dir?: string; size?: number; keep?: boolean }): Promise<number> {
  const dir = opts.dir ?? (await fsp.mkdtemp(path.join(os.tmpdir(), 'mobility-demo-')));
  await fsp.mkdir(dir, { recursive: true });
  const size = opts.size ?? 256 * 1024 * 1024;
  const out = (s: string) => process.stdout.write(s + '\n');
  const logger = createLogger({ component: 'agent', level: 'warn' });
  out(`work directory: ${dir}`);
  const image = path.join(dir, 'disk0.img');
  out(`1. generating a ${fmtBytes(size)} disk image of mixed content (25% zeros, 25% random, 50% text)`);
  const { kinds } = await writeSampleImage(image, size, 1);
  out('2. starting mobility server on 127.0.0.1 (TLS, new CA and token in its data directory)');
  const server = await spawnServer(path.join(dir, 'server'));
  let ok = true;
  try {
    out(`   listening at ${server.info.url}, certificate ${server.info.fingerprint}`);
    const ca = await fsp.readFile(server.info.caFile!, 'utf8');
    const token = (await fsp.readFile(server.info.tokenFile, 'utf8')).trim();
    const replica = path.join(dir, 'server', 'replicas', 'demo-agent', 'disk0', 'replica.img');
    const progress = new ProgressReporter(logger);
    const run = async (label: string, mode: 'auto' | 'verify') => {
      const [r] = await replicate({
        serverUrl: `${server.info.url}/v1/replicate`, token, ca, agentId: 'demo-agent', disks: [{ path: image, id: 'disk0' }],
        stateDir: path.join(dir, 'agent'), mode, logger, onProgress: (p) => progress.update(p),
      });
      progress.end();
      const s = r.stats;
      out(`   ${label}: ${r.kind} in ${(r.durationMs / 1000).toFixed(2)} s, ${s.blocksSent} blocks / ${s.pagesSent} pages shipped, ${fmtBytes(s.bytesSent)} on the wire`);
      return r;
    };
    const prove = async () => {
      const [a, b] = await Promise.all([sha256File(image), sha256File(replica)]);
      const same = a === b;
      ok &&= same;
      out(`   sha256 source ${a.slice(0, 16)}… replica ${b.slice(0, 16)}… ${same ? 'EQUAL' : 'DIFFERENT'}`);
    };
    out('3. initial replication');
    await run('initial', 'auto');
    await prove();
    out('4. rewriting 1% of the disk in 4-64 KiB writes, then incremental replication');
    await churnImage(image, size, 0.01, 2, kinds);
    await run('incremental', 'auto');
    await prove();
    out('5. verify (page digests of source and replica, nothing changed)');
    const v = await run('verify', 'verify');
    ok &&= v.stats.mismatches.length === 0;
    out(`   ${v.stats.mismatches.length === 0 ? 'no differences' : `${v.stats.mismatches.length} differing ranges`}`);
  } finally {
    await stopServer(server);
    if (!opts.keep && !opts.dir) await fsp.rm(dir, { recursive: true, force: true });
  }
  out(ok ? 'RESULT: the replica equals the source' : 'RESULT: FAILED — the replica differs from the source');
  return ok ? 0 : 1;
}
