/**
 * Host mode in the configuration database (migration vm_machines): a database from before host
 * mode is upgraded in place and keeps its machines; a VM machine is an agents row with no
 * certificate linked to its host; its id cannot be taken by a registered machine nor a VM of
 * another host; deleting the host removes the links.
 */
import t from 'tap';
import path from 'node:path';
import { ConfigDb, MIGRATIONS } from '../../src/server/config-db.js';
import { tmpDir } from '../helpers.js';
import { migrationNumber, rollBackSchema } from './schema-rollback.js';

t.test('vm_machines: upgrade in place, VM rows linked to their host', async (t) => {
  const dir = path.join(await tmpDir(t), 'data');
  const first = ConfigDb.open(dir);
  first.upsertAgent({ id: 'kvm1', machineId: 'ab'.repeat(16), hostname: 'kvm1', certFingerprint: 'fp1', registeredWith: 'passphrase' });
  first.enableDisk('kvm1', 'sda', '/dev/sda');
  first.close();
  const n = migrationNumber(/CREATE TABLE vm_machines/);
  t.equal(n, MIGRATIONS.length, 'host mode is the newest migration on this branch');
  // as the server before host mode left it
  rollBackSchema(path.join(dir, 'config.db'), n - 1);
  const db = ConfigDb.open(dir);
  t.teardown(() => db.close());
  t.equal(db.schemaVersion, MIGRATIONS.length, 'upgraded in place');
  t.same(db.listDisks('kvm1').map((d) => d.diskId), ['sda'], 'the host and its disks are kept');
  t.same(db.listVmMachines(), [], 'no VM yet');

  const vm = db.ensureVmMachine('kvm1', 'kvm1.web', { name: 'web', qmpSocket: '/run/qemu-server/100.qmp', guestAgentSocket: '/run/qemu-server/100.qga' });
  t.match(vm, { agentId: 'kvm1.web', hostId: 'kvm1', name: 'web', qmpSocket: '/run/qemu-server/100.qmp', guestAgentSocket: '/run/qemu-server/100.qga' });
  const row = db.getAgent('kvm1.web')!;
  t.match(row, { id: 'kvm1.web', machineId: 'vm:kvm1.web', hostname: 'web', certFingerprint: '', registeredWith: 'host kvm1' }, 'a machine of its own, with no certificate');
  t.same(db.vmMachine('kvm1'), null, 'the host is not a VM');
  t.same(db.ensureVmMachine('kvm1', 'kvm1.web', { name: 'web', qmpSocket: '/run/qemu-server/101.qmp', guestAgentSocket: null }).qmpSocket, '/run/qemu-server/101.qmp', 'enabling again updates its sockets');
  t.equal(db.listVmMachines('kvm1').length, 1, 'still one VM');

  db.upsertAgent({ id: 'kvm2', machineId: 'cd'.repeat(16), hostname: 'kvm2', certFingerprint: 'fp2', registeredWith: 'passphrase' });
  t.throws(() => db.ensureVmMachine('kvm2', 'kvm1.web', { name: 'web', qmpSocket: '/x.qmp', guestAgentSocket: null }), { code: 'MOB_ERR_CONFIG', message: /VM of host kvm1/ }, 'a VM of another host');
  t.throws(() => db.ensureVmMachine('kvm1', 'kvm2', { name: 'kvm2', qmpSocket: '/x.qmp', guestAgentSocket: null }), { code: 'MOB_ERR_CONFIG', message: /registered machine/ }, 'a registered machine\'s id');
  t.same(db.listVmMachines().map((v) => v.agentId), ['kvm1.web'], 'the refusals wrote nothing');
  // a registration cannot take a VM's machine id over: its machine id is not a machine's
  t.throws(() => db.upsertAgent({ id: 'kvm1.web', machineId: 'ef'.repeat(16), hostname: 'evil', certFingerprint: 'fp3', registeredWith: 'passphrase' }), { code: 'MOB_ERR_CLONE' });
  t.equal(db.getAgent('kvm1.web')!.certFingerprint, '', 'the VM still has no certificate');
});
