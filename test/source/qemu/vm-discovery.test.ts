/**
 * Host mode discovery (src/source/qemu/vm-discovery.ts) against real qemu-storage-daemons: two
 * daemons stand for two VMs, their QMP sockets side by side in one directory as Proxmox keeps
 * them (/var/run/qemu-server/<vmid>.qmp), one with a guest agent socket next to it (<vmid>.qga).
 * Next to them a socket that accepts and never greets (a hung QEMU) and a stale socket file
 * nobody listens on (a VM that was killed): both are reported with their error, and the
 * inventory is not held up by the hung one beyond its bound. Missing tools fail the test.
 */
import t from 'tap';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { discoverVms, expandSocketGlob, nameFromSocket, vmDisksFrom, vmMachineId, vmDiskId } from '../../../src/source/qemu/vm-discovery.js';
import { loadAgentConfig } from '../../../src/agent/config.js';
import { cleanup } from '../../cleanup.js';
import { QemuDaemon, createImage, requireQemuTools } from './qemu-daemon.js';

const MiB = 1024 * 1024;

/** A unix socket server that accepts connections and never writes: a QEMU whose monitor hangs. */
function silentSocket(file: string): Promise<net.Server> {
  const conns: net.Socket[] = [];
  const srv = net.createServer((s) => { conns.push(s); s.on('error', () => undefined); });
  srv.on('close', () => { for (const s of conns) s.destroy(); });
  return new Promise((resolve, reject) => { srv.once('error', reject); srv.listen(file, () => resolve(srv)); });
}

t.test('machine ids and disk ids of VMs', async (t) => {
  t.equal(vmMachineId('kvm1', 'web 01/prod'), 'kvm1.web_01_prod', 'characters outside [A-Za-z0-9_-] become _');
  const long = vmMachineId('host-with-a-rather-long-name-0123456789', 'a-vm-with-an-even-longer-name-0123456789');
  t.equal(long.length, 64, 'truncated to 64 characters');
  t.ok(long.startsWith('host-with-a-rather-long-name-0123456789.a-vm'), 'host first, then the name');
  t.equal(vmDiskId('drive-scsi0'), 'drive-scsi0');
  t.equal(vmDiskId('/machine/peripheral/x'), '_machine_peripheral_x');
  t.equal(nameFromSocket('/var/run/qemu-server/100.qmp'), '100', 'Proxmox: the VM id');
});

t.test('query-block drives: CD-ROMs and empty drives are left out, the device and node come from the drive', async (t) => {
  const blocks = [
    { device: 'drive-scsi0', qdev: 'scsi0', removable: false, inserted: { 'node-name': '#block123', file: '/var/lib/vz/images/100/vm-100-disk-0.qcow2', drv: 'qcow2', image: { 'virtual-size': 8 * 1024 * MiB } } },
    { device: 'drive-ide2', qdev: 'ide2', removable: true, inserted: { 'node-name': '#block456', file: '/iso/debian.iso', drv: 'raw' } },
    { device: '', qdev: '/machine/peripheral/virtio-disk1/virtio-backend', removable: false, inserted: { 'node-name': 'libvirt-2-format', file: '/var/lib/libvirt/images/d1.raw', drv: 'raw', image: { 'virtual-size': 4 * MiB } } },
    { device: 'floppy0', removable: true },
  ];
  t.same(vmDisksFrom(blocks, []), [
    { device: 'drive-scsi0', node: '#block123', file: '/var/lib/vz/images/100/vm-100-disk-0.qcow2', format: 'qcow2', sizeBytes: 8 * 1024 * MiB, persistentTracking: true },
    { device: 'virtio-disk1', node: 'libvirt-2-format', file: '/var/lib/libvirt/images/d1.raw', format: 'raw', sizeBytes: 4 * MiB, persistentTracking: false },
  ]);
  t.same(vmDisksFrom('nonsense', null), [], 'answers that are not lists give no disk, never a throw');
});

t.test('two VMs behind a glob: names, nodes, sizes, formats; a hung socket and a stale one reported, not hanging', async (t) => {
  requireQemuTools();
  const c = cleanup(t);
  const run = c.dir('qemu-server-');
  const vms: QemuDaemon[] = [];
  for (const [name, disks] of [['101', [['qcow2', '64M'], ['raw', '32M']]], ['102', [['raw', '16M']]]] as const) {
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
  }
  // VM 101 has a guest agent socket next to its QMP socket
  const qga = await silentSocket(path.join(run, '101.qga'));
  t.teardown(() => new Promise<void>((r) => qga.close(() => r())));
  // a hung QEMU: accepts, never greets
  const hung = await silentSocket(path.join(run, '103.qmp'));
  t.teardown(() => new Promise<void>((r) => hung.close(() => r())));
  // a killed QEMU: the socket file stays, nobody listens (a process that listened, killed with SIGKILL)
  const staleFile = path.join(run, '104.qmp');
  const killed = c.spawn(process.execPath, ['-e', `require('net').createServer().listen(${JSON.stringify(staleFile)}, () => console.log('up'))`], { stdio: ['ignore', 'pipe', 'ignore'] });
  await new Promise<void>((resolve, reject) => { killed.stdout!.once('data', () => resolve()); killed.once('exit', () => reject(new Error('the listener exited'))); });
  killed.removeAllListeners('exit');
  const gone = new Promise<void>((r) => killed.once('exit', () => r()));
  killed.kill('SIGKILL');
  await gone;
  t.ok(fs.statSync(staleFile).isSocket(), 'the killed listener left its socket file');
  fs.writeFileSync(path.join(run, 'notes.qmp.txt'), 'not a socket');
  fs.writeFileSync(path.join(run, '105.qmp'), 'a regular file, not a socket');

  const glob = path.join(run, '*.qmp');
  t.same(await expandSocketGlob(glob), ['101', '102', '103', '104'].map((n) => path.join(run, `${n}.qmp`)), 'the glob matches sockets only');
  t.same(await expandSocketGlob(path.join(path.dirname(run), 'qemu-server-*', '10?.qmp')), [], '? is no wildcard: literal');
  t.same((await expandSocketGlob(path.join(path.dirname(run), `${path.basename(run).slice(0, 12)}*`, '*.qmp'))).filter((s) => s.startsWith(run)).length, 4, '* works in a directory segment too');
  await t.rejects(expandSocketGlob('relative/*.qmp'), { code: 'MOB_ERR_CONFIG' });
  await t.rejects(expandSocketGlob('/var/**/x.qmp'), { code: 'MOB_ERR_CONFIG' });

  const BOUND = 3000;
  const t0 = Date.now();
  const found = await discoverVms(glob, 'kvm1', { timeoutMs: BOUND });
  const took = Date.now() - t0;
  t.same(found.map((v) => v.name), ['101', '102', '103', '104'], 'qemu-storage-daemon has no query-name: the socket file name without extension');
  const [a, b, h, s] = found;
  t.same(a, {
    name: '101', machineId: 'kvm1.101', qmpSocket: path.join(run, '101.qmp'), guestAgentSocket: path.join(run, '101.qga'), status: 'unknown',
    disks: [
      { device: 'disk0', node: 'disk0', file: vms[0].disks[0].image, format: 'qcow2', sizeBytes: 64 * MiB, persistentTracking: true },
      { device: 'disk1', node: 'disk1', file: vms[0].disks[1].image, format: 'raw', sizeBytes: 32 * MiB, persistentTracking: false },
    ],
  }, 'VM 101: both format nodes (not their file nodes), sizes, formats, its guest agent socket');
  t.same(b.disks, [{ device: 'disk0', node: 'disk0', file: vms[1].disks[0].image, format: 'raw', sizeBytes: 16 * MiB, persistentTracking: false }], 'VM 102');
  t.equal(b.guestAgentSocket, null, 'no .qga next to 102.qmp: no guest agent');
  t.equal(b.error, undefined);
  t.match(h, { name: '103', status: 'unreachable', disks: [], error: { code: 'MOB_ERR_QMP', message: /103\.qmp/ } }, 'the hung socket is reported with its error');
  t.match(s, { name: '104', status: 'unreachable', disks: [], error: { code: 'MOB_ERR_QMP', message: /ECONNREFUSED|closed/ } }, 'the stale socket is reported with its error');
  // the sockets are probed in parallel, each bounded: the hung one costs its bound once, not more
  t.ok(took < BOUND * 3, `discovery returned after ${took} ms with a socket that never answers (bound ${BOUND} ms per socket)`);
  t.ok(took >= BOUND - 100, 'and it did wait for the hung socket up to its bound');

  // a socket held by a protection is not probed: its last probe is reported again
  const held = new Set([a.qmpSocket]);
  const again = await discoverVms(glob, 'kvm1', { timeoutMs: BOUND, held, previous: new Map([[a.qmpSocket, { ...a, probedAt: '2026-01-01T00:00:00.000Z' }]]) });
  t.same(again[0], { ...a, probedAt: '2026-01-01T00:00:00.000Z' }, 'held socket: the previous probe, dated');
  const never = await discoverVms(glob, 'kvm1', { timeoutMs: BOUND, held });
  t.match(never[0], { name: '101', status: 'unknown', disks: [], error: { code: 'MOB_ERR_QMP', message: /held by the agent's protection/ } }, 'held and never probed: said so');

  // a VM stopped: its socket goes, and so does the VM from the inventory
  await vms[1].stop();
  const after = await discoverVms(glob, 'kvm1', { timeoutMs: BOUND });
  t.notOk(after.some((v) => v.name === '102' && !v.error), 'a stopped VM is not reported as running');
});

t.test('agent.json vmSockets: an absolute glob, refused otherwise with MOB_ERR_CONFIG', async (t) => {
  const c = cleanup(t);
  const dir = c.dir('cfg-');
  const write = (o: object) => { const f = path.join(dir, `a${Math.random()}.json`); fs.writeFileSync(f, JSON.stringify({ server: 'wss://x:1', stateDir: '/var/lib/mobility', ...o })); return f; };
  t.equal((await loadAgentConfig(write({ vmSockets: '/var/run/qemu-server/*.qmp' }))).vmSockets, '/var/run/qemu-server/*.qmp');
  await t.rejects(loadAgentConfig(write({ vmSockets: 'qemu-server/*.qmp' })), { code: 'MOB_ERR_CONFIG', message: /vmSockets/ });
  await t.rejects(loadAgentConfig(write({ vmSockets: '/var/**/*.qmp' })), { code: 'MOB_ERR_CONFIG', message: /vmSockets/ });
  await t.rejects(loadAgentConfig(write({ vmSockets: 7 })), { code: 'MOB_ERR_CONFIG', message: /vmSockets/ });
});
