/**
 * GET /metrics (Prometheus) on a real `mobility server` process over TLS on loopback:
 * the exposition parses strictly (test/prom-text.ts, itself tested here first), it carries the
 * real figures of a real `mobility replicate` and of a protect-like session (health report,
 * cut), errors by code, no access without a token, the metrics token opens nothing else, and
 * no secret ever appears in it; with an azure store (Azurite), the requests by operation and
 * no credential. `promtool check metrics` runs too when it is installed.
 */
import t from 'tap';
import { spawnSync } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import https from 'node:https';
import path from 'node:path';
import { AGENT_VERSION, PROTOCOL_VERSION } from '../../src/constants.js';
import { digestBytes } from '../../src/protocol/digest.js';
import { Encoding, type CutDisk } from '../../src/protocol/frame-codec.js';
import { DISK_STATES } from '../../src/server/metrics.js';
import { parseExposition, sampleValue, METRIC_NAME, type Family } from '../prom-text.js';
import { startAzurite, writeCredentialsFile } from '../azurite.js';
import { RawSession } from '../raw-session.js';
import { replicateArgs, runCli, startServer, tmpDir, waitFor } from '../helpers.js';

t.test('the exposition reader accepts the format and refuses what a scraper would', async (t) => {
  const good = [
    '# HELP a_total A counter.', '# TYPE a_total counter', 'a_total{x="1",y="q\\"uo\\\\te\\n"} 3', 'a_total{x="2"} 0',
    '# a plain comment', '',
    '# TYPE g gauge', 'g{l="n"} -1.5e3', 'g{l="NaN"} NaN', 'g{l="inf"} +Inf',
    '# HELP h A histogram.', '# TYPE h histogram',
    'h_bucket{k="a",le="0.1"} 1', 'h_bucket{k="a",le="1"} 2', 'h_bucket{k="a",le="+Inf"} 3', 'h_sum{k="a"} 4.5', 'h_count{k="a"} 3',
    '# TYPE s summary', 's{quantile="0.5"} 1', 's_sum 2', 's_count 2',
    '# TYPE u untyped', 'u 1 1700000000000', '# TYPE v gauge', 'v Nan', '',
  ].join('\n');
  const f = parseExposition(good);
  t.equal(f.get('a_total')?.type, 'counter');
  t.equal(f.get('a_total')?.help, 'A counter.');
  t.same(f.get('a_total')?.samples[0].labels, { x: '1', y: 'q"uo\\te\n' }, 'label escapes are decoded');
  t.equal(sampleValue(f, 'g', { l: 'n' }), -1500);
  t.throws(() => sampleValue(f, 'g'), /3 samples/, 'an ambiguous query throws');
  t.equal(sampleValue(f, 'h_count', { k: 'a' }), 3);
  t.ok(Number.isNaN(sampleValue(f, 'g', { l: 'NaN' })));
  t.equal(sampleValue(f, 'g', { l: 'inf' }), Infinity);
  const bad: [string, string[], RegExp][] = [
    ['an undeclared family', ['x 1'], /belongs to no declared family/],
    ['a bad metric name', ['# TYPE 1x gauge', '1x 1'], /bad metric name|must start with a metric name/],
    ['an unknown type', ['# TYPE x thing'], /unknown type/],
    ['two TYPE lines', ['# TYPE x gauge', '# TYPE x gauge'], /second TYPE/],
    ['TYPE after samples', ['# HELP x h', 'x 1', '# TYPE x gauge'], /after its samples/],
    ['an unquoted label', ['# TYPE x gauge', 'x{a=1} 1'], /expected "/],
    ['a bad label name', ['# TYPE x gauge', 'x{1a="1"} 1'], /bad label name/],
    ['a reserved label name', ['# TYPE x gauge', 'x{__a="1"} 1'], /reserved/],
    ['a bad escape', ['# TYPE x gauge', 'x{a="\\t"} 1'], /bad escape/],
    ['an unterminated label', ['# TYPE x gauge', 'x{a="1} 1'], /unterminated|expected/],
    ['a bad value', ['# TYPE x gauge', 'x one'], /bad value/],
    ['no value', ['# TYPE x gauge', 'x{a="1"}'], /expected " value/],
    ['a duplicate sample', ['# TYPE x gauge', 'x{a="1"} 1', 'x{a="1"} 2'], /twice/],
    ['a negative counter', ['# TYPE c_total counter', 'c_total -1'], /counter c_total is -1/],
    ['non-contiguous samples', ['# TYPE x gauge', '# TYPE y gauge', 'x 1', 'y 1', 'x{a="2"} 1'], /not contiguous/],
    ['a bucket without le', ['# TYPE h histogram', 'h_bucket 1', 'h_sum 1', 'h_count 1'], /without le/],
    ['buckets not monotone', ['# TYPE h histogram', 'h_bucket{le="1"} 2', 'h_bucket{le="2"} 1', 'h_bucket{le="+Inf"} 2', 'h_sum 1', 'h_count 2'], /fewer than/],
    ['le not increasing', ['# TYPE h histogram', 'h_bucket{le="2"} 1', 'h_bucket{le="1"} 1', 'h_bucket{le="+Inf"} 1', 'h_sum 1', 'h_count 1'], /does not follow/],
    ['no +Inf bucket', ['# TYPE h histogram', 'h_bucket{le="1"} 1', 'h_sum 1', 'h_count 1'], /no \+Inf/],
    ['+Inf != _count', ['# TYPE h histogram', 'h_bucket{le="+Inf"} 1', 'h_sum 1', 'h_count 2'], /!= _count/],
    ['no _sum', ['# TYPE h histogram', 'h_bucket{le="+Inf"} 1', 'h_count 1'], /lacks _count or _sum/],
    ['a gauge with a histogram suffix', ['# TYPE g gauge', 'g_bucket{le="1"} 1'], /belongs to no declared family/],
  ];
  for (const [what, lines, re] of bad) t.throws(() => parseExposition(lines.join('\n') + '\n'), re, `refused: ${what}`);
  t.throws(() => parseExposition('# TYPE x gauge\nx 1'), /newline/, 'refused: no final newline');
});

interface Reply { status: number; body: string; contentType: string }

function get(url: string, ca: string, pathname: string, token?: string): Promise<Reply> {
  const u = new URL(url.replace(/^wss:/, 'https:'));
  return new Promise((resolve, reject) => {
    const req = https.request({ host: u.hostname, port: u.port, path: pathname, method: 'GET', ca, headers: token === undefined ? {} : { authorization: `Bearer ${token}` } }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (c: string) => (body += c));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body, contentType: String(res.headers['content-type'] ?? '') }));
    });
    req.on('error', reject);
    req.end();
  });
}

const SIZE = 16 * 1024 * 1024;
const BLOCK = 65536;

t.test('GET /metrics on a real server: real figures, errors by code, authentication, no secret', async (t) => {
  const dir = await tmpDir(t);
  // the disk: random (incompressible) blocks with a zero region and scattered zero blocks
  const img = path.join(dir, 'disk.img');
  const buf = Buffer.alloc(SIZE);
  let nonZero = 0;
  for (let b = 0; b < SIZE / BLOCK; b++) {
    if ((b >= 64 && b < 160) || b % 7 === 3) continue;
    crypto.randomFillSync(buf, b * BLOCK, BLOCK);
    nonZero += BLOCK;
  }
  await fsp.writeFile(img, buf);
  t.ok(nonZero > SIZE / 3 && nonZero < SIZE, `the disk holds zero regions (${nonZero} of ${SIZE} bytes non-zero)`);

  const srv = await startServer(t, path.join(dir, 'srv'));
  const ca = await fsp.readFile(srv.info.caFile!, 'utf8');
  const token = (await fsp.readFile(srv.info.tokenFile, 'utf8')).trim();
  const metricsTokenFile = path.join(dir, 'srv', 'metrics-token');
  t.equal((await fsp.stat(metricsTokenFile)).mode & 0o777, 0o600, 'the metrics token file is mode 0600');
  const metricsToken = (await fsp.readFile(metricsTokenFile, 'utf8')).trim();
  t.ok(metricsToken.length >= 40 && metricsToken !== token, 'a metrics token of its own');
  const secrets: [string, string][] = [['token', token], ['metrics token', metricsToken], ['passphrase', (await fsp.readFile(path.join(dir, 'srv', 'passphrase'), 'utf8')).trim()]];

  // authentication
  const none = await get(srv.info.url, ca, '/metrics');
  t.equal(none.status, 401, 'no token: 401');
  t.match(JSON.parse(none.body), { code: 'MOB_ERR_AUTH' });
  t.equal((await get(srv.info.url, ca, '/metrics', 'wrong')).status, 401, 'a wrong token: 401');
  t.equal((await get(srv.info.url, ca, '/metrics', `${metricsToken}x`)).status, 401, 'a token that only starts like the metrics token: 401');
  const st = await get(srv.info.url, ca, '/v1/status', metricsToken);
  t.equal(st.status, 401, 'the metrics token opens nothing but /metrics (GET /v1/status: 401)');
  t.equal((await get(srv.info.url, ca, '/metrics', token)).status, 200, 'the operator token also reads /metrics');

  const scrapeQuietly = async (): Promise<{ text: string; f: Map<string, Family> }> => {
    const r = await get(srv.info.url, ca, '/metrics', metricsToken);
    return { text: r.body, f: parseExposition(r.body) };
  };
  const scrape = async (): Promise<{ text: string; f: Map<string, Family> }> => {
    const r = await get(srv.info.url, ca, '/metrics', metricsToken);
    t.equal(r.status, 200, 'GET /metrics with the metrics token: 200');
    t.match(r.contentType, /^text\/plain; version=0\.0\.4/, 'the text exposition content type');
    for (const [what, s] of secrets) t.notOk(r.body.includes(s), `the ${what} does not appear in the metrics`);
    const f = parseExposition(r.body);
    for (const name of f.keys()) t.ok(METRIC_NAME.test(name), `metric name ${name}`);
    return { text: r.body, f };
  };

  // a real replication
  const rep = await runCli(replicateArgs({ url: srv.info.url, tokenFile: srv.info.tokenFile, caFile: srv.info.caFile!, disk: `${img}=d0`, stateDir: path.join(dir, 'agent') })).done;
  t.equal(rep.code, 0, `replicate exit 0 (${rep.stderr.slice(-400)})`);
  const d0 = { agent: 'agent1', disk: 'd0' };
  // the session's store is closed (and its written bytes folded in) shortly after the agent leaves
  let m = await scrapeQuietly();
  await waitFor(async () => {
    m = await scrapeQuietly();
    return (sampleValue(m.f, 'mobility_sessions') ?? 1) === 0 && (sampleValue(m.f, 'mobility_disk_target_written_bytes_total', d0) ?? 0) >= nonZero;
  }, 60_000, 'the session to end and its writes to be counted');
  m = await scrape();
  const v = (name: string, labels: Record<string, string> = {}) => sampleValue(m.f, name, labels);
  t.equal(v('mobility_disk_size_bytes', d0), SIZE, 'disk size');
  t.equal(v('mobility_disk_initial_complete', d0), 1, 'initial replication complete');
  t.ok(v('mobility_disk_received_bytes_total', d0)! >= nonZero, `bytes received (${v('mobility_disk_received_bytes_total', d0)}) >= the non-zero bytes of the disk (${nonZero})`);
  t.equal(v('mobility_disk_shipped_bytes_total', d0), nonZero, 'decoded bytes shipped = the non-zero blocks');
  t.equal(v('mobility_disk_zero_bytes_total', d0), SIZE - nonZero, 'zero blocks came as flags');
  t.ok(v('mobility_disk_target_written_bytes_total', d0)! >= nonZero, 'bytes written to the target >= the non-zero bytes');
  t.ok(v('mobility_received_bytes_total')! >= v('mobility_disk_received_bytes_total', d0)!, 'server bytes received >= the disk\'s data frames');
  t.ok(v('mobility_received_frames_total', { type: 'data' })! >= 1, 'data frames counted');
  t.equal(v('mobility_received_frames_total', { type: 'hello' }), 1, 'one hello');
  t.equal(v('mobility_received_frames_total', { type: 'passEnd' }), 1, 'one pass end');
  t.equal(v('mobility_target_write_seconds_count', { kind: 'file' }), v('mobility_received_frames_total', { type: 'data' }), 'one target write observed per data frame, by store kind');
  t.ok(v('mobility_target_write_seconds_sum', { kind: 'file' })! > 0, 'target write latency summed');
  t.equal(v('mobility_sessions_opened_total'), 1, 'one session opened');
  t.equal(v('mobility_target_up', { kind: 'file' }), 1, 'the target answered its listing');
  t.equal(v('mobility_status_collect_success'), 1);
  t.equal(v('mobility_disk_state', { ...d0, state: 'disconnected' }), 1, 'a replicated disk without a session is disconnected');
  t.equal(m.f.get('mobility_disk_state')!.samples.filter((s) => s.labels.disk === 'd0').length, DISK_STATES.length, 'one state sample per known state');
  t.equal(m.f.get('mobility_disk_state')!.samples.filter((s) => s.labels.disk === 'd0').reduce((a, s) => a + s.value, 0), 1, 'exactly one current state');
  t.equal(v('mobility_disk_recovery_points', d0), 0, 'no recovery point from replicate');
  t.equal(v('mobility_disk_rpo_seconds', d0), undefined, 'no RPO without a point');
  t.equal(v('mobility_disk_rpo_alert', d0), 1, 'no point yet: RPO alert');
  t.equal(v('mobility_disk_rpo_threshold_seconds', d0), 15 * 60, 'the default RPO threshold');
  t.ok(v('process_cpu_seconds_total')! > 0, 'process metrics (collectDefaultMetrics)');
  t.ok(v('nodejs_heap_size_used_bytes')! > 0, 'Node.js heap metrics');
  t.equal(v('mobility_build_info', { version: AGENT_VERSION }), 1, 'build info');
  for (const name of m.f.keys()) {
    if (name.startsWith('process_') || name.startsWith('nodejs_')) continue;
    t.ok(name.startsWith('mobility_'), `${name}: mobility_ prefix`);
    if (m.f.get(name)!.type === 'counter') t.ok(name.endsWith('_total'), `counter ${name} ends with _total`);
    t.ok(m.f.get(name)!.help, `${name} has HELP`);
  }

  // a protect-like session: a health report, then a cut the server turns into a point
  const s = new RawSession(srv.info.url, { ca });
  await s.open();
  const blk = crypto.randomBytes(BLOCK);
  s.send({ type: 'hello', hello: { protocolVersion: PROTOCOL_VERSION, agentId: 'agent2', token, agentVersion: AGENT_VERSION, disks: [{ diskId: 'p0', sizeBytes: 1 << 20, blockSize: BLOCK, pageSize: 4096 }] } });
  t.equal((await s.next('welcome'))?.type, 'welcome');
  s.send({ type: 'data', data: { disk: 0, seq: 1, blocks: [{ index: 0, encoding: Encoding.RAW, length: BLOCK, pageMask: Buffer.alloc(0), digest: digestBytes(blk) }] } }, blk);
  t.equal((await s.next('ack'))?.type, 'ack');
  s.send({ type: 'passEnd', passEnd: { disk: 0, seq: 2, kind: 'initial' } });
  t.equal((await s.next('ack'))?.type, 'ack');
  s.send({ type: 'health', health: { disks: [{ disk: 0, state: 'continuous', reason: 'secret-looking reason text', backlogBytes: 12345, dataLagMs: 1500, churnBytesPerSec: 4096, freezeFailures: 2, lastFreezeMs: 7, progressPermille: 1000 }] } });
  s.send({ type: 'cut', cut: { cutId: 1, kind: 'crash', takenAtMs: Date.now(), frozenMs: 7, note: '', disks: [{ disk: 0, seq: 2, samplePages: [0], sampleDigests: digestBytes(blk.subarray(0, 4096)) } as CutDisk] } });
  const ack = await s.next('cutAck');
  t.ok(ack?.type === 'cutAck' && ack.cutAck.pointId, 'the cut became a recovery point');
  m = await scrape();
  const p0 = { agent: 'agent2', disk: 'p0' };
  t.equal(v('mobility_sessions'), 1, 'one open session');
  t.equal(v('mobility_disk_state', { ...p0, state: 'continuous' }), 1, 'state from the health report');
  t.equal(v('mobility_disk_connected', p0), 1);
  t.equal(v('mobility_disk_backlog_bytes', p0), 12345, 'backlog');
  t.equal(v('mobility_disk_data_lag_seconds', p0), 1.5, 'data lag in seconds');
  t.equal(v('mobility_disk_churn_bytes_per_second', p0), 4096, 'churn');
  t.equal(v('mobility_disk_freeze_failures', p0), 2, 'freeze failures');
  t.equal(v('mobility_disk_last_freeze_seconds', p0), 0.007, 'last freeze');
  t.equal(v('mobility_disk_scan_progress_ratio', p0), 1, 'scan progress');
  t.ok(v('mobility_disk_health_age_seconds', p0)! >= 0, 'health age');
  t.equal(v('mobility_disk_recovery_points', p0), 1, 'one recovery point');
  t.ok(v('mobility_disk_rpo_seconds', p0)! >= 0 && v('mobility_disk_rpo_seconds', p0)! < 120, 'RPO: the age of the new point');
  t.equal(v('mobility_disk_rpo_alert', p0), 0, 'a fresh point: no RPO alert');
  t.ok(Math.abs(v('mobility_disk_newest_point_timestamp_seconds', p0)! - Date.now() / 1000) < 120, 'newest point timestamp (Unix seconds)');
  t.equal(v('mobility_disk_cut_freeze_seconds_count', p0), 1, 'one cut freeze observed');
  t.equal(v('mobility_disk_cut_freeze_seconds_sum', p0), 0.007, 'its duration in seconds');
  t.equal(v('mobility_disk_cut_freeze_seconds_bucket', { ...p0, le: '0.005' }), 0, 'not in the 5 ms bucket');
  t.equal(v('mobility_disk_cut_freeze_seconds_bucket', { ...p0, le: '0.01' }), 1, 'in the 10 ms bucket');
  t.equal(v('mobility_recovery_points_recorded_total'), 1, 'points recorded');
  t.equal(v('mobility_received_frames_total', { type: 'health' }), 1, 'the health frame counted');
  t.notOk(m.text.includes('secret-looking'), 'reason texts are not exported');

  // errors by code: a refused token (no agent known) and a bad block of a known disk
  const bad = new RawSession(srv.info.url, { ca });
  await bad.open();
  bad.send({ type: 'hello', hello: { protocolVersion: PROTOCOL_VERSION, agentId: 'agent3', token: 'not-the-token', agentVersion: AGENT_VERSION, disks: [{ diskId: 'x0', sizeBytes: 1 << 20, blockSize: BLOCK, pageSize: 4096 }] } });
  t.match((await bad.next('welcome')) as object, { type: 'error', error: { code: 'MOB_ERR_AUTH' } }, 'a wrong token is refused');
  const wrong = new RawSession(srv.info.url, { ca });
  await wrong.open();
  wrong.send({ type: 'hello', hello: { protocolVersion: PROTOCOL_VERSION, agentId: 'agent2', token, agentVersion: AGENT_VERSION, disks: [{ diskId: 'p1', sizeBytes: 1 << 20, blockSize: BLOCK, pageSize: 4096 }] } });
  t.equal((await wrong.next('welcome'))?.type, 'welcome');
  wrong.send({ type: 'data', data: { disk: 0, seq: 1, blocks: [{ index: 0, encoding: Encoding.RAW, length: BLOCK, pageMask: Buffer.alloc(0), digest: digestBytes(Buffer.alloc(8)) }] } }, blk);
  t.match((await wrong.next('ack')) as object, { type: 'error', error: { code: 'MOB_ERR_DIGEST_MISMATCH' } }, 'a block that does not match its digest is refused');
  m = await scrape();
  t.equal(v('mobility_session_errors_total', { code: 'MOB_ERR_AUTH' }), 1, 'the refused token, by code');
  t.equal(v('mobility_session_errors_total', { code: 'MOB_ERR_DIGEST_MISMATCH' }), 1, 'the bad block, by code');
  t.equal(v('mobility_disk_errors_total', { agent: 'agent2', disk: 'p1', code: 'MOB_ERR_DIGEST_MISMATCH' }), 1, 'the bad block, on its disk');
  t.equal(m.f.get('mobility_disk_errors_total')!.samples.filter((x) => x.labels.agent === 'agent3').length, 0, 'an agent that did not authenticate gets no series');
  t.ok(v('mobility_connections_rejected_total')! >= 1, 'rejected connections');
  s.ws.close();
  bad.ws.close();
  wrong.ws.close();

  // promtool, when installed, lints the same exposition
  const promtool = spawnSync('promtool', ['check', 'metrics'], { input: m.text, encoding: 'utf8' });
  if (promtool.error) t.comment('promtool is not installed: the exposition was checked by test/prom-text.ts only');
  else t.equal(promtool.status, 0, `promtool check metrics: ${promtool.stdout}${promtool.stderr}`);
  t.ok(fs.existsSync(metricsTokenFile));
});

t.test('GET /metrics with an azure store (Azurite): requests by operation, bytes written, no credential', async (t) => {
  const dir = await tmpDir(t);
  const az = await startAzurite(t);
  const creds = await writeCredentialsFile(dir, az);
  const size = 4 * 1024 * 1024;
  const img = path.join(dir, 'disk.img');
  const buf = Buffer.alloc(size);
  crypto.randomFillSync(buf, 0, size / 2);
  await fsp.writeFile(img, buf);
  const srv = await startServer(t, path.join(dir, 'srv'), { extraArgs: ['--store', `azure:${az.url}/metrics`, '--store-credentials', creds] });
  const ca = await fsp.readFile(srv.info.caFile!, 'utf8');
  const metricsToken = (await fsp.readFile(path.join(dir, 'srv', 'metrics-token'), 'utf8')).trim();
  const rep = await runCli(replicateArgs({ url: srv.info.url, tokenFile: srv.info.tokenFile, caFile: srv.info.caFile!, disk: `${img}=z0`, stateDir: path.join(dir, 'agent') })).done;
  t.equal(rep.code, 0, `replicate exit 0 (${rep.stderr.slice(-400)})`);
  const z0 = { agent: 'agent1', disk: 'z0' };
  let text = '';
  let f = new Map<string, Family>();
  await waitFor(async () => {
    const r = await get(srv.info.url, ca, '/metrics', metricsToken);
    text = r.body;
    f = parseExposition(r.body);
    return (sampleValue(f, 'mobility_disk_target_written_bytes_total', z0) ?? 0) >= size / 2;
  }, 60_000, 'the replica\'s writes to be counted');
  t.ok(sampleValue(f, 'mobility_disk_target_written_bytes_total', z0)! >= size / 2, 'bytes written to the page blob');
  t.equal(sampleValue(f, 'mobility_target_up', { kind: 'azure' }), 1, 'the store answered');
  t.ok(sampleValue(f, 'mobility_target_requests_total', { kind: 'azure', op: 'putPages' })! >= 1, 'Put Page requests counted');
  t.ok(sampleValue(f, 'mobility_target_uploaded_bytes_total', { kind: 'azure' })! >= size / 2, 'bytes uploaded');
  t.equal(sampleValue(f, 'mobility_target_request_retries_total', { kind: 'azure' }), 0, 'no retries');
  t.ok(sampleValue(f, 'mobility_target_write_seconds_count', { kind: 'azure' })! >= 1, 'target write latency, kind azure');
  t.equal(sampleValue(f, 'mobility_disk_state', { ...z0, state: 'disconnected' }), 1);
  t.notOk(text.includes(az.accountKey), 'the account key does not appear');
  t.notOk(text.includes(az.accountName), 'nor the account name (the store location is not a label)');
  t.notOk(text.includes(metricsToken), 'nor the metrics token');
});
