/**
 * Test failover that boots the recovered machine: a bootable disk built from Debian packages
 * (test/boot-disk.ts: MBR, extlinux, ext4 root, Debian cloud kernel, busybox init) is protected
 * by a real `mobility protect` against a real `mobility server`; a test failover with a network
 * mapping and the boot check boots the recovered image under TCG to the marker, and the guest
 * prints the mapped configuration on its console; then /sbin/init is overwritten on the source,
 * a new point is cut, and its boot check fails with the kernel's panic in the console tail.
 * Both results are kept with the test failovers and shown by status.
 *
 * Needs root, losetup, partx, mkfs.ext4, fsfreeze, tracefs, qemu-system-x86_64 and apt-get (or
 * the cached packages): a missing one fails the test.
 */
import t from 'tap';
import { execFileSync } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { bootParts, buildBootDisk, MARKER } from '../boot-disk.js';
import { cleanup } from '../cleanup.js';
import { runCli, startServer } from '../helpers.js';
import { Agent, LONG, statusArgs } from '../protect-harness.js';

const MAC = '52:54:00:4d:4f:01';

t.test('a test failover maps the network and boots the recovered machine; a corrupted one fails with its console tail', async (t) => {
  for (const tool of ['qemu-system-x86_64', 'fsfreeze']) {
    try { execFileSync('sh', ['-c', `command -v ${tool}`]); } catch { throw new Error(`${tool} is required for this test`); }
  }
  if (!fs.existsSync('/sys/kernel/tracing/instances')) { try { execFileSync('mount', ['-t', 'tracefs', 'tracefs', '/sys/kernel/tracing']); } catch { /* reported below */ } }
  if (!fs.existsSync('/sys/kernel/tracing/instances')) throw new Error('tracefs (/sys/kernel/tracing/instances) is required for this test');
  const parts = bootParts();
  const c = cleanup(t);
  const dir = c.dir('boot-failover-');
  const disk = await buildBootDisk(c, dir, parts);
  const agentId = `e2e-${process.pid}-${crypto.randomBytes(4).toString('hex')}`;
  c.traceInstances(agentId);
  const server = await startServer(t, path.join(dir, 'srv'));
  const conn = ['--server', server.info.url, '--token-file', server.info.tokenFile, '--ca', server.info.caFile!];
  const agent = new Agent(c, [...conn, '--disk', `${disk.loop}=d0`, '--agent-id', agentId, '--state-dir', path.join(dir, 'agent'),
    '--json-logs', '--freeze-limit', '60s', '--crash-interval', '60m', '--app-interval', '60m']);
  t.teardown(() => agent.stop());
  await agent.waitEvent((e) => e.event === 'pass-done', LONG, 'the initial pass');
  const first = await agent.cut('crash');
  t.equal(first.event, 'cut', `a recovery point of the bootable disk ${JSON.stringify(first)}`);
  const goodPoint = String(first.pointId);

  // the machine has no inventory (protected without registration): the mapping names its NIC
  const mapFile = path.join(dir, 'network-map.json');
  await fsp.writeFile(mapFile, JSON.stringify({
    version: 1,
    networks: [{ source: '10.0.0.0/24', target: { subnet: '192.168.77.0/24', gateway: '192.168.77.1', dns: ['192.168.77.53'], mode: 'static' } }],
    nics: [{ mac: MAC, name: 'eth0', source: '10.0.0.5/24' }],
  }));
  // bad input costs nothing: refused with its code before any image is made
  const api = (method: string, pathname: string, body?: unknown) => apiRequest(server.info.url, server.info.tokenFile, server.info.caFile!, method, pathname, body);
  const tfDir = path.join(server.info.dataDir, 'test-failover');
  const refused: [unknown, number, string, RegExp][] = [
    [{ networkMap: { version: 1, networks: [{ source: '10.0.0.1/24', target: { mode: 'dhcp' } }] } }, 400, 'MOB_ERR_NETWORK_MAP', /host bits/],
    [{ networkMap: { version: 1, networks: [{ source: '10.50.0.0/24', target: { mode: 'dhcp' } }] } }, 400, 'MOB_ERR_NETWORK_MAP', /no inventory of NICs/],
    [{ networkMap: 'not a mapping' }, 400, 'MOB_ERR_NETWORK_MAP', /must be an object/],
    [{ bootCheck: { bus: 'scsi' } }, 400, 'MOB_ERR_USAGE', /bootCheck\.bus must be one of virtio, nvme, ide/],
    [{ bootCheck: { marker: '(' } }, 400, 'MOB_ERR_USAGE', /not a regular expression/],
    [{ bootCheck: { timeoutMs: 5 } }, 400, 'MOB_ERR_USAGE', /timeoutMs/],
    [{ bootCheck: {}, cleanup: true }, 400, 'MOB_ERR_USAGE', /not with cleanup/],
  ];
  for (const [extra, status, code, re] of refused) {
    const r = await api('POST', '/v1/test-failover', { agent: agentId, point: goodPoint, ...(extra as object) });
    t.equal(r.status, status, `${JSON.stringify(extra)}: HTTP ${status}`);
    t.equal(r.json.code, code);
    t.match(String(r.json.message), re);
  }
  t.notOk(fs.existsSync(path.join(tfDir, agentId, goodPoint)), 'no image was made for a refused request');
  const badMap = path.join(dir, 'bad-map.json');
  await fsp.writeFile(badMap, '{ "version": 1, ');
  const cliBad = await runCli(['test-failover', ...conn, '--agent-id', agentId, '--network-map', badMap]).done;
  t.equal(cliBad.code, 3, 'a mapping file that is not JSON: exit 3');
  t.match(cliBad.stderr, /MOB_ERR_NETWORK_MAP.*not JSON/);
  const cliUsage = await runCli(['test-failover', ...conn, '--agent-id', agentId, '--boot-marker', 'x']).done;
  t.equal(cliUsage.code, 2, '--boot-marker without --boot-check: usage');

  const boot = ['--boot-check', '--boot-marker', `^${MARKER}$`, '--boot-timeout', '9m', '--boot-bus', 'nvme', '--boot-accel', 'tcg', '--boot-network', 'isolated'];
  const ok = await runCli(['test-failover', ...conn, '--agent-id', agentId, '--point', goodPoint, '--network-map', mapFile, ...boot]).done;
  t.equal(ok.code, 0, `the boot check of ${goodPoint} passes${ok.code ? `: ${ok.stdout}\n${ok.stderr.slice(-3000)}` : ''}`);
  t.match(ok.stdout, /network mapping written to disk d0 \(partition 1\) for systemd-networkd:\n {2}52:54:00:4d:4f:01 \(eth0\): 10\.0\.0\.5\/24 -> 192\.168\.77\.5\/24 via 192\.168\.77\.1, DNS 192\.168\.77\.53/);
  t.match(ok.stdout, /boot check: booted in [\d.]+ s \(tcg, nvme, network isolated\): "mobility-e2e: boot complete"/);
  // the console, streamed to stderr as the guest printed it: the mapped file, inside the guest, on the NIC with its MAC
  const consoleText = ok.stderr;
  t.match(consoleText, /\[d0\] guest: --- \/etc\/systemd\/network\/05-mobility-5254004d4f01\.network/, 'the guest found the mapped file');
  t.match(consoleText, /\[d0\] guest: \| MACAddress=52:54:00:4d:4f:01\n\[d0\] guest: \| \n\[d0\] guest: \| \[Network\]\n\[d0\] guest: \| Address=192\.168\.77\.5\/24\n\[d0\] guest: \| Gateway=192\.168\.77\.1\n\[d0\] guest: \| DNS=192\.168\.77\.53/,
    'and printed the mapped configuration');
  t.match(consoleText, /\[d0\] guest: nic eth0 52:54:00:4d:4f:01/, 'the guest has the NIC the configuration matches (isolated network, same MAC)');
  t.ok(consoleText.indexOf('Address=192.168.77.5/24') < consoleText.indexOf(`[d0] ${MARKER}`), 'before the marker');

  const j = await runCli(['test-failover', ...conn, '--agent-id', agentId, '--point', goodPoint, '--cleanup', '--json']).done;
  t.equal(j.code, 0, 'cleanup of the first test failover');

  // corrupt the source: init overwritten with garbage, then a new point
  const init = path.join(disk.mnt, 'sbin/init');
  await fsp.writeFile(init, crypto.randomBytes(8192), { mode: 0o755 });
  execFileSync('sync');
  const second = await agent.cut('crash');
  t.equal(second.event, 'cut', 'a point of the corrupted disk');
  const badPoint = String(second.pointId);
  t.not(badPoint, goodPoint);
  const bad = await runCli(['test-failover', ...conn, '--agent-id', agentId, '--point', badPoint, '--json', ...boot]).done;
  t.equal(bad.code, 1, `a failed boot check exits 1${bad.code === 1 ? '' : ` ${bad.stdout}\n${bad.stderr.slice(-2000)}`}`);
  const r = JSON.parse(bad.stdout) as { record: { point: string; bootCheck: { ok: boolean; reason: string; accel: string; tail: string[]; markerLine: string | null } } };
  t.equal(r.record.point, badPoint);
  t.notOk(r.record.bootCheck.ok, 'the corrupted machine does not boot');
  t.equal(r.record.bootCheck.reason, 'exited', 'the kernel panicked and the guest stopped (panic=-1 with -no-reboot)');
  t.equal(r.record.bootCheck.markerLine, null);
  t.match(r.record.bootCheck.tail.join('\n'), /Kernel panic - not syncing: (No working init found|Attempted to kill init)/, 'the console tail holds the panic');
  t.match(r.record.bootCheck.tail.join('\n'), /\/sbin\/init/, 'naming the init that failed');

  // both results are kept; status shows the last one, the API lists both
  const st = await runCli(statusArgs(server).filter((a) => a !== '--json')).done;
  t.equal(st.code, 0);
  t.match(st.stdout, new RegExp(`last test failovers:\\n {2}${agentId} ${badPoint} at \\S+: DID NOT BOOT \\(exited after [\\d.]+ s\\)`), 'status shows the failed boot check');
  const sj = JSON.parse((await runCli(statusArgs(server)).done).stdout) as { disks: { agent: string; disk: string; state: string }[]; testFailovers: { point: string; bootCheck: { ok: boolean } }[] };
  t.same(sj.disks.filter((d) => d.agent === agentId).map((d) => d.disk), ['d0'], 'what the checks keep is not taken for a disk');
  t.same(sj.testFailovers.map((x) => [x.point, x.bootCheck.ok]), [[badPoint, false]], 'status --json carries the last record');
  const list = (await api('GET', `/v1/test-failovers?agent=${agentId}`)).json.records as { point: string; bootCheck: { ok: boolean } | null; networkMapping: { stack: string } | null }[];
  t.same(list.map((x) => [x.point, x.bootCheck?.ok, x.networkMapping?.stack ?? null]), [[goodPoint, true, 'systemd-networkd'], [badPoint, false, null]], 'GET /v1/test-failovers lists both runs');
  const logs = await fsp.readdir(path.join(server.info.dataDir, 'boot-checks', agentId));
  t.equal(logs.length, 2, 'a console log per boot check on the server');
  await agent.stop();
});

/** An operator API request; answers status and JSON body. */
async function apiRequest(url: string, tokenFile: string, caFile: string, method: string, pathname: string, body?: unknown): Promise<{ status: number; json: Record<string, unknown> }> {
  const { default: https } = await import('node:https');
  const u = new URL(url);
  const token = (await fsp.readFile(tokenFile, 'utf8')).trim();
  const ca = await fsp.readFile(caFile);
  return new Promise((resolve, reject) => {
    const req = https.request({ host: u.hostname, port: u.port, path: pathname, method, ca, headers: { authorization: `Bearer ${token}`, 'content-type': 'application/json' } }, (res) => {
      const parts: Buffer[] = [];
      res.on('data', (d: Buffer) => parts.push(d));
      res.on('end', () => {
        try { resolve({ status: res.statusCode ?? 0, json: JSON.parse(Buffer.concat(parts).toString('utf8')) as Record<string, unknown> }); } catch (err) { reject(err as Error); }
      });
    });
    req.on('error', reject);
    req.end(body === undefined ? undefined : JSON.stringify(body));
  });
}
