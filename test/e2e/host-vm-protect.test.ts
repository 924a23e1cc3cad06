/**
 * Host mode end to end through the operator flow (issue 13): a real server, a host agent
 * registered with the passphrase and run as the real `mobility agent` service with vmSockets,
 * two VMs that are real qemu-storage-daemons (QMP sockets side by side as on Proxmox). The
 * operator enables one VM with `mobility enable --vm`; the host agent protects it with the
 * protector's QEMU mode, as the VM's machine. The "guest" writes into the images before the VM
 * starts (the initial copy has data to carry), and while protected through writable NBD exports
 * the test adds over the daemon's second monitor to the NBD server QEMU runs for the protection
 * (QEMU serves one NBD server; the guest's writes go through QEMU's block layer). Then:
 * `mobility cut --machine HOST.VM` (sent through the host's control connection) makes a point,
 * `mobility test-failover` materialises it and every disk image equals the VM's disk as QEMU
 * serves it. The other VM stays unprotected and untouched.
 *
 * Needs qemu-storage-daemon, qemu-img, qemu-io, nbdinfo, nbdcopy and /dev/fuse: a missing one fails.
 */
import t from 'tap';
import crypto from 'node:crypto';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { execFileSync, spawn } from 'node:child_process';
import { CLI_PATH } from '../../src/server/spawn.js';
import { QmpClient } from '../../src/source/qemu/qmp.js';
import { cleanup, runCli, startServer, stopGently, tmpDir, waitFor } from '../helpers.js';
import { QemuDaemon, createImage, requireQemuTools } from '../source/qemu/qemu-daemon.js';

const LONG = 240_000;

interface Json { [k: string]: unknown }

t.test('host mode: enable --vm, a recovery point of the VM, test failover equals the VM\'s disks', async (t) => {
  requireQemuTools();
  if (!fs.existsSync('/dev/fuse')) throw new Error('/dev/fuse is required (QEMU exports the disks through FUSE)');
  const work = await tmpDir(t, 'hostvmp-');
  const c = cleanup(t);
  const server = await startServer(t, path.join(work, 'srv'));
  const conn = ['--server', server.info.url, '--data-dir', server.info.dataDir];
  const cli = (args: string[]) => runCli(args).done;
  const json = async (args: string[], what = args.join(' ')): Promise<Json> => {
    const r = await cli([...args, ...conn, '--json']);
    if (r.code !== 0) throw new Error(`${what}: exit ${r.code}: ${r.stderr}`);
    return JSON.parse(r.stdout) as Json;
  };

  // VM 401: a qcow2 and a raw disk; VM 402: one qcow2 disk (never protected)
  const run = c.dir('qemu-server-');
  const vms: QemuDaemon[] = [];
  for (const [name, disks] of [['401', [['qcow2', '24M'], ['raw', '16M']]], ['402', [['qcow2', '16M']]]] as const) {
    const dir = c.dir(`vm${name}-`);
    const images = disks.map(([format, size], i) => {
      const image = path.join(dir, `disk${i}.${format}`);
      createImage(image, format, size);
      // data before the VM runs: what the initial copy carries
      const ops = Array.from({ length: 12 }, (_, k) => ['-c', `write -q -P ${(k * 17 + i * 5 + 1) % 255} ${(k * 7 + i) * 64 * 1024} ${64 * 1024}`]).flat();
      execFileSync('qemu-io', ['-f', format, ...ops, image]);
      return { image, format };
    });
    const d = new QemuDaemon(c, dir, images, false, { qmpSocket: path.join(run, `${name}.qmp`) });
    await d.start();
    t.teardown(() => d.stop());
    vms.push(d);
  }
  const vm = vms[0]!;

  const qmp = await QmpClient.connect(vm.testQmpSocket);
  t.teardown(() => qmp.close());
  // the host agent
  const midFile = path.join(work, 'machine-id');
  await fsp.writeFile(midFile, 'ef'.repeat(16) + '\n');
  // short: the protector's QEMU mode keeps an NBD unix socket under it (at most 107 bytes)
  const stateDir = c.dir('s');
  const config = path.join(work, 'agent.json');
  const logFile = path.join(work, 'agent.log');
  await fsp.writeFile(config, JSON.stringify({ server: server.info.url, stateDir, machineIdFile: midFile, logFile, inventoryIntervalMs: 60_000, vmSockets: path.join(run, '*.qmp') }));
  const reg = await cli(['register', '--config', config, '--passphrase-file', path.join(server.info.dataDir, 'passphrase'), '--json']);
  t.equal(reg.code, 0, reg.stderr);
  const hostId = (JSON.parse(reg.stdout) as { agentId: string }).agentId;
  const vmId = `${hostId}.401`;
  const agent = spawn(process.execPath, [CLI_PATH, 'agent', '--config', config, '--json-logs'], { stdio: ['ignore', 'ignore', 'pipe'] });
  let err = '';
  agent.stderr!.on('data', (d: Buffer) => { err = (err + d.toString()).slice(-400_000); });
  c.process(agent);
  t.teardown(() => stopGently(agent));
  await waitFor(() => err.includes('"control connected"'), LONG, 'control connection of the host agent');
  await waitFor(async () => {
    const m = ((await json(['machines'])).machines as { agentId: string; vms?: unknown[] }[]).find((x) => x.agentId === hostId);
    return (m?.vms?.length ?? 0) === 2;
  }, LONG, 'the host reports its two VMs');

  // the operator enables VM 401 (points on demand only: the crash interval is long)
  await json(['policy', 'create', 'vm', '--crash-interval', '1h', '--app-interval', '0']);
  const en = await json(['enable', '--machine', hostId, '--vm', '401', '--policy', 'vm']);
  t.equal(en.agentId, vmId);

  // a point once the initial copy is done (the cut waits for it), through the host's control connection
  const cut1 = await json(['cut', '--machine', vmId, '--timeout', '240s'], 'first cut of the VM');
  const p1 = (cut1.point as { id: string; disks: Record<string, unknown> });
  t.same(Object.keys(p1.disks).sort(), ['disk0', 'disk1'], 'one point covers every disk of the VM');

  // the guest writes while protected, through QEMU: writable NBD exports on the NBD server QEMU runs for the protection
  const nbdDir = path.join(stateDir, 'protect', vmId, 'qemu');
  const nbdSocket = fs.readdirSync(nbdDir).filter((f) => f.endsWith('.nbd')).map((f) => path.join(nbdDir, f))[0];
  t.ok(nbdSocket, 'QEMU runs an NBD server for the protection');
  for (const i of [0, 1]) {
    // a point's copy-before-write view unshares writes while it lives (the first point's may still be
    // going away): the export is added once no view is there
    await waitFor(() => qmp.execute('block-export-add', { type: 'nbd', id: `g${i}`, 'node-name': `disk${i}`, name: `g${i}`, writable: true })
      .then(() => true, (e: Error) => { if (!/Permission conflict/.test(e.message)) throw e; return false; }), LONG, `a writable export of disk${i}`);
    t.teardown(() => qmp.execute('block-export-del', { id: `g${i}`, mode: 'hard' }).catch(() => undefined));
  }
  // the disks as they are at point 1 (nothing wrote since)
  const atP1 = [0, 1].map((i) => {
    const f = path.join(work, `p1-disk${i}.raw`);
    execFileSync('nbdcopy', [`nbd+unix:///g${i}?socket=${nbdSocket!}`, f]);
    return fs.readFileSync(f);
  });
  for (let k = 0; k < 20; k++) vm.write(k % 2, (k * 13 % 200) * 64 * 1024 + 4096 * (k % 3), 64 * 1024 + 512 * k, 200 + k, `g${k % 2}`, nbdSocket!);
  const cut2 = await json(['cut', '--machine', vmId, '--timeout', '240s'], 'second cut of the VM');
  const p2 = (cut2.point as { id: string }).id;
  t.not(p2, p1.id, 'a new point');

  // test failover of each point: every disk image equals the VM's disk as QEMU served it at that point
  const failover = async (point: string): Promise<{ diskId: string; file: string }[]> => {
    const dl = path.join(work, `tf-${point}`);
    const tf = await cli(['test-failover', '--server', server.info.url, '--token-file', server.info.tokenFile, '--ca', server.info.caFile!, '--agent-id', vmId, '--point', point, '--download', dl, '--json']);
    t.equal(tf.code, 0, `test failover of ${point}${tf.code ? `: ${tf.stderr.slice(-400)}` : ''}`);
    const downloads = (JSON.parse(tf.stdout) as { downloads: { diskId: string; file: string }[] }).downloads;
    t.same(downloads.map((d) => d.diskId).sort(), ['disk0', 'disk1'], 'an image per disk of the VM');
    return downloads;
  };
  const now = [0, 1].map((i) => {
    const f = path.join(work, `now-disk${i}.raw`);
    execFileSync('nbdcopy', [`nbd+unix:///g${i}?socket=${nbdSocket!}`, f]);
    return fs.readFileSync(f);
  });
  for (const [point, want, what] of [[p1.id, atP1, 'point 1 (initial copy)'], [p2, now, 'point 2 (after the guest\'s writes while protected)']] as const) {
    for (const d of await failover(point)) {
      const i = Number(d.diskId.slice(4));
      const got = fs.readFileSync(d.file);
      t.equal(got.length, want[i]!.length, `${what}, ${d.diskId}: size`);
      t.ok(got.equals(want[i]!), `${what}, ${d.diskId}: the test-failover image is the VM's disk at the point (sha256 ${crypto.createHash('sha256').update(got).digest('hex').slice(0, 16)})`);
    }
  }
  t.notOk(atP1[0]!.equals(now[0]!) || atP1[1]!.equals(now[1]!), 'the guest\'s writes changed both disks between the points');

  // status: the VM machine's disks are continuous; VM 402 has no machine and no replica
  const st = await cli(['status', '--server', server.info.url, '--token-file', server.info.tokenFile, '--ca', server.info.caFile!, '--json']);
  t.equal(st.code, 0, st.stderr);
  t.match(st.stdout, new RegExp(vmId.replace('.', '\\.')), 'status lists the VM machine');
  t.notOk(fs.existsSync(path.join(server.info.dataDir, 'replicas', `${hostId}.402`)), 'the other VM is not replicated');
  t.notMatch(fs.readFileSync(logFile, 'utf8'), /protection of a VM failed/, 'the VM\'s protection never failed');

  // failover: a final cut through the VM's replication session carries the last guest writes into the promoted images
  for (let k = 0; k < 6; k++) vm.write(k % 2, (k * 29 % 150) * 64 * 1024, 64 * 1024, 240 + k, `g${k % 2}`, nbdSocket!);
  const last = [0, 1].map((i) => {
    const f = path.join(work, `last-disk${i}.raw`);
    execFileSync('nbdcopy', [`nbd+unix:///g${i}?socket=${nbdSocket!}`, f]);
    return fs.readFileSync(f);
  });
  const fo = await cli(['failover', '--server', server.info.url, '--token-file', server.info.tokenFile, '--ca', server.info.caFile!, '--agent-id', vmId, '--yes', '--json']);
  t.equal(fo.code, 0, `failover of the VM machine${fo.code ? `: ${fo.stderr.slice(-400)}` : ''}`);
  const r = JSON.parse(fo.stdout) as { point: { id: string }; finalCut: { requested: boolean; pointId: string | null }; disks: { diskId: string; localPath: string | null }[] };
  t.ok(r.finalCut.requested && r.finalCut.pointId === r.point.id, `failed over to the final cut ${r.point.id}`);
  for (const d of r.disks) {
    const got = fs.readFileSync(d.localPath!);
    t.ok(got.equals(last[Number(d.diskId.slice(4))]!), `failover, ${d.diskId}: the promoted image is the VM's disk with its last writes`);
  }
  // replication of the VM is stopped: its protection ends with MOB_ERR_FAILED_OVER and the host keeps running
  await waitFor(() => /protection of a VM failed[^\n]*MOB_ERR_FAILED_OVER|MOB_ERR_FAILED_OVER[^\n]*protection of a VM failed/.test(fs.readFileSync(logFile, 'utf8')), LONG, 'the VM\'s protection stops with MOB_ERR_FAILED_OVER');
  t.equal(agent.exitCode, null, 'the host agent keeps running');

  // failback: the VM is shut down, reprotect writes the differences into its images with the host's certificate
  await vm.stop('SIGTERM');
  // the promoted images become the replicas at the failback: kept here to compare with
  const promoted = new Map(r.disks.map((d) => [d.diskId, fs.readFileSync(d.localPath!)]));
  const images = vm.disks.map((d, i) => `${d.image}=disk${i}`);
  const viaToken = await cli(['reprotect', '--server', server.info.url, '--token-file', server.info.tokenFile, '--ca', server.info.caFile!, '--agent-id', vmId,
    '--vm-images', ...images.flatMap((x) => ['--disk', x]), '--yes']);
  t.match(viaToken.stderr, /MOB_ERR_FORBIDDEN/, 'the operator token alone cannot open the VM machine\'s session');
  const rp = await cli(['reprotect', '--server', server.info.url, '--token-file', server.info.tokenFile, '--ca', server.info.caFile!, '--agent-id', vmId,
    '--agent-state', stateDir, '--vm-images', ...images.flatMap((x) => ['--disk', x]), '--yes', '--json']);
  t.equal(rp.code, 0, `reprotect of the VM machine with the host's certificate${rp.code ? `: ${rp.stderr.slice(-600)}` : ''}`);
  for (const d of r.disks) {
    const i = Number(d.diskId.slice(4));
    const back = path.join(work, `back-disk${i}.raw`);
    execFileSync('qemu-img', ['convert', '-O', 'raw', vm.disks[i]!.image, back]);
    t.ok(fs.readFileSync(back).equals(promoted.get(d.diskId)!), `failback, ${d.diskId}: the VM's image now equals the promoted image`);
  }
  const after = await json(['status'], 'status after the failback');
  t.notOk(((after.disks ?? []) as { agent: string; state: string }[]).some((x) => x.agent === vmId && x.state === 'failed-over'), 'the VM machine is no longer failed over');
});
