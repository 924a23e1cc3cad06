/**
 * The pull-install bundle with a stub CLI (preflight, register, agent): the steps of install.sh
 * that need the real commands (preflight failure, registration, the detached agent, upgrade
 * restarts, the final machine-readable line), run against an empty temporary prefix.
 */
import t from 'tap';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { SERVER, VERSION, lastLine, listing, makeBundle, run } from './bundle-harness.js';

const { work, BUNDLE, emptyPrefix } = await makeBundle();
const STUB_CLI = `
import fs from 'node:fs';
import path from 'node:path';
const argv = process.argv.slice(2);
const opt = (n) => { const i = argv.indexOf(n); return i >= 0 ? argv[i + 1] : undefined; };
fs.appendFileSync(process.env.STUB_LOG, JSON.stringify(argv) + '\\n');
switch (argv[0]) {
  case 'preflight':
    if (process.env.STUB_PREFLIGHT_FAIL) { console.log('FAIL tracefs: MOB_ERR_PRE_NO_TRACEFS tracefs is not mounted'); process.exit(1); }
    console.log('preflight: all checks passed');
    process.exit(0);
  case 'register': {
    const cfg = JSON.parse(fs.readFileSync(opt('--config'), 'utf8'));
    const secret = fs.readFileSync(opt('--passphrase-file') ?? opt('--token-file'), 'utf8').trim();
    if (secret !== process.env.STUB_SECRET) { console.error('error: registration refused [MOB_ERR_PASSPHRASE]'); process.exit(4); }
    fs.writeFileSync(path.join(cfg.stateDir, 'agent.pem'), 'CERT\\n', { mode: 0o600 });
    console.log('registered as agent stub-1');
    process.exit(0);
  }
  case 'agent': {
    if (process.env.STUB_AGENT_FAIL) { console.error('agent: cannot open the config'); process.exit(3); }
    const pidFile = opt('--pid-file');
    fs.writeFileSync(pidFile, process.pid + '\\n');
    process.on('SIGTERM', () => { fs.rmSync(pidFile, { force: true }); process.exit(0); });
    setInterval(() => {}, 1000);
    break;
  }
  default: process.exit(2);
}
`;

/** The process exists and is not a zombie (a detached agent is reaped by init). */
function alive(pid: number): boolean {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2)[0] !== 'Z';
  } catch {
    return false;
  }
}

t.test('with a stub CLI: preflight, register, detached agent, upgrade restart, uninstall stop', async (t) => {
  const bundle = path.join(work, 'stub-bundle');
  const cp = await run('cp', ['-a', BUNDLE, bundle]);
  t.equal(cp.code, 0, cp.stderr);
  await fsp.writeFile(path.join(bundle, 'dist/src/cli/main.js'), STUB_CLI);
  const install = path.join(bundle, 'install.sh');
  const prefix = await emptyPrefix();
  const pidFile = path.join(prefix, 'var/lib/mobility/agent.pid');
  t.teardown(() => { try { process.kill(Number(fs.readFileSync(pidFile, 'utf8')), 'SIGKILL'); } catch { /* not running */ } });
  const log = path.join(work, 'stub-calls.log');
  const secret = 'pass-phrase-NEVER-PRINTED';
  const passFile = path.join(work, 'pass');
  await fsp.writeFile(passFile, `${secret}\n`, { mode: 0o600 });
  const env = { STUB_LOG: log, STUB_SECRET: secret };
  const PIN = 'AB:CD:EF:01';
  const args = ['--server', SERVER, '--passphrase-file', passFile, '--pin', PIN, '--prefix', prefix];
  const calls = async () => (await fsp.readFile(log, 'utf8').catch(() => '')).trim().split('\n').filter(Boolean).map((l) => JSON.parse(l) as string[]);
  const outputs: string[] = [];
  const go = async (a: string[], extraEnv: Record<string, string> = {}) => {
    const r = await run(install, a, { ...env, ...extraEnv });
    outputs.push(r.stdout, r.stderr);
    return r;
  };

  const pf = await go(args, { STUB_PREFLIGHT_FAIL: '1' });
  t.equal(pf.code, 10, 'a failed preflight is exit 10');
  t.match(lastLine(pf.stdout), /^MOBILITY-INSTALL fail MOB_ERR_PRE_NO_TRACEFS preflight against wss:\/\/appliance\.example:8443 failed: /);
  t.match(pf.stderr, /tracefs is not mounted/, 'the preflight report is shown');
  t.same(await fsp.readdir(prefix), [], 'nothing installed after a failed preflight');
  t.same((await calls())[0], ['preflight', '--server', SERVER, '--state-dir', `${prefix}/var/lib/mobility`]);

  const bad = await go(args, { STUB_SECRET: 'another' });
  t.equal(bad.code, 11, 'a refused registration is exit 11');
  t.match(lastLine(bad.stdout), /^MOBILITY-INSTALL fail MOB_ERR_PASSPHRASE registration with /);

  const ok = await go(args);
  t.equal(ok.code, 0, ok.stderr);
  t.equal(lastLine(ok.stdout), `MOBILITY-INSTALL ok ${VERSION}`);
  t.match(ok.stdout, /registered as agent stub-1/);
  const conf = `${prefix}/etc/mobility/agent.json`;
  t.same((await calls()).filter((c) => c[0] === 'register').at(-1), ['register', '--config', conf, '--server', SERVER, '--passphrase-file', passFile, '--pin', PIN]);
  t.same(JSON.parse(await fsp.readFile(conf, 'utf8')), { server: SERVER, stateDir: `${prefix}/var/lib/mobility`, logFile: `${prefix}/var/log/mobility/agent.log`, pin: PIN });
  const pid1 = Number(await fsp.readFile(pidFile, 'utf8'));
  t.ok(alive(pid1), `the agent runs detached (pid ${pid1})`);
  t.same((await calls()).at(-1), ['agent', '--config', conf, '--pid-file', pidFile]);

  // an upgrade with a secret file registers again (the server keeps the identity) ...
  const reg = await go(args);
  t.equal(reg.code, 0, reg.stderr);
  t.equal((await calls()).filter((c) => c[0] === 'register').length, 3, 'registers again when given a secret');
  // ... and one without a secret keeps the registration
  const noSecret = args.filter((a, i) => a !== '--passphrase-file' && args[i - 1] !== '--passphrase-file');
  const up = await go(noSecret);
  t.equal(up.code, 0, up.stderr);
  t.match(up.stdout, /skip registration \(already registered with wss:\/\/appliance\.example:8443\)/);
  t.equal((await calls()).filter((c) => c[0] === 'register').length, 3, 'no new registration on an upgrade without a secret');
  t.notOk(alive(pid1), 'the old agent was stopped');
  const pid2 = Number(await fsp.readFile(pidFile, 'utf8'));
  t.not(pid2, pid1);
  t.ok(alive(pid2), 'a new agent runs');

  const other = 'wss://other.example:9443';
  const moved = await go(['--server', other, '--passphrase-file', passFile, '--prefix', prefix]);
  t.equal(moved.code, 0, moved.stderr);
  t.same((await calls()).filter((c) => c[0] === 'register').at(-1), ['register', '--config', conf, '--server', other, '--passphrase-file', passFile], 'a new server means a new registration');
  t.same(JSON.parse(await fsp.readFile(conf, 'utf8')), { server: other, stateDir: `${prefix}/var/lib/mobility`, logFile: `${prefix}/var/log/mobility/agent.log` }, 'the old pin is dropped with the old server');

  const dead = await go(['--prefix', prefix], { STUB_AGENT_FAIL: '1' });
  t.equal(dead.code, 12, 'an agent that dies at start is exit 12');
  t.match(lastLine(dead.stdout), /^MOBILITY-INSTALL fail MOB_ERR_PUSH_INSTALL_FAILED the agent exited at start: .*cannot open the config/);

  const back = await go(['--prefix', prefix]);
  t.equal(back.code, 0, back.stderr);
  const pid3 = Number(await fsp.readFile(pidFile, 'utf8'));
  t.ok(alive(pid3));
  const u = await run(path.join(prefix, 'opt/mobility/uninstall.sh'), []);
  outputs.push(u.stdout, u.stderr);
  t.equal(u.code, 0, u.stderr);
  t.match(u.stdout, `stopped the agent (pid ${pid3})`);
  t.notOk(alive(pid3), 'uninstall stopped the agent');
  t.same(await listing(prefix), [], 'nothing left');
  t.notOk(outputs.some((o) => o.includes(secret)), 'the passphrase never appears in any output');
});
