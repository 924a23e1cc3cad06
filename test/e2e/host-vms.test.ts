/**
 * Host mode, operator flow (issue 13): a real server, a host agent registered with the
 * passphrase and run as the real `mobility agent` service with vmSockets, two VMs that are real
 * qemu-storage-daemons (their QMP sockets side by side as on Proxmox), and a second registered
 * machine that is not a host.
 *
 * Proves: the host's inventory lists its VMs and their disks and `mobility machines` shows them
 * under the host (nested in --json); `enable --vm` of an unknown VM, or on a machine that is not
 * a host, fails with MOB_ERR_UNKNOWN_VM naming the VMs; `enable --vm` runs QEMU's preflight on
 * the host and creates the VM machine (HOST.NAME) with every disk enabled, and the host agent
 * starts protecting exactly those nodes; a cut of the VM machine reaches the host's control
 * connection and is answered for the VM; the host's certificate may open replication sessions
 * for its VM, another agent's may not (MOB_ERR_FORBIDDEN); disable on the VM machine changes
 * only that VM's assignment; the assignments message carries the VM with its sockets, policy and
 * nodes. The tools are required: a missing one fails the test. The replication of the VM's data,
 * its points, test failover and failover are test/e2e/host-vm-protect.test.ts.
 */
import t from 'tap';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { spawn } from 'node:child_process';
import WebSocket from 'ws';
import { CLI_PATH } from '../../src/server/spawn.js';
import { credentialFiles } from '../../src/agent/config.js';
import { Connection } from '../../src/transport/client.js';
import { MobilityError } from '../../src/errors.js';
import { cleanup, runCli, startServer, stopGently, tmpDir, waitFor } from '../helpers.js';
import { QemuDaemon, createImage, requireQemuTools } from '../source/qemu/qemu-daemon.js';
import { silentSocket } from '../qemu-ga.js';

const LONG = 120_000;
const MiB = 1024 * 1024;

interface Json { [k: string]: unknown }
interface VmRow { agentId: string; name: string; status: string; inventoryDisks: { device: string; node: string; format: string; sizeBytes: number }[]; disks: { diskId: string; device: string }[]; policy: string | null; error: unknown }
interface MachineRow { agentId: string; connected: boolean; vms?: VmRow[] }

t.test('host mode: VMs of a KVM host as machines', async (t) => {
  requireQemuTools();
  const work = await tmpDir(t, 'hostvms-');
  const c = cleanup(t);
  const server = await startServer(t, path.join(work, 'srv'));
  const conn = ['--server', server.info.url, '--data-dir', server.info.dataDir];
  const cli = (args: string[]) => runCli(args).done;
  const json = async (args: string[]): Promise<Json> => {
    const r = await cli([...args, ...conn, '--json']);
    if (r.code !== 0) throw new Error(`${args.join(' ')}: exit ${r.code}: ${r.stderr}`);
    return JSON.parse(r.stdout) as Json;
  };
  const machines = async () => (await json(['machines'])).machines as MachineRow[];
  const pass = path.join(server.info.dataDir, 'passphrase');
  const serverCa = fs.readFileSync(server.info.caFile!, 'utf8');

  // the VMs: 301 with two disks (qcow2 + raw), 302 with one
  const run = c.dir('qemu-server-');
  const vms: QemuDaemon[] = [];
  const startVm = async (name: string, disks: readonly (readonly ['qcow2' | 'raw', string])[]) => {
    const dir = c.dir(`vm${name}-`);
    const images = disks.map(([format, size], i) => {
      const image = path.join(dir, `disk${i}.${format}`);
      createImage(image, format, size);
      return { image, format };
    });
    const d = new QemuDaemon(c, dir, images, false, { qmpSocket: path.join(run, `${name}.qmp`) });
    await d.start();
    t.teardown(() => d.stop());
    vms.push(d);
  };
  await startVm('301', [['qcow2', '64M'], ['raw', '32M']]);
  await startVm('302', [['qcow2', '16M']]);

  // two registered machines: the host, and one that is not a host
  const register = async (name: string, extra: object) => {
    const midFile = path.join(work, `machine-id-${name}`);
    await fsp.writeFile(midFile, (name === 'kvm' ? 'ab' : 'cd').repeat(16) + '\n');
    // short: the protector's QEMU mode keeps an NBD unix socket under it (at most 107 bytes)
    const stateDir = c.dir(`s${name}`);
    const config = path.join(work, `agent-${name}.json`);
    await fsp.writeFile(config, JSON.stringify({ server: server.info.url, stateDir, machineIdFile: midFile, logFile: path.join(work, `agent-${name}.log`), inventoryIntervalMs: 3_600_000, ...extra }));
    const reg = await cli(['register', '--config', config, '--passphrase-file', pass, '--json']);
    t.equal(reg.code, 0, reg.stderr);
    const f = credentialFiles(stateDir);
    return { agentId: (JSON.parse(reg.stdout) as { agentId: string }).agentId, config, stateDir, cert: fs.readFileSync(f.cert, 'utf8'), key: fs.readFileSync(f.key, 'utf8'), log: path.join(work, `agent-${name}.log`) };
  };
  const host = await register('kvm', { vmSockets: path.join(run, '*.qmp') });
  const other = await register('plain', {});
  const vmId = `${host.agentId}.301`;
  c.traceInstances(vmId);

  const agent = spawn(process.execPath, [CLI_PATH, 'agent', '--config', host.config, '--json-logs'], { stdio: ['ignore', 'ignore', 'pipe'] });
  let err = '';
  agent.stderr!.on('data', (d: Buffer) => { err = (err + d.toString()).slice(-400_000); });
  c.process(agent);
  t.teardown(() => stopGently(agent));
  await waitFor(() => err.includes('"control connected"'), LONG, 'control connection of the host agent');

  // the inventory: both VMs under the host, with their disks
  let hostRow: MachineRow | undefined;
  await waitFor(async () => { hostRow = (await machines()).find((m) => m.agentId === host.agentId); return (hostRow?.vms?.length ?? 0) === 2; }, LONG, 'the host reports its VMs');
  t.same(hostRow!.vms!.map((v) => [v.name, v.agentId]), [['301', `${host.agentId}.301`], ['302', `${host.agentId}.302`]], 'VMs nested under the host, with their machine ids');
  t.same(hostRow!.vms![0].inventoryDisks.map((d) => [d.device, d.node, d.format, d.sizeBytes]), [['disk0', 'disk0', 'qcow2', 64 * MiB], ['disk1', 'disk1', 'raw', 32 * MiB]], 'VM 301 disks');
  t.same(hostRow!.vms![1].inventoryDisks.map((d) => [d.node, d.format, d.sizeBytes]), [['disk0', 'qcow2', 16 * MiB]], 'VM 302 disks');
  t.same(hostRow!.vms!.map((v) => v.disks.length), [0, 0], 'nothing protected yet');
  t.notOk((await machines()).some((m) => m.agentId.startsWith(`${host.agentId}.`)), 'VMs are not listed as top-level machines');
  // a VM started later is reported at the next reload (the inventory interval is an hour here)
  await startVm('303', [['raw', '8M']]);
  // VM 303 has a guest agent channel (Proxmox: <vmid>.qga) where no agent answers
  await silentSocket(t, path.join(run, '303.qga'));
  agent.kill('SIGHUP');
  await waitFor(async () => ((await machines()).find((m) => m.agentId === host.agentId)?.vms?.length ?? 0) === 3, LONG, 'the reload reports the new VM');
  const text = await cli(['machines', ...conn]);
  t.equal(text.code, 0, text.stderr);
  t.match(text.stdout, new RegExp(`VMs of ${host.agentId}:\\n\\s+VM\\s+MACHINE\\s+STATE\\s+DISKS[^\\n]*\\n\\s+301\\s+${host.agentId}\\.301\\s+unknown\\s+2\\s+no\\s+not protected\\n\\s+disk0  node disk0  qcow2  64 MiB\\n\\s+disk1  node disk1  raw  32 MiB\\n\\s+302\\s`), 'mobility machines: the VMs indented under the host, each with its disks');

  // unknown VM, or a machine that is not a host: coded errors that say what exists
  const unknown = await cli(['enable', ...conn, '--machine', host.agentId, '--vm', 'nope']);
  t.equal(unknown.code, 3, 'unknown VM: exit 3');
  t.match(unknown.stderr, /MOB_ERR_UNKNOWN_VM[\s\S]*no VM named "nope"[\s\S]*its VMs: 301, 302, 303/);
  const notHost = await cli(['enable', ...conn, '--machine', other.agentId, '--vm', '301']);
  t.equal(notHost.code, 3);
  t.match(notHost.stderr, /MOB_ERR_UNKNOWN_VM[\s\S]*is not a host agent[\s\S]*vmSockets/);
  const mixed = await cli(['enable', ...conn, '--machine', host.agentId, '--vm', '301', '--disk', '/dev/sdb']);
  t.equal(mixed.code, 2, '--vm with --disk is a usage error');
  t.same((await machines()).find((m) => m.agentId === host.agentId)!.vms!.map((v) => v.disks.length), [0, 0, 0], 'the refusals changed nothing');

  // enable the VM: QEMU's preflight on the host, then every disk of the VM
  await json(['policy', 'create', 'vmpol', '--crash-interval', '30s']);
  const en = await json(['enable', '--machine', host.agentId, '--vm', '301', '--policy', 'vmpol']);
  t.match(en, { agentId: vmId, hostId: host.agentId, vm: '301', policy: 'vmpol' });
  t.same((en.disks as Json[]).map((d) => [d.diskId, d.node, d.format]), [['disk0', 'disk0', 'qcow2'], ['disk1', 'disk1', 'raw']], 'every disk of the VM');
  const checks = en.preflight as { id: string; ok: boolean }[];
  t.ok(checks.some((x) => x.id === 'qmp' && x.ok) && checks.some((x) => x.id === 'node:disk0' && x.ok) && checks.some((x) => x.id === 'node:disk1' && x.ok), 'QEMU preflight ran on the host, per node');
  t.notOk(checks.some((x) => x.id === 'tracefs'), 'no tracefs check for a VM');
  const vmRow = (await machines()).find((m) => m.agentId === host.agentId)!.vms!.find((v) => v.name === '301')!;
  t.same(vmRow.disks.map((d) => [d.diskId, d.device]), [['disk0', 'qemu:disk0'], ['disk1', 'qemu:disk1']], 'the VM machine has its disks enabled, as block nodes');
  t.equal(vmRow.policy, 'vmpol');
  const text2 = await cli(['machines', ...conn]);
  t.match(text2.stdout, /301\s+\S+\.301\s+unknown\s+2\s+no\s+2 disk\(s\) protected, policy vmpol\n\s+disk0  node disk0  qcow2  64 MiB  protected as disk0/, 'mobility machines shows the protection');

  // the host agent acts on the assignment: one protector for the VM, as the VM's machine, on its nodes
  const logLines = () => fs.existsSync(host.log) ? fs.readFileSync(host.log, 'utf8').split('\n').filter(Boolean).map((l) => JSON.parse(l) as Json) : [];
  await waitFor(() => logLines().some((l) => l.message === 'protecting a VM'), LONG, 'the host starts protecting the VM');
  const started = logLines().filter((l) => l.message === 'protecting a VM');
  t.match(started[0], { machine: vmId, vm: '301', qmpSocket: path.join(run, '301.qmp'), guestAgentSocket: null, policy: 'vmpol', disks: [{ diskId: 'disk0', node: 'disk0' }, { diskId: 'disk1', node: 'disk1' }] });

  // a cut of the VM machine reaches the host, which hands it to the VM's protection
  const cut = await cli(['cut', ...conn, '--machine', vmId, '--timeout', '240s', '--json']);
  t.equal(cut.code, 0, `a point of the VM${cut.code ? `: ${cut.stderr.slice(-400)}` : ''}`);
  t.same(Object.keys((JSON.parse(cut.stdout) as { point: { disks: Json } }).point.disks).sort(), ['disk0', 'disk1'], 'covering both disks');
  const cutLog = logLines().filter((l) => l.message === 'cut of a VM requested');
  t.match(cutLog[0], { machine: vmId, running: true }, 'the host got the cut request for its VM');

  // a consistency group with the VM machine: the group cut's messages reach the VM's protection through
  // the host and its answer comes back as the VM's (a qemu-storage-daemon has no guest CPUs to
  // pause, so the protector refuses its part with a coded error that names the VM)
  const grp = await cli(['group', 'create', 'g1', ...conn, '--machine', vmId, '--bound', '20s', '--interval', 'off']);
  t.equal(grp.code, 0, grp.stderr);
  const gcut = await cli(['group', 'cut', 'g1', ...conn, '--json']);
  t.not(gcut.code, 0, 'the group cut fails');
  t.match(gcut.stderr, new RegExp(`MOB_ERR_GROUP_CUT[\\s\\S]*${vmId.replace('.', '\\.')}`), 'naming the VM machine');
  t.notMatch(gcut.stderr, /did not answer|timed out|bound/, 'with the VM\'s own answer, not a timeout');
  t.ok(logLines().some((l) => l.message === 'group cut of a VM requested' && l.machine === vmId), 'the host handed the group cut to the VM');
  t.equal((await cli(['group', 'delete', 'g1', ...conn])).code, 0);

  // replication sessions: the host's certificate may write its VM's disks, another agent's may not
  const session = async (creds: { cert: string; key: string }, agentId: string): Promise<string> => {
    try {
      const s = await Connection.connect({
        url: `${server.info.url}/v1/replicate`, ca: serverCa, cert: creds.cert, key: creds.key,
        hello: { agentId, token: '', agentVersion: 'test', disks: [{ diskId: 'probe', sizeBytes: MiB, blockSize: 65536, pageSize: 4096 }] },
      });
      s.shutdown();
      return 'welcome';
    } catch (e) {
      if (e instanceof MobilityError) return e.code;
      throw e;
    }
  };
  t.equal(await session(host, vmId), 'welcome', 'the host\'s certificate replicates its VM\'s disks');
  t.equal(await session(other, vmId), 'MOB_ERR_FORBIDDEN', 'another agent\'s certificate cannot');
  t.equal(await session(host, other.agentId), 'MOB_ERR_FORBIDDEN', 'and the host cannot write another machine\'s disks');
  t.equal(await session(host, `${host.agentId}.302`), 'MOB_ERR_FORBIDDEN', 'nor those of a VM that is not a machine (never enabled)');

  // disable one disk of the VM: only that VM's assignment changes
  const dis = await cli(['disable', ...conn, '--machine', vmId, '--disk', 'disk1', '--yes']);
  t.equal(dis.code, 0, dis.stderr);
  await waitFor(() => logLines().filter((l) => l.message === 'protecting a VM').some((l) => JSON.stringify(l.disks) === JSON.stringify([{ diskId: 'disk0', node: 'disk0' }])), LONG, 'the host restarts the VM with one disk');

  // VM 303 has a guest agent channel: its protection freezes the guest through it for app-consistent
  // cuts; no agent answers there, so an app-consistent cut fails, coded
  const en303 = await json(['enable', '--machine', host.agentId, '--vm', '303']);
  t.equal(en303.agentId, `${host.agentId}.303`);
  const app = await cli(['cut', ...conn, '--machine', `${host.agentId}.303`, '--kind', 'app', '--timeout', '240s']);
  t.not(app.code, 0, 'the app-consistent cut of VM 303 is not app-consistent');
  t.match(app.stderr, /MOB_ERR_GUEST_AGENT[\s\S]*303\.qga[\s\S]*crash-consistent point rp-\d+ was recorded instead/, `the guest agent's error, and the crash-consistent point taken all the same (the view needs nothing from the guest): ${app.stderr.slice(-400)}`);

  // the assignments message itself (a control connection of the host's, the agent stopped first)
  await stopGently(agent);
  const msg = await new Promise<Json>((resolve, reject) => {
    const ws = new WebSocket(`${server.info.url}/v1/control`, { ca: serverCa, cert: host.cert, key: host.key });
    const timer = setTimeout(() => { ws.terminate(); reject(new Error('no assignments')); }, 30_000);
    ws.on('error', reject);
    ws.on('open', () => ws.send(JSON.stringify({ type: 'hello', machineId: 'ab'.repeat(16), agentVersion: 'test' })));
    ws.on('message', (d) => {
      const m = JSON.parse((d as Buffer).toString('utf8')) as Json;
      if (m.type === 'assignments') { clearTimeout(timer); ws.close(); resolve(m); }
    });
  });
  t.same(msg.disks, [], 'the host protects none of its own disks');
  t.match(msg.vms, [{ machineId: vmId, name: '301', qmpSocket: path.join(run, '301.qmp'), guestAgentSocket: null, policy: { name: 'vmpol', crashIntervalMs: 30_000 }, disks: [{ diskId: 'disk0', node: 'disk0' }] }]);
  t.match((msg.vms as unknown[])[1], { machineId: `${host.agentId}.303`, guestAgentSocket: path.join(run, '303.qga'), disks: [{ diskId: 'disk0', node: 'disk0' }] });
  t.equal((msg.vms as unknown[]).length, 2, 'only the enabled VMs');
});
