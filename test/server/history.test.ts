/**
 * History on a real `mobility server` process over TLS on loopback: a registered agent's
 * protect-like session (raw frames with its client certificate) sends health reports and cuts;
 * the samples (aggregated per window: MOBILITY_HISTORY_WINDOW_MS, the test knob, shortens the
 * 10 s window), the events (state changes, points, sessions lost) and an RPO alert (policy
 * threshold 1 s) that fires and clears are served by GET /v1/history, /v1/events, /v1/alerts and
 * the CLI, and are still there after a restart. Waits are on progress, never on the clock.
 */
import t from 'tap';
import crypto from 'node:crypto';
import fsp from 'node:fs/promises';
import https from 'node:https';
import path from 'node:path';
import { AGENT_VERSION, PROTOCOL_VERSION } from '../../src/constants.js';
import { digestBytes } from '../../src/protocol/digest.js';
import { Encoding, type CutDisk } from '../../src/protocol/frame-codec.js';
import { RawSession } from '../raw-session.js';
import { runCli, startServer, stopServer, tmpDir, waitFor } from '../helpers.js';

function get(url: string, ca: string, pathname: string, token: string): Promise<{ status: number; json: Record<string, unknown> }> {
  const u = new URL(url.replace(/^wss:/, 'https:'));
  return new Promise((resolve, reject) => {
    const req = https.request({ host: u.hostname, port: u.port, path: pathname, method: 'GET', ca, headers: { authorization: `Bearer ${token}` } }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (c: string) => (body += c));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, json: JSON.parse(body) as Record<string, unknown> }));
    });
    req.on('error', reject);
    req.end();
  });
}

interface Sample { at: string; resMs: number; rpoMs: number | null; dataLagMs: number | null; backlogBytes: number | null; churnBytesPerSec: number | null; state: string }
interface Ev { id: number; at: string; agent: string; disk: string | null; kind: string; state: string | null; code: string | null; reason: string }
interface Alert { id: number; agent: string; disk: string; kind: string; active: boolean; firedAt: string; clearedAt: string | null; rpoMs: number; thresholdMs: number; reason: string; clearReason: string | null }

const BLOCK = 65536;

t.test('history, events and RPO alerts on a real server, kept across a restart', async (t) => {
  const dir = await tmpDir(t);
  const dataDir = path.join(dir, 'srv');
  const prevWindow = process.env.MOBILITY_HISTORY_WINDOW_MS;
  process.env.MOBILITY_HISTORY_WINDOW_MS = '200'; // the test knob: inherited by the server process
  t.teardown(() => { if (prevWindow === undefined) delete process.env.MOBILITY_HISTORY_WINDOW_MS; else process.env.MOBILITY_HISTORY_WINDOW_MS = prevWindow; });
  let srv = await startServer(t, dataDir);
  const ca = await fsp.readFile(srv.info.caFile!, 'utf8');
  const token = (await fsp.readFile(srv.info.tokenFile, 'utf8')).trim();
  const cli = async (args: string[]) => runCli([...args, '--data-dir', dataDir, '--server', srv.info.url]).done;
  const api = async (p: string) => get(srv.info.url, ca, p, token);

  // a registered agent under a policy with a 1 s RPO threshold
  const agentId = `hist-${crypto.randomBytes(3).toString('hex')}`;
  const stateDir = path.join(dir, 'agent-state');
  await fsp.mkdir(stateDir, { recursive: true, mode: 0o700 });
  await fsp.writeFile(path.join(stateDir, 'identity.json'), JSON.stringify({ agentId }));
  const midFile = path.join(dir, 'machine-id');
  await fsp.writeFile(midFile, crypto.randomBytes(16).toString('hex') + '\n');
  const config = path.join(dir, 'agent.json');
  await fsp.writeFile(config, JSON.stringify({ server: srv.info.url, stateDir, logFile: path.join(dir, 'agent.log'), machineIdFile: midFile }));
  const reg = await runCli(['register', '--config', config, '--passphrase-file', path.join(dataDir, 'passphrase'), '--json']).done;
  t.equal(reg.code, 0, reg.stderr);
  const pol = await cli(['policy', 'create', 'fast', '--rpo', '1s']);
  t.equal(pol.code, 0, pol.stderr);
  const asg = await cli(['policy', 'assign', '--machine', agentId, '--policy', 'fast']);
  t.equal(asg.code, 0, asg.stderr);
  const tls = {
    ca, cert: await fsp.readFile(path.join(stateDir, 'agent.pem'), 'utf8'), key: await fsp.readFile(path.join(stateDir, 'agent.key'), 'utf8'),
  };

  const s = new RawSession(srv.info.url, tls);
  await s.open();
  const blk = crypto.randomBytes(BLOCK);
  s.send({ type: 'hello', hello: { protocolVersion: PROTOCOL_VERSION, agentId, token: '', agentVersion: AGENT_VERSION, disks: [{ diskId: 'h0', sizeBytes: 1 << 20, blockSize: BLOCK, pageSize: 4096 }] } });
  t.equal((await s.next('welcome'))?.type, 'welcome', 'the registered agent\'s session is welcomed');
  s.send({ type: 'data', data: { disk: 0, seq: 1, blocks: [{ index: 0, encoding: Encoding.RAW, length: BLOCK, pageMask: Buffer.alloc(0), digest: digestBytes(blk) }] } }, blk);
  t.equal((await s.next('ack'))?.type, 'ack');
  s.send({ type: 'passEnd', passEnd: { disk: 0, seq: 2, kind: 'initial' } });
  t.equal((await s.next('ack'))?.type, 'ack');
  const health = (state: string, reason: string, lag: number, backlog: number, churn: number) => s.send({
    type: 'health', health: { disks: [{ disk: 0, state, reason, backlogBytes: backlog, dataLagMs: lag, churnBytesPerSec: churn, freezeFailures: 0, lastFreezeMs: 5, progressPermille: 1000 }] },
  });
  health('continuous', '', 1000, 100, 1000);
  health('continuous', '', 3000, 300, 3000);
  health('continuous', '', 2000, 200, 2000);

  const samplesOf = async (range = '1h'): Promise<Sample[]> => {
    const r = await api(`/v1/history?agent=${agentId}&disk=h0&range=${range}`);
    t.equal(r.status, 200);
    const series = r.json.series as { agent: string; disk: string; samples: Sample[] }[];
    return series.find((x) => x.agent === agentId && x.disk === 'h0')?.samples ?? [];
  };
  let samples: Sample[] = [];
  await waitFor(async () => (samples = await samplesOf()).length > 0 && samples.reduce((n, x) => Math.max(n, x.dataLagMs ?? 0), 0) === 3000, 120_000, 'the health reports to be sampled');
  t.ok(samples.length <= 3, `at most one sample per window (${samples.length} for 3 reports)`);
  t.equal(new Set(samples.map((x) => x.at)).size, samples.length, 'one row per disk and window');
  t.equal(samples.reduce((n, x) => Math.max(n, x.backlogBytes ?? 0), 0), 300, 'the highest backlog of the window');
  t.ok(samples.every((x) => x.state === 'continuous' && x.resMs === 200 && x.rpoMs === null), 'state, window length; no point yet: no RPO');
  if (samples.length === 1) t.equal(samples[0]!.churnBytesPerSec, 2000, 'the mean churn of the window');
  const bad = await api(`/v1/history?agent=${agentId}&range=2d`);
  t.equal(bad.status, 400, 'an unknown range is refused');
  t.equal((bad.json as { code: string }).code, 'MOB_ERR_USAGE');
  t.equal((await api('/v1/events?limit=0')).status, 400, 'a bad limit is refused');

  // a cut becomes a point: its event; then the RPO passes the 1 s threshold: an alert fires
  let cutId = 0;
  const cut = async (): Promise<string> => {
    s.send({ type: 'cut', cut: { cutId: ++cutId, kind: 'crash', takenAtMs: Date.now(), frozenMs: 5, note: '', disks: [{ disk: 0, seq: 2, samplePages: [0], sampleDigests: digestBytes(blk.subarray(0, 4096)) } as CutDisk] } });
    const ack = await s.next('cutAck');
    if (ack?.type !== 'cutAck' || !ack.cutAck.pointId) throw new Error(`the cut did not become a point: ${JSON.stringify(ack)}`);
    return ack.cutAck.pointId;
  };
  const eventsOf = async (q = ''): Promise<Ev[]> => (await api(`/v1/events?limit=1000${q}`)).json.events as Ev[];
  const alertsOf = async (active: boolean): Promise<Alert[]> => ((await api(`/v1/alerts${active ? '?active=1' : ''}`)).json.alerts as Alert[]).filter((a) => a.agent === agentId);
  const p1 = await cut();
  await waitFor(async () => (await eventsOf()).some((e) => e.kind === 'point' && e.reason.includes(p1)), 120_000, 'the point event');
  let active: Alert[] = [];
  await waitFor(async () => (active = await alertsOf(true)).length > 0, 120_000, 'the RPO alert to fire');
  t.equal(active.length, 1, 'one active alert');
  t.match(active[0], { disk: 'h0', kind: 'rpo', active: true, thresholdMs: 1000, clearedAt: null });
  t.ok(active[0]!.rpoMs > 1000, `it carries the RPO (${active[0]!.rpoMs} ms) over the threshold`);
  t.match(active[0]!.reason, /RPO .* is over the threshold 1\.0 s/);
  const st = await cli(['status']);
  t.equal(st.code, 0, st.stderr);
  t.match(st.stdout, /ACTIVE ALERTS \(1\)/, 'mobility status shows the active alert');
  t.match(st.stdout, new RegExp(`${agentId}/h0 +rpo: RPO`));
  const stJson = JSON.parse((await cli(['status', '--json'])).stdout) as { alerts: Alert[] };
  t.equal(stJson.alerts.length, 1, 'and in its JSON');

  // new points until one is seen by a flush with the RPO back under the threshold (however slow the machine)
  let cleared: Alert[] = [];
  for (;;) {
    const p = await cut();
    await waitFor(async () => (await eventsOf()).some((e) => e.kind === 'point' && e.reason.includes(`point ${p} `)), 120_000, `the point event of ${p}`);
    // the flush that wrote the point event evaluated the RPO with it: the alert is cleared unless the flush came > 1 s later
    if ((await alertsOf(true)).length === 0) break;
  }
  // (on a very slow machine an alert may fire again between two cuts: each one is cleared the same way)
  cleared = (await alertsOf(false)).filter((a) => !a.active);
  t.ok(cleared.length >= 1, 'the alert is cleared');
  t.equal(cleared[cleared.length - 1]!.id, active[0]!.id, 'the first alert among them');
  t.ok(cleared[0]!.clearedAt && Date.parse(cleared[0]!.clearedAt) >= Date.parse(cleared[0]!.firedAt), 'with its time');
  t.match(cleared[0]!.clearReason, /back under the threshold 1\.0 s/, 'and its reason');

  // a state change with its reason, then the session is lost
  health('resync-required', 'the tracker lost changes (test)', 0, 0, 0);
  await waitFor(async () => (await eventsOf()).some((e) => e.kind === 'state' && e.state === 'resync-required'), 120_000, 'the state event');
  s.ws.close();
  await waitFor(async () => (await eventsOf()).some((e) => e.kind === 'session-lost' && e.disk === 'h0'), 120_000, 'the session-lost event');
  await waitFor(async () => (await samplesOf()).some((x) => x.state === 'disconnected' && x.rpoMs !== null), 120_000, 'a sample of the disconnected disk');
  await waitFor(async () => (await alertsOf(true)).length === 1, 120_000, 'the alert of the disconnected disk');

  const events = await eventsOf();
  const mine = events.filter((e) => e.agent === agentId);
  t.ok(mine.every((e, i) => i === 0 || Date.parse(mine[i - 1]!.at) >= Date.parse(e.at)), 'events newest first');
  const stateEv = mine.filter((e) => e.kind === 'state');
  t.match(stateEv.map((e) => e.reason), ['continuous -> resync-required: the tracker lost changes (test)', 'new -> continuous'], 'state changes with their reasons');
  for (const k of ['point', 'alert-fired', 'alert-cleared', 'session-lost']) t.ok(mine.some((e) => e.kind === k), `a ${k} event`);
  t.equal((await eventsOf(`&since=${encodeURIComponent(mine[0]!.at)}&disk=h0`)).every((e) => Date.parse(e.at) >= Date.parse(mine[0]!.at) && e.disk === 'h0'), true, 'since and disk filter');

  // the CLI
  const hist = await cli(['status', '--history', '--agent', agentId, '--disk', 'h0']);
  t.equal(hist.code, 0, hist.stderr);
  t.match(hist.stdout, /history of the last 1h/);
  t.match(hist.stdout, new RegExp(`${agentId} +h0 +\\d{4}-\\d\\d-\\d\\d \\d\\d:\\d\\d`), 'a row of the table');
  const histJson = JSON.parse((await cli(['status', '--history', '--range', '24h', '--json', '--agent', agentId])).stdout) as { range: string; series: { samples: Sample[] }[] };
  t.equal(histJson.range, '24h');
  t.ok(histJson.series[0]!.samples.length >= samples.length, 'every sample in --json');
  t.equal((await cli(['status', '--history', '--range', '2d'])).code, 2, 'a bad --range is a usage error');
  const ev = await cli(['events', '--agent', agentId]);
  t.equal(ev.code, 0, ev.stderr);
  t.match(ev.stdout, /session-lost/);
  t.match(ev.stdout, /alert-cleared/);
  const al = await cli(['alerts', '--all']);
  t.equal(al.code, 0, al.stderr);
  t.match(al.stdout, /active/);
  t.match(al.stdout, /cleared: RPO/);

  // a restart: everything is still there
  const beforeSamples = (await samplesOf()).length;
  const beforeEvents = mine.length;
  await stopServer(srv);
  srv = await startServer(t, dataDir);
  t.ok((await samplesOf()).length >= beforeSamples, 'the samples survive a restart');
  t.ok((await eventsOf()).filter((e) => e.agent === agentId).length >= beforeEvents, 'the events survive a restart');
  const after = await alertsOf(false);
  t.equal(after.filter((a) => a.active).length, 1, 'the active alert is still active');
  t.same(after.filter((a) => !a.active).map((a) => a.id), cleared.map((a) => a.id), 'the cleared alerts are still listed');
  const h7 = await samplesOf('7d');
  t.ok(h7.length > 0 && h7.every((x) => x.resMs === 60_000), '7d: samples folded per minute');
});
